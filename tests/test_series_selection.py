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
