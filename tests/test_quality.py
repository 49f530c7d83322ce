"""Quality control: the review flag's checks (paraspinal.quality), its configuration, and the
test-time mirroring that gives the uncertainty score (paraspinal.segmentation)."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

from app.config import ConfigError, load_config
from paraspinal.preprocessing import LPS_TO_RAS
from paraspinal.quality import QualityError, QualitySettings, assess_muscle, missing_between, slice_fragments
from paraspinal.segmentation import infer_with_uncertainty, segment_stack_with_uncertainty, to_model_space
from paraspinal.stacks import StackVolume


def _blob(shape=(5, 40, 40), centre=(20, 20), radius=8, slices=range(5)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    rr, cc = np.mgrid[:shape[1], :shape[2]]
    disk = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2
    for k in slices:
        mask[k] |= disk
    return mask


def _assess(mask, *, csa=None, max_csa=800.0, asym=5.0, mirror=None, entropy=None, found=True, other=True,
            settings=QualitySettings()):
    csa = csa if csa is not None else [float(mask[k].sum()) for k in range(mask.shape[0])]
    return assess_muscle(muscle="multifidus", side="right", found=found, contralateral_found=other,
                         labels_mask=mask, slice_csa_mm2=csa, max_csa_mm2=max_csa, asymmetry_index_pct=asym,
                         mirror_disagreement=mirror or [0.05] * len(csa), entropy=entropy or [0.1] * len(csa),
                         settings=settings)


def test_a_plausible_certain_outline_gets_no_review_flag():
    q = _assess(_blob())
    assert not q.review_recommended and q.reasons == [] and q.checks == []
    assert q.uncertainty == pytest.approx(0.05) and q.uncertainty_kind == "mirror disagreement"
    assert q.summary == "no review flag"


def test_each_check_fires_with_a_reason_naming_it():
    two_pieces = _blob() | _blob(centre=(20, 34), radius=4, slices=[2])
    gap = _blob(slices=[0, 1, 3, 4])
    cases = {
        "uncertainty": _assess(_blob(), mirror=[0.4] * 5),
        "asymmetry": _assess(_blob(), asym=60.0),
        "csa": _assess(_blob(), max_csa=9000.0),
        "fragments": _assess(two_pieces),
        "gaps": _assess(gap),
        "one_side": _assess(np.zeros((5, 40, 40), bool), found=False),
        "absent": _assess(np.zeros((5, 40, 40), bool), found=False, other=False),
    }
    for check, q in cases.items():
        assert q.review_recommended and q.checks == [check], (check, q.reasons)
    assert "0.40 > 0.15" in cases["uncertainty"].reasons[0]
    assert "60 % > 35 %" in cases["asymmetry"].reasons[0]
    assert "slice(s) 3" in cases["fragments"].reasons[0]
    assert "slice(s) 3 between" in cases["gaps"].reasons[0]
    assert "other side" in cases["one_side"].reasons[0]


def test_a_muscle_that_may_lie_outside_the_stack_absent_on_both_sides_is_not_flagged():
    q = assess_muscle(muscle="quadratus lumborum", side="right", found=False, contralateral_found=False,
                      labels_mask=np.zeros((5, 40, 40), bool), slice_csa_mm2=[0.0] * 5, max_csa_mm2=0.0,
                      asymmetry_index_pct=None, mirror_disagreement=[None] * 5, entropy=[None] * 5,
                      settings=QualitySettings())
    assert not q.review_recommended and q.uncertainty is None


def test_multifidus_found_on_neither_side_is_flagged_as_a_likely_failure():
    """Every lumbar level holds multifidus and erector spinae: a model that failed on a series (held-out
    fold models on tum01 with real air, model card 'Background') finds none, which must not pass quietly."""
    q = _assess(np.zeros((5, 40, 40), bool), found=False, other=False)
    assert q.review_recommended and q.checks == ["absent"] and q.uncertainty is None
    assert "not found on either side" in q.reasons[0] and "may have failed" in q.reasons[0]
    quiet = _assess(np.zeros((5, 40, 40), bool), found=False, other=False,
                    settings=QualitySettings(always_present=("erector spinae",)))
    assert not quiet.review_recommended
    with pytest.raises(QualityError, match="always_present: unknown muscle"):
        QualitySettings(always_present=("multifidus", "gluteus"))
    config = load_config(environ={})
    assert config.quality.always_present == ("multifidus", "erector spinae")
    with pytest.raises(ConfigError, match=r"\[quality\].*always_present"):
        _load_with_site({"quality": {"always_present": "multifidus"}})


def test_uncertainty_is_csa_weighted_and_falls_back_to_entropy_without_mirroring():
    mask = _blob()
    csa = [100.0, 100.0, 200.0, 0.0, 0.0]
    q = _assess(mask, csa=csa, mirror=[0.1, 0.1, 0.4, 0.9, None])
    assert q.uncertainty == pytest.approx((0.1 * 100 + 0.1 * 100 + 0.4 * 200) / 400)
    assert q.slice_uncertainty == [0.1, 0.1, 0.4, None, None]  # absent slices carry no score
    assert q.uncertain_slices == [2]
    q = _assess(mask, mirror=[None] * 5, entropy=[0.3] * 5)
    assert q.uncertainty_kind == "predictive entropy" and q.uncertainty == pytest.approx(0.3)


def test_fragment_and_gap_helpers():
    small_second = _blob() | _blob(centre=(20, 36), radius=1, slices=[1])
    assert slice_fragments(small_second, 0.2) == []  # a speck is not a second piece
    assert slice_fragments(small_second, 0.01) == [1]
    assert missing_between([False, True, False, False, True, False]) == [2, 3]
    assert missing_between([True]) == []


def test_quality_settings_validate_and_load_from_the_config():
    with pytest.raises(QualityError, match="uncertainty_threshold"):
        QualitySettings(uncertainty_threshold=0.0)
    with pytest.raises(QualityError, match="max_csa_range_mm2.multifidus"):
        QualitySettings(max_csa_range_mm2={"multifidus": (500.0, 100.0)})
    config = load_config(environ={"PARASPINAL__QUALITY__ASYMMETRY_MAX_PCT": "20"})
    assert config.quality.asymmetry_max_pct == 20.0
    assert config.quality.max_csa_range_mm2["psoas major"] == (100.0, 3500.0)
    with pytest.raises(ConfigError, match=r"\[quality\].*unknown"):
        _load_with_site({"quality": {"nope": 1}})
    with pytest.raises(ConfigError, match=r"\[quality\].*fragment_min_share"):
        load_config(environ={"PARASPINAL__QUALITY__FRAGMENT_MIN_SHARE": "2"})


def _load_with_site(site: dict):
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(site, handle)
    return load_config(handle.name, environ={})


# --- test-time mirroring and the per-slice uncertainty ------------------------------------------

@pytest.fixture(scope="module")
def real_stack(real_data) -> StackVolume:
    """The MuscleMap case as a stack at 1.0 mm in-plane spacing (so the model space is a pure
    reorientation of the source grid and mirroring commutes exactly with it)."""
    image = nib.load(str(real_data / "musclemap_sub0001_image.nii.gz"))
    ras = np.asarray(image.affine, dtype=np.float64)
    affine_lps = LPS_TO_RAS @ ras
    affine_lps[:3, 0] /= np.linalg.norm(affine_lps[:3, 0])
    affine_lps[:3, 1] /= np.linalg.norm(affine_lps[:3, 1])
    pixels = np.asanyarray(image.dataobj).astype(np.float32).transpose(2, 1, 0)[:6]  # (slice, row, col)
    return StackVolume("1.2.3", 1, [], np.ascontiguousarray(pixels), affine_lps, (1.0, 1.0),
                       float(np.linalg.norm(affine_lps[:3, 2])))


@pytest.fixture(scope="module")
def mirroring_bundle(bundle):
    return dataclasses.replace(bundle, test_time_mirror=True)


def test_mirrored_inference_is_exactly_left_right_equivariant(real_stack, mirroring_bundle):
    """With test-time mirroring the prediction of the mirrored image is the mirrored prediction with
    right and left swapped: a wrong flip axis or channel swap breaks this."""
    mirrored = dataclasses.replace(real_stack, pixels=np.ascontiguousarray(real_stack.pixels[:, :, ::-1]))
    p, _ = infer_with_uncertainty(to_model_space(real_stack, mirroring_bundle), mirroring_bundle)
    q, _ = infer_with_uncertainty(to_model_space(mirrored, mirroring_bundle), mirroring_bundle)
    swap = [0, 2, 1, 4, 3, 6, 5, 8, 7]
    expected = torch.flip(p.as_tensor(), dims=(1,))[swap]
    assert torch.allclose(q.as_tensor(), expected, atol=1e-4)
    # without mirroring the network alone is not equivariant: the test can tell the difference
    plain = dataclasses.replace(mirroring_bundle, test_time_mirror=False)
    p0, _ = infer_with_uncertainty(to_model_space(real_stack, plain), plain)
    q0, _ = infer_with_uncertainty(to_model_space(mirrored, plain), plain)
    assert not torch.allclose(q0.as_tensor(), torch.flip(p0.as_tensor(), dims=(1,))[swap], atol=1e-4)


def test_per_slice_uncertainty_follows_the_source_slice_order(real_stack, mirroring_bundle):
    """A stack stored feet-to-head and the same stack stored head-to-feet give the same scores,
    each in its own slice order (the model space runs one way only)."""
    n = real_stack.n_slices
    reversed_affine = real_stack.affine_lps.copy()
    reversed_affine[:3, 3] = real_stack.affine_lps[:3, 3] + (n - 1) * real_stack.affine_lps[:3, 2]
    reversed_affine[:3, 2] *= -1
    flipped = dataclasses.replace(real_stack, pixels=np.ascontiguousarray(real_stack.pixels[::-1]),
                                  affine_lps=reversed_affine)
    labels_a, a = segment_stack_with_uncertainty(real_stack, mirroring_bundle)
    labels_b, b = segment_stack_with_uncertainty(flipped, mirroring_bundle)
    assert np.array_equal(labels_a, labels_b[::-1])
    for label in (1, 3, 5):
        assert a.mirror_disagreement[label] == b.mirror_disagreement[label][::-1]
        assert a.entropy[label] == b.entropy[label][::-1]
        assert any(v is not None and v > 0 for v in a.mirror_disagreement[label])
