"""Tests of the validator harness itself (tests/dicom_validators.py).

A tiny synthetic MR series (4 axial slices, 32 x 32, MR Image Storage, Explicit VR Little
Endian) is written with pydicom; from it highdicom builds a BINARY SEG with two segments
(right and left erector spinae) and a TID 1500 Comprehensive 3D SR with a volumetric
measurement group referencing segment 1.  Each validator must accept the valid objects and
report the expected content, and must demonstrably fail on broken input.

Needs: dciodvfy (dicom3tools), dcmqi in the virtualenv, Node >= 20 and
``npm ci --prefix tests/js``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

try:
    import dicom_validators as dv  # tests/ is on sys.path (pytest "prepend" import mode)
except ImportError:  # tests/ collected as a package
    from tests import dicom_validators as dv

ROWS = COLUMNS = 32
N_SLICES = 4
SLICE_SPACING = 3.0
ORIGIN_XY = (-16.0, -16.0)

CATEGORY = Code("91723000", "SCT", "Anatomical Structure")
ERECTOR_SPINAE = Code("44947003", "SCT", "Erector spinae muscle")
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
CM3 = Code("cm3", "UCUM", "cubic centimeter")
PERCENT = Code("%", "UCUM", "percent")
MRI_PROCEDURE = Code("113091000", "SCT", "Magnetic resonance imaging")

# (segment number, slice index) -> (row slice, column slice) of a rectangle.
# Columns increase towards patient left (+x): the right muscle sits at low columns.
RECTANGLES = {
    (1, 1): (slice(10, 15), slice(4, 10)),  # 5 x 6 = 30
    (1, 2): (slice(10, 14), slice(4, 9)),  # 4 x 5 = 20
    (2, 2): (slice(10, 17), slice(20, 28)),  # 7 x 8 = 56
    (2, 3): (slice(12, 15), slice(20, 23)),  # 3 x 3 = 9
}
VOLUME_CM3 = 12.5
FAT_FRACTION_PERCENT = 7.25


def _ipp(slice_index: int) -> tuple[float, float, float]:
    return (ORIGIN_XY[0], ORIGIN_XY[1], SLICE_SPACING * slice_index)


def _expected_counts() -> dict[int, dict[int, int]]:
    """segment number -> {slice index: voxel count}."""
    out: dict[int, dict[int, int]] = {}
    for (segment, k), (rows, cols) in RECTANGLES.items():
        out.setdefault(segment, {})[k] = (rows.stop - rows.start) * (cols.stop - cols.start)
    return out


EXPECTED = _expected_counts()


@dataclass
class Objects:
    mr_paths: list[Path]
    mr_datasets: list[Dataset]
    seg_path: Path
    seg: Dataset
    sr_path: Path
    sr: Dataset
    workdir: Path


def _mr_slice(k: int, study_uid: str, series_uid: str, frame_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = MRImageStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "Synthetic"
    ds.PatientName = "Validator^Test"
    ds.PatientID = "VALIDATOR-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.Modality = "MR"
    ds.BodyPartExamined = "LSPINE"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 500.0
    ds.EchoTime = 10.0
    ds.EchoTrainLength = 1
    ds.SliceThickness = SLICE_SPACING
    ds.SpacingBetweenSlices = SLICE_SPACING
    ds.ImagePositionPatient = list(_ipp(k))
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(ROWS * COLUMNS, dtype=np.uint16).reshape(ROWS, COLUMNS) + 100 * k).tobytes()
    return ds


def _segment_description(number: int, label: str, laterality: Code) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=hd.sr.CodedConcept.from_code(CATEGORY),
        # A fresh CodedConcept per segment: highdicom puts this very object into
        # SegmentedPropertyTypeCodeSequence, so a shared one would share the modifier too.
        segmented_property_type=hd.sr.CodedConcept.from_code(ERECTOR_SPINAE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="validator-test", version="1.0", family=codes.DCM.ArtificialIntelligence
        ),
        tracking_uid=generate_uid(),
        tracking_id=label,
    )
    # Laterality is a modifier of the property type: it belongs inside the type code item.
    description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
        hd.sr.CodedConcept.from_code(laterality)
    ]
    return description


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> Objects:
    root = tmp_path_factory.mktemp("dicom_validators")
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    mr_datasets, mr_paths = [], []
    for k in range(N_SLICES):
        ds = _mr_slice(k, study_uid, series_uid, frame_uid)
        path = root / f"mr_{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        mr_datasets.append(ds)
        mr_paths.append(path)

    mask = np.zeros((N_SLICES, ROWS, COLUMNS, 2), dtype=bool)
    for (segment, k), (rows, cols) in RECTANGLES.items():
        mask[k, rows, cols, segment - 1] = True
    seg = hd.seg.Segmentation(
        source_images=mr_datasets,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _segment_description(1, "Right erector spinae", RIGHT),
            _segment_description(2, "Left erector spinae", LEFT),
        ],
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Validator",
        manufacturer_model_name="validator-test",
        software_versions="1.0",
        device_serial_number="0001",
        content_creator_name="Validator^Test",
    )
    seg_path = root / "seg.dcm"
    seg.save_as(seg_path)

    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Right erector spinae"),
        referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=1),
        finding_type=hd.sr.CodedConcept.from_code(ERECTOR_SPINAE),
        finding_sites=[
            hd.sr.FindingSite(
                anatomic_location=hd.sr.CodedConcept.from_code(ERECTOR_SPINAE),
                laterality=hd.sr.CodedConcept.from_code(RIGHT),
            )
        ],
        measurements=[
            hd.sr.Measurement(name=codes.SCT.Volume, value=VOLUME_CM3, unit=hd.sr.CodedConcept.from_code(CM3)),
            hd.sr.Measurement(
                name=codes.DCM.FatFraction, value=FAT_FRACTION_PERCENT, unit=hd.sr.CodedConcept.from_code(PERCENT)
            ),
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=generate_uid(), name="validator-test"
                ),
            )
        ),
        procedure_reported=hd.sr.CodedConcept.from_code(MRI_PROCEDURE),
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *mr_datasets],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=200,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Validator",
        is_complete=True,
    )
    sr_path = root / "sr.dcm"
    sr.save_as(sr_path)
    workdir = root / "work"
    workdir.mkdir()
    return Objects(mr_paths, mr_datasets, seg_path, seg, sr_path, sr, workdir)


# --------------------------------------------------------------------------- dciodvfy


def test_dciodvfy_accepts_synthetic_source_image(objects: Objects) -> None:
    result = dv.dciodvfy(objects.mr_paths[0])
    assert result.iod == "MRImage"
    assert result.errors == [], result.output


def test_dciodvfy_accepts_valid_seg(objects: Objects) -> None:
    result = dv.dciodvfy(objects.seg_path)
    assert result.iod == "Segmentation"
    assert dv.dciodvfy_errors(objects.seg_path) == [], result.output
    errors, warnings = dv.dciodvfy_report(objects.seg_path)
    assert errors == []
    assert isinstance(warnings, list)


def test_dciodvfy_accepts_valid_sr(objects: Objects) -> None:
    result = dv.dciodvfy(objects.sr_path)
    assert result.iod == "Comprehensive3DSR"
    assert dv.dciodvfy_errors(objects.sr_path) == [], result.output


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("top_level_type1", "ContentLabel"),
        ("nested_type1", "SegmentedPropertyCategoryCodeSequence"),
    ],
)
def test_dciodvfy_reports_broken_seg(objects: Objects, tmp_path: Path, breakage: str, expected: str) -> None:
    broken = pydicom.dcmread(objects.seg_path)
    if breakage == "top_level_type1":
        del broken.ContentLabel  # Type 1, Content Identification Macro
    else:
        del broken.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence  # Type 1, Segment Description
    path = tmp_path / f"broken_{breakage}.dcm"
    broken.save_as(path)
    errors = dv.dciodvfy_errors(path)
    assert errors, "dciodvfy found no error in a SEG with a Type 1 attribute removed"
    assert any(expected in line for line in errors), errors
    assert all(line.startswith("Error") for line in errors)
    assert dv.dciodvfy(path).returncode != 0


# --------------------------------------------------------------------------- dcmqi


def test_dcmqi_reads_seg(objects: Objects) -> None:
    result = dv.dcmqi_read_seg(objects.seg_path, objects.workdir)
    assert [s.segment_number for s in result.segments] == [1, 2]
    for segment, label, laterality in [(1, "Right erector spinae", RIGHT), (2, "Left erector spinae", LEFT)]:
        s = result.segment(segment)
        assert s.label == label
        assert s.algorithm_type == "AUTOMATIC"
        assert s.category == CATEGORY and s.category.meaning == CATEGORY.meaning
        assert s.type == ERECTOR_SPINAE and s.type.meaning == ERECTOR_SPINAE.meaning
        assert s.type_modifier == laterality and s.type_modifier.meaning == laterality.meaning
        assert s.voxel_count == sum(EXPECTED[segment].values())
        nonempty = {pos: n for pos, n in s.slice_voxel_counts().items() if n}
        assert nonempty == {_ipp(k): n for k, n in EXPECTED[segment].items()}
        # Geometry: voxel centres in patient coordinates; x < 0 is patient right.
        ijk = np.argwhere(s.mask)
        lps = (s.affine_lps @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
        assert (lps[:, 0] < 0).all() if laterality == RIGHT else (lps[:, 0] > 0).all()


def test_dcmqi_reads_sr(objects: Objects) -> None:
    result = dv.dcmqi_read_sr(objects.sr_path, objects.workdir)
    assert result["CompletionFlag"] == "COMPLETE"
    (group,) = result["Measurements"]
    assert group["TrackingIdentifier"] == "Right erector spinae"
    assert group["ReferencedSegment"] == 1
    assert group["segmentationSOPInstanceUID"] == objects.seg.SOPInstanceUID
    assert group["Finding"]["CodeValue"] == ERECTOR_SPINAE.value
    assert group["Laterality"]["CodeValue"] == RIGHT.value
    items = {(i["quantity"]["CodingSchemeDesignator"], i["quantity"]["CodeValue"]): i for i in group["measurementItems"]}
    volume = items[(codes.SCT.Volume.scheme_designator, codes.SCT.Volume.value)]
    assert float(volume["value"]) == pytest.approx(VOLUME_CM3)
    assert (volume["units"]["CodeValue"], volume["units"]["CodingSchemeDesignator"]) == ("cm3", "UCUM")
    fat = items[(codes.DCM.FatFraction.scheme_designator, codes.DCM.FatFraction.value)]
    assert float(fat["value"]) == pytest.approx(FAT_FRACTION_PERCENT)
    assert (fat["units"]["CodeValue"], fat["units"]["CodingSchemeDesignator"]) == ("%", "UCUM")


def test_dcmqi_failures_raise_with_tool_output(objects: Objects) -> None:
    with pytest.raises(dv.ToolFailedError, match="Unsupported SOP Class UID") as seg_error:
        dv.dcmqi_read_seg(objects.sr_path, objects.workdir)  # an SR is not a SEG
    assert "stderr:" in str(seg_error.value)
    # tid1500reader exits 0 on a non-SR input; the harness must still fail.
    with pytest.raises(dv.ToolFailedError, match="SOP Class UID does not match"):
        dv.dcmqi_read_sr(objects.seg_path, objects.workdir)


# --------------------------------------------------------------------------- dcmjs


def test_dcmjs_reads_seg(objects: Objects) -> None:
    result = dv.dcmjs_read(objects.seg_path, source_paths=objects.mr_paths)
    assert result["kind"] == "SEG"
    seg = result["seg"]
    assert seg["segmentationType"] == "BINARY" and seg["bitsAllocated"] == 1
    segments = {s["segmentNumber"]: s for s in seg["segments"]}
    assert set(segments) == {1, 2}
    for number, laterality in [(1, RIGHT), (2, LEFT)]:
        s = segments[number]
        assert (s["category"]["CodeValue"], s["category"]["CodingSchemeDesignator"]) == ("91723000", "SCT")
        assert (s["type"]["CodeValue"], s["type"]["CodingSchemeDesignator"]) == ("44947003", "SCT")
        assert [m["CodeValue"] for m in s["typeModifiers"]] == [laterality.value]

    # Bit-unpacked PixelData: totals and per-frame counts at the right positions.
    assert seg["pixelDecoding"]["voxelCounts"] == {str(n): sum(c.values()) for n, c in EXPECTED.items()}
    frames = {(f["segmentNumber"], tuple(f["imagePositionPatient"])): f for f in seg["frames"]}
    assert {key: f["setPixels"] for key, f in frames.items()} == {
        (n, _ipp(k)): count for n, counts in EXPECTED.items() for k, count in counts.items()
    }
    sop_uids = [ds.SOPInstanceUID for ds in objects.mr_datasets]
    for (n, k), (rows, cols) in RECTANGLES.items():
        frame = frames[(n, _ipp(k))]
        assert frame["referencedSOPInstanceUID"] == sop_uids[k]
        assert frame["boundingBox"] == {
            "rowMin": rows.start,
            "rowMax": rows.stop - 1,
            "columnMin": cols.start,
            "columnMax": cols.stop - 1,
        }

    # OHIF-style decoding through the cornerstone adapter onto the source stack.
    adapter = seg["adapter"]
    assert adapter["decoded"] is True
    assert adapter["voxelCounts"] == {str(n): sum(c.values()) for n, c in EXPECTED.items()}
    per_image = {img["sopInstanceUID"]: img["voxelCounts"] for img in adapter["perImage"]}
    for k, uid in enumerate(sop_uids):
        expected = {str(n): counts[k] for n, counts in EXPECTED.items() if k in counts}
        assert per_image[uid] == expected


def test_dcmjs_reads_sr(objects: Objects) -> None:
    result = dv.dcmjs_read(objects.sr_path)
    assert result["kind"] == "SR" and result["srClass"] == "Comprehensive3DSR"
    sr = result["sr"]
    assert sr["templateIdentifier"] == "1500"
    assert sr["documentTitle"]["CodeValue"] == "126000"
    (group,) = sr["measurementGroups"]
    assert group["trackingIdentifier"] == "Right erector spinae"
    assert group["referencedSegment"] == {
        "sopClassUID": objects.seg.SOPClassUID,
        "sopInstanceUID": objects.seg.SOPInstanceUID,
        "segmentNumber": 1,
    }
    assert group["findingSites"][0]["laterality"]["CodeValue"] == RIGHT.value
    measurements = {
        (m["conceptName"]["CodingSchemeDesignator"], m["conceptName"]["CodeValue"]): m for m in group["measurements"]
    }
    assert set(measurements) == {("SCT", codes.SCT.Volume.value), ("DCM", codes.DCM.FatFraction.value)}
    volume = measurements[("SCT", codes.SCT.Volume.value)]
    assert volume["value"] == pytest.approx(VOLUME_CM3)
    assert (volume["unit"]["CodeValue"], volume["unit"]["CodingSchemeDesignator"]) == ("cm3", "UCUM")
    fat = measurements[("DCM", codes.DCM.FatFraction.value)]
    assert fat["value"] == pytest.approx(FAT_FRACTION_PERCENT)
    assert (fat["unit"]["CodeValue"], fat["unit"]["CodingSchemeDesignator"]) == ("%", "UCUM")
    assert len(sr["numericItems"]) == 2


def test_dcmjs_missing_node_modules_is_a_clear_error(
    objects: Objects, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dv, "JS_DIR", tmp_path)  # a folder without node_modules
    with pytest.raises(dv.ToolNotFoundError, match=r"run npm ci --prefix tests/js"):
        dv.dcmjs_read(objects.seg_path)
