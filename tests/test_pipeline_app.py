"""The whole MONAI Deploy application over a folder of real-world-messy input.

One application run handles many studies at once (as a batch would): a clean mixed study,
disc-angled stacks, non-square pixels, four compressed transfer syntaxes, a sagittal-only
study, a study without PixelSpacing, one with inconsistent slice sizes, one whose pixel data
is truncated, one whose RLE pixel data make the Rust RLE decoder panic (pyo3's PanicException,
no ``Exception``), plus corrupt files, a text file, an SR and a PDF mixed in. Each study must
end with the right status and a reason; nothing half-written may look complete.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_validators import dciodvfy_errors
from paraspinal.stacks import load_stack
from paraspinal.synthetic_study import make_sagittal_only_study, make_synthetic_study
from reliability.harness import make_codec_crash_study
from tests.conftest import MODEL_PATH, ROOT

COMPRESSED = ["jpeg_lossless", "jpeg_ls", "jpeg2000_lossless", "rle"]


def _non_image(study_uid: str, sop_class: str, modality: str, path: Path, **extra) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = modality, "PHANTOM0001", "PHANTOM^LUMBAR"
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def _rewrite(paths, edit) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    inp, out = root / "in", root / "out"
    studies = {"mixed": make_synthetic_study(inp / "mixed", seed=11, n_slices=8)}
    studies["oblique"] = make_synthetic_study(inp / "oblique", seed=12, oblique_stacks=True,
                                              non_square_pixels=True, include_distractors=False)
    for syntax in COMPRESSED:
        studies[syntax] = make_synthetic_study(inp / syntax, seed=13, n_slices=4, transfer_syntax=syntax,
                                               include_distractors=False)
    studies["sagittal"] = make_sagittal_only_study(inp / "sagittal", seed=14)
    studies["no_spacing"] = make_synthetic_study(inp / "no_spacing", seed=15, n_slices=4, include_distractors=False)
    _rewrite(studies["no_spacing"].t2_paths, lambda ds: delattr(ds, "PixelSpacing"))
    studies["sizes"] = make_synthetic_study(inp / "sizes", seed=16, n_slices=4, include_distractors=False)
    small = make_synthetic_study(root / "small", seed=16, n_slices=1, rows=128, cols=128, include_distractors=False)
    ref = pydicom.dcmread(studies["sizes"].t2_paths[0])

    def join_sizes_series(ds):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.StudyInstanceUID, ref.SeriesInstanceUID
        ds.ImagePositionPatient = [float(v) for v in ref.ImagePositionPatient[:2]] + [-100.0]

    _rewrite(small.t2_paths, join_sizes_series)
    (inp / "sizes" / "odd.dcm").write_bytes(small.t2_paths[0].read_bytes())
    studies["truncated"] = make_synthetic_study(inp / "truncated", seed=17, n_slices=4, include_distractors=False)
    victim = studies["truncated"].t2_paths[2]
    victim.write_bytes(victim.read_bytes()[:-20000])
    studies["panic"] = make_codec_crash_study(inp / "panic", seed=18)
    # Junk and non-image objects mixed into the mixed study's folder.
    junk = inp / "mixed" / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not DICOM")
    good = studies["mixed"].t2_paths[0].read_bytes()
    (junk / "corrupt.dcm").write_bytes(good[:300])
    _non_image(studies["mixed"].study_uid, "1.2.840.10008.5.1.4.1.1.88.11", "SR", junk / "sr.dcm")
    _non_image(studies["mixed"].study_uid, "1.2.840.10008.5.1.4.1.1.104.1", "DOC", junk / "report.dcm",
               MIMETypeOfEncapsulatedDocument="application/pdf", EncapsulatedDocument=b"%PDF-1.4\n%%EOF\n")
    run = subprocess.run([sys.executable, "-m", "app", "run", "-i", str(inp), "-o", str(out), "-m", str(MODEL_PATH)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    results = {name: json.loads((out / s.study_uid / "result.json").read_text())
               for name, s in studies.items() if (out / s.study_uid / "result.json").exists()}
    return {"studies": studies, "out": out, "run": run, "results": results}


def test_every_study_gets_a_result_and_the_run_reports_the_failure(batch):
    assert set(batch["results"]) == set(batch["studies"]), batch["run"].stderr[-3000:]
    assert batch["run"].returncode == 1  # two studies (truncated, panic) failed: said in the exit code
    outcomes = json.loads(batch["run"].stdout[: batch["run"].stdout.rindex("]") + 1])
    assert len(outcomes) == len(batch["studies"])
    assert not list(batch["out"].glob(".incomplete-*"))


@pytest.mark.parametrize("name", ["mixed", "oblique", *COMPRESSED])
def test_good_studies_end_done_with_valid_seg_per_stack_and_one_sr(batch, name):
    result = batch["results"][name]
    assert result["status"] == "done", result
    folder = batch["out"] / batch["studies"][name].study_uid
    segs = sorted(folder.glob("seg_stack*.dcm"))
    assert len(segs) == len(batch["studies"][name].stacks)
    for path in segs + [folder / "sr.dcm"]:
        assert dciodvfy_errors(path) == [], path.name
    measurements = json.loads((folder / "measurements.json").read_text())
    assert len(measurements["stacks"]) == len(segs)
    header = (folder / "measurements.csv").read_text().splitlines()[0]
    assert "fat_fraction_pct" in header and "volume_cm3" in header
    assert "RESEARCH USE ONLY" in result["research_use"]
    # Each muscle's row says how far its segmentation can be trusted: the model card's held-out
    # Dice (multifidus, erector spinae), or nothing where no real-data figure exists.
    dice = measurements["model"]["held_out_dice"]
    assert set(dice) == {"1", "2", "3", "4"}
    rows = list(csv.DictReader(io.StringIO((folder / "measurements.csv").read_text())))
    for row in rows:
        assert row["model_held_out_dice"] == (str(dice[row["label"]]) if row["label"] in dice else "")


def test_junk_files_are_listed_and_non_image_series_rejected_with_reason(batch):
    result = batch["results"]["mixed"]
    skipped = {Path(s["path"]).name: s["reason"] for s in result["skipped_files"]}
    assert "not a DICOM file" in skipped["notes.txt"]
    assert "corrupt.dcm" in skipped
    reasons = [d["reason"] for d in result["series_decisions"]]
    assert any("Comprehensive" in r or "Basic Text SR" in r for r in reasons if "not an MR image series" in r)
    assert any("Encapsulated PDF" in r for r in reasons)


def test_studies_without_a_usable_series_say_why_and_write_no_dicom(batch):
    expected = {"sagittal": "sagittal", "no_spacing": "missing PixelSpacing", "sizes": "inconsistent sizes"}
    for name, words in expected.items():
        result = batch["results"][name]
        assert result["status"] == "no_suitable_series"
        assert result["reason"].startswith("no lumbar axial T2 series")
        assert any(words in d["reason"] for d in result["series_decisions"]), result["series_decisions"]
        assert result["outputs"] == []


def test_study_with_undecodable_pixels_fails_naming_the_file_and_keeps_no_partial_output(batch):
    result = batch["results"]["truncated"]
    assert result["status"] == "failed" and result["failed_stage"] == "load"
    assert batch["studies"]["truncated"].t2_paths[2].name in result["reason"]
    folder = batch["out"] / batch["studies"]["truncated"].study_uid
    assert sorted(p.name for p in folder.iterdir()) == ["result.json"]


def test_a_decoder_panic_fails_only_its_study_naming_the_file(batch):
    """pyo3's PanicException derives from BaseException: it must still end as this study's
    failure in stage "load", not abort the run (the other studies have results, see above)."""
    result = batch["results"]["panic"]
    assert result["status"] == "failed" and result["failed_stage"] == "load", result
    assert batch["studies"]["panic"].paths[0].name in result["reason"]  # the poisoned slice
    assert "pixel data could not be decoded" in result["reason"] and "PanicException" in result["reason"]


@pytest.mark.parametrize("syntax", COMPRESSED)
def test_compressed_transfer_syntaxes_decode_to_the_written_pixels(tmp_path, config, syntax):
    from paraspinal.dicom_index import index_folder
    from paraspinal.series_selection import select_series

    study = make_synthetic_study(tmp_path, seed=21, n_slices=3, transfer_syntax=syntax, include_distractors=False)
    selection = select_series(next(iter(index_folder(tmp_path).studies.values())), config.selection)
    stack = load_stack(selection.chosen.stacks[0], selection.chosen.series_uid, 1)
    order = {uid: k for k, uid in enumerate(study.stacks[0].sop_instance_uids)}
    expected = np.stack([study.stacks[0].image[order[str(ds.SOPInstanceUID)]] for ds in stack.datasets])
    np.testing.assert_array_equal(stack.pixels, expected.astype(np.float32))
