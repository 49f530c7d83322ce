"""The selector picks the lumbar axial T2 out of a mixed study, splits disc-angled stacks, and
rejects everything else with a reason a person can act on."""

from __future__ import annotations

from dataclasses import replace

import pytest

from paraspinal.dicom_index import index_folder
from paraspinal.series_selection import NO_SERIES_REASON, select_series
from paraspinal.synthetic_study import make_brain_study, make_sagittal_only_study, make_synthetic_study


def only_study(folder):
    index = index_folder(folder)
    assert len(index.studies) == 1
    return next(iter(index.studies.values()))


@pytest.fixture(scope="module")
def mixed_study(tmp_path_factory):
    return make_synthetic_study(tmp_path_factory.mktemp("mixed"), seed=3, n_slices=6)


def test_picks_axial_t2_out_of_a_mixed_study_and_gives_every_other_series_a_reason(mixed_study, config):
    selection = select_series(only_study(mixed_study.root), config.selection)
    assert selection.chosen is not None
    assert selection.chosen.series_uid == mixed_study.t2_series_uid
    reasons = {d.series_uid: d.reason for d in selection.decisions if not d.accepted}
    assert "LOCALIZER" in reasons[mixed_study.distractor_series_uids["localizer"]]
    assert "not axial: sagittal" in reasons[mixed_study.distractor_series_uids["sagittal_t2"]]
    assert "not T2-weighted" in reasons[mixed_study.distractor_series_uids["axial_t1"]]


def test_choice_does_not_depend_on_series_description(mixed_study, config, tmp_path):
    """Swapping the descriptions of the T2 and the T1 must not change which series is chosen."""
    import pydicom

    t1_uid = mixed_study.distractor_series_uids["axial_t1"]
    for path in mixed_study.all_paths:
        ds = pydicom.dcmread(path)
        if ds.SeriesInstanceUID == mixed_study.t2_series_uid:
            ds.SeriesDescription = "t1_tse_tra"
        elif ds.SeriesInstanceUID == t1_uid:
            ds.SeriesDescription = "t2_tse_tra"
        ds.save_as(tmp_path / path.name)
    selection = select_series(only_study(tmp_path), config.selection)
    assert selection.chosen.series_uid == mixed_study.t2_series_uid


def test_disc_angled_series_is_split_into_stacks(tmp_path, config):
    study = make_synthetic_study(tmp_path, seed=4, oblique_stacks=True, include_distractors=False)
    selection = select_series(only_study(tmp_path), config.selection)
    assert selection.chosen is not None
    assert [len(p.instances) for p in selection.chosen.stacks] == [len(s.sop_instance_uids) for s in study.stacks]
    for plan, truth in zip(selection.chosen.stacks, sorted(study.stacks, key=lambda s: s.geometry.positions[0][2])):
        assert {r.sop_instance_uid for r in plan.instances} == set(truth.sop_instance_uids)


def test_sagittal_only_study_is_rejected_with_the_plane_named(tmp_path, config):
    make_sagittal_only_study(tmp_path, seed=5)
    selection = select_series(only_study(tmp_path), config.selection)
    assert selection.chosen is None
    assert selection.reason.startswith(NO_SERIES_REASON)
    assert any("sagittal" in d.reason for d in selection.decisions)


def test_brain_study_is_rejected_although_it_has_an_axial_t2(tmp_path, config):
    make_brain_study(tmp_path, seed=6, n_slices=6)
    selection = select_series(only_study(tmp_path), config.selection)
    assert selection.chosen is None
    assert NO_SERIES_REASON in selection.reason and "not lumbar" in selection.reason


def test_rules_come_from_the_config(mixed_study, config):
    strict = replace(config.selection, min_echo_time_ms=150.0)
    selection = select_series(only_study(mixed_study.root), strict)
    assert selection.chosen is None
    assert "need TE >= 150" in next(d.reason for d in selection.decisions if d.series_uid == mixed_study.t2_series_uid)


def test_single_slice_series_is_rejected_as_too_short(mixed_study, config, tmp_path):
    first = next(p for p in mixed_study.t2_paths)
    (tmp_path / first.name).write_bytes(first.read_bytes())
    selection = select_series(only_study(tmp_path), config.selection)
    assert selection.chosen is None
    assert "too few slices" in selection.decisions[0].reason


def test_dixon_water_image_marked_in_image_type_is_not_taken_as_the_t2(mixed_study, config, tmp_path):
    """A T2 TSE Dixon water image can have T2 timing; its ImageType (W) rules it out."""
    import pydicom

    for path in mixed_study.t2_paths:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "W", "DIXON"]
        ds.save_as(tmp_path / path.name)
    selection = select_series(only_study(tmp_path), config.selection)
    assert selection.chosen is None
    assert "Dixon water image" in selection.decisions[0].reason


# ---- fat suppression and inversion recovery ----------------------------------------------------


def _edited_copy(paths, folder, **attributes) -> None:
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / path.name)


def test_a_fat_saturated_t2_beside_the_plain_one_is_never_chosen_even_with_the_better_description(
        mixed_study, config, tmp_path):
    """Same timing, same geometry, more slices and a description scoring higher: the header's
    ScanOptions FS still rules it out, and the plain T2 is chosen."""
    import shutil

    shutil.copytree(mixed_study.root, tmp_path / "study")
    _copy_series(mixed_study.t2_paths, tmp_path / "fs_tmp", 9)
    _edited_copy(sorted((tmp_path / "fs_tmp").glob("*.dcm")), tmp_path / "study" / "fs",
                 ScanOptions=["PFP", "FS"], SeriesDescription="t2_tse_fs_tra axial")
    selection = select_series(only_study(tmp_path / "study"), config.selection)
    assert selection.chosen is not None and selection.chosen.series_uid == mixed_study.t2_series_uid
    (fs,) = [d for d in selection.decisions if d.series_number == "9"]
    assert not fs.accepted and "ScanOptions FS (fat saturation)" in fs.reason, fs.reason


@pytest.mark.parametrize("attributes, words", [
    ({"ScanOptions": "FS"}, "ScanOptions FS"),
    ({"ScanningSequence": ["SE", "IR"], "InversionTime": 150}, "inversion recovery (ScanningSequence SE/IR, "
                                                               "InversionTime 150 ms)"),
], ids=["fat_saturation", "stir"])
def test_a_study_whose_only_axial_t2_is_fat_suppressed_gets_no_series_and_says_why(mixed_study, config, tmp_path,
                                                                                  attributes, words):
    _edited_copy(mixed_study.t2_paths, tmp_path, **attributes)
    selection = select_series(only_study(tmp_path), config.selection)
    assert selection.chosen is None and selection.reason.startswith(NO_SERIES_REASON)
    reason = selection.decisions[0].reason
    assert reason.startswith("fat-suppressed or inversion-prepared: ") and words in reason, reason
    assert "fat cannot be measured" in reason
    # a site that wants them anyway says so in its configuration
    allowed = select_series(only_study(tmp_path), replace(config.selection, exclude_fat_suppressed=False))
    assert allowed.chosen is not None


def test_a_real_siemens_fat_saturated_header_is_recognised():
    """The one genuine vendor MR header at hand (Siemens VIBE, ScanOptions SAT2\\FS)."""
    import pydicom

    from paraspinal.nifti_to_dicom import DEFAULT_REAL_DATA_DIR
    from paraspinal.series_selection import fat_suppression

    path = DEFAULT_REAL_DATA_DIR / "pydicom_mr_siemens_axial_abdomen_t1.dcm"
    if not path.is_file():
        pytest.skip("shared real fixtures not present")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert fat_suppression(header) == "ScanOptions FS (fat saturation)"
    del header.ScanOptions
    assert fat_suppression(header) is None


def test_enhanced_mr_spectral_fat_suppression_reaches_each_frame_and_rules_it_out():
    """Enhanced MR carries fat suppression in the MR Modifier macro of the functional groups."""
    from pydicom.dataset import Dataset

    from paraspinal.enhanced_mr import frame_headers
    from paraspinal.series_selection import fat_suppression

    modifier = Dataset()
    modifier.SpectrallySelectedSuppression = "FAT"
    modifier.InversionRecovery = "NO"
    shared = Dataset()
    shared.MRModifierSequence = [modifier]
    header = Dataset()
    header.NumberOfFrames = 2
    header.SharedFunctionalGroupsSequence = [shared]
    header.PerFrameFunctionalGroupsSequence = [Dataset(), Dataset()]
    frames = frame_headers(header)
    assert [fat_suppression(f) for f in frames] == ["SpectrallySelectedSuppression FAT"] * 2
    modifier.SpectrallySelectedSuppression = "NONE"
    assert fat_suppression(frame_headers(header)[0]) is None
    modifier.InversionRecovery = "YES"
    assert fat_suppression(frame_headers(header)[0]) == "inversion recovery (InversionRecovery YES)"


# ---- odd geometry and unreadable headers --------------------------------------------------------


def _raw_value(path, keyword: str, raw: bytes, out) -> None:
    """Copy ``path`` to ``out`` with ``keyword``'s value replaced by ``raw`` as written on disk,
    whatever its VR allows (as a broken modality might write it)."""
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(path)
    tag = tag_for_keyword(keyword)
    raw += b" " * (len(raw) % 2)
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    ds.save_as(out)


def _copy_series(paths, folder, series_number: int, edit=None) -> None:
    """The series again under a new Series Instance UID (and new SOP Instance UIDs)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, series_number
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{i}.dcm")
        if edit is not None and i == 1:  # the second slice, so the first header alone looks fine
            edit(folder / f"{i}.dcm")


@pytest.mark.parametrize("keyword, raw, words", [
    ("ImageOrientationPatient", b"1\\0\\0\\0\\1", "ImageOrientationPatient has 5 values, expected 6"),
    ("PixelSpacing", b"a\\b", "PixelSpacing value 'a' is not a number"),
    ("ImagePositionPatient", b"nan\\nan\\nan", "ImagePositionPatient value nan is not a finite number"),
    ("PixelSpacing", b"inf\\1", "PixelSpacing value inf is not a finite number"),
    ("ImagePositionPatient", b"0\\0", "ImagePositionPatient has 2 values, expected 3"),
    ("Rows", b"\x00\x00", "image size 0 x"),
], ids=["iop_5_values", "spacing_not_a_number", "position_nan", "spacing_inf", "position_2_values", "rows_0"])
def test_a_series_with_odd_geometry_is_rejected_by_name_and_the_good_one_still_chosen(mixed_study, config, tmp_path,
                                                                                      keyword, raw, words):
    """A copy of the axial T2 (series 9) with one odd geometry value in its first or second
    slice: that series is rejected with a reason naming it, the file and the attribute (not
    Python's own error text), and the real T2 is still chosen."""
    import shutil

    shutil.copytree(mixed_study.root, tmp_path / "study")
    _copy_series(mixed_study.t2_paths, tmp_path / "study" / "copy", 9,
                 edit=lambda path: _raw_value(path, keyword, raw, path))
    selection = select_series(only_study(tmp_path / "study"), config.selection)
    assert selection.chosen is not None and selection.chosen.series_uid == mixed_study.t2_series_uid
    (odd,) = [d for d in selection.decisions if d.series_number == "9"]
    assert not odd.accepted and odd.reason.startswith("series 9: 1.dcm: ") and words in odd.reason, odd.reason
    assert "could not convert" not in odd.reason and "Error" not in odd.reason


def test_an_odd_echo_time_is_no_weighting(mixed_study, config, tmp_path):
    for path in mixed_study.t2_paths:
        _raw_value(path, "EchoTime", b"nan", tmp_path / path.name)
    selection = select_series(only_study(tmp_path), config.selection)
    assert selection.chosen is None
    assert "EchoTime missing or not a finite number" in selection.decisions[0].reason


def test_a_file_with_an_unknown_vr_in_a_uid_is_skipped_naming_the_file_and_the_rest_indexed(mixed_study, tmp_path,
                                                                                           caplog):
    """pydicom decodes values lazily and raises NotImplementedError for an unknown VR only when
    the value is first used: such a file is one input problem (named, with the reason, in the
    log), like any unreadable file; index_folder does not raise."""
    import shutil

    shutil.copytree(mixed_study.root, tmp_path / "study")
    victim = tmp_path / "study" / mixed_study.t2_paths[0].relative_to(mixed_study.root)
    data = bytearray(victim.read_bytes())
    at = data.index(b"\x20\x00\x0d\x00UI", 300)  # StudyInstanceUID, explicit VR
    data[at + 4:at + 6] = b"XY"
    victim.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="paraspinal.dicom_index"):
        index = index_folder(tmp_path / "study")
    assert [p.path for p in index.problems] == [victim]
    assert "Unknown Value Representation 'XY' in tag (0020,000D)" in index.problems[0].reason
    assert str(victim) in caplog.text and "input file skipped" in caplog.text
    (study,) = index.studies.values()
    assert study.n_instances == len(mixed_study.all_paths) - 1
