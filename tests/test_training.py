"""Fast tests of the training package (tiny networks, a few iterations; < 90 s in all).

They need the shared real fixtures (../shared/data/real) for the training-run tests and
skip those when the folder is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from scipy import ndimage

from paraspinal.model_bundle import load_bundle, parse_labels, read_metadata
from training.data import REAL_DATA_DIR, LoadedCase, case_slices, real_cases, site_cases, to_model_space
from training.labels import LABELS_JSON, NUM_CLASSES, label_name
from training.losses import MarginalDiceCELoss
from training.metrics import binary_metrics, label_metrics
from training.postprocess import postprocess_labels

HAS_REAL = (REAL_DATA_DIR / "musclemap_sub0001_image.nii.gz").is_file()
needs_real = pytest.mark.skipif(not HAS_REAL, reason="shared real fixtures not present")
TINY = ["--channels", "4", "8", "16", "--batch-size", "2", "--threads", "1"]


# ------------------------------------------------------------------ loss
def _confident_logits(classes: torch.Tensor, num_classes: int = NUM_CLASSES, margin: float = 8.0) -> torch.Tensor:
    """(B, C, H, W) logits that predict ``classes`` (B, H, W) with high confidence."""
    return torch.nn.functional.one_hot(classes, num_classes).movedim(-1, 1).float() * margin


def test_marginal_loss_equals_monai_dicece_when_fully_labelled():
    torch.manual_seed(0)
    logits = torch.randn(3, NUM_CLASSES, 24, 24)
    target = torch.randint(0, NUM_CLASSES, (3, 1, 24, 24))
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    assert torch.allclose(MarginalDiceCELoss()(logits, target), expected, atol=1e-5)


def test_marginal_loss_batch_dice_equals_monai_batch_dicece():
    torch.manual_seed(1)
    logits = torch.randn(4, NUM_CLASSES, 16, 16)
    target = torch.randint(0, NUM_CLASSES, (4, 1, 16, 16))
    expected = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(logits, target)
    assert torch.allclose(MarginalDiceCELoss(batch=True)(logits, target), expected, atol=1e-5)


@pytest.mark.parametrize("batch", [False, True])
def test_marginal_loss_psoas_prediction_free_in_either_dice_mode(batch: bool):
    target = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    target[..., 4:12, 4:12] = 1
    target[1, :, 20:28, 20:28] = 5  # the fully labelled sample has psoas there
    pred_bg = target[:, 0].clone()
    pred_bg[0, 20:28, 20:28] = 0
    pred_psoas = pred_bg.clone()
    pred_psoas[0, 20:28, 20:28] = 5  # psoas predicted in the partially labelled sample
    labelled = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0, 0], [1] * 9], dtype=torch.float32)
    loss = MarginalDiceCELoss(batch=batch)
    assert torch.allclose(loss(_confident_logits(pred_psoas), target, labelled),
                          loss(_confident_logits(pred_bg), target, labelled), atol=1e-6)


def test_marginal_loss_psoas_prediction_free_only_where_psoas_is_unlabelled():
    # Reference: multifidus R (1) in a block, everything else 0.
    target = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    target[..., 4:12, 4:12] = 1
    as_background = target[:, 0].clone()
    with_psoas = as_background.clone()
    with_psoas[:, 20:28, 20:28] = 5  # psoas R predicted where the reference says 0
    myosegmentum = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    musclemap = torch.ones(1, NUM_CLASSES)
    loss = MarginalDiceCELoss()
    free = loss(_confident_logits(with_psoas), target, myosegmentum)
    baseline = loss(_confident_logits(as_background), target, myosegmentum)
    assert torch.allclose(free, baseline, atol=1e-6)  # costs nothing where psoas is not annotated
    costly = loss(_confident_logits(with_psoas), target, musclemap)
    assert costly > loss(_confident_logits(as_background), target, musclemap) + 0.5

    # Psoas predicted inside the labelled multifidus still costs, even for MyoSegmenTUM.
    inside = as_background.clone()
    inside[:, 4:12, 4:12] = 5
    assert loss(_confident_logits(inside), target, myosegmentum) > baseline + 0.5


def test_side_agnostic_term_rewards_the_right_muscle_on_the_wrong_side():
    target = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    target[..., 8:20, 8:20] = 5  # psoas R
    wrong_side = target[:, 0].clone()
    wrong_side[wrong_side == 5] = 6
    missed = torch.zeros_like(wrong_side)
    plain, aware = MarginalDiceCELoss(batch=True), MarginalDiceCELoss(batch=True, lambda_side_agnostic=0.5)
    gap_plain = plain(_confident_logits(missed), target) - plain(_confident_logits(wrong_side), target)
    gap_aware = aware(_confident_logits(missed), target) - aware(_confident_logits(wrong_side), target)
    assert gap_aware > gap_plain + 0.1  # the muscle type is right, only the side is wrong
    assert aware(_confident_logits(target[:, 0]), target) < aware(_confident_logits(wrong_side), target)


def test_marginal_loss_rejects_target_of_unlabelled_class():
    target = torch.full((1, 1, 8, 8), 6, dtype=torch.long)
    with pytest.raises(ValueError):
        MarginalDiceCELoss()(torch.zeros(1, NUM_CLASSES, 8, 8), target, torch.tensor([[1.0] * 5 + [0.0] * 4]))


# ------------------------------------------------------------------ metrics
def _squares() -> tuple[np.ndarray, np.ndarray]:
    """Two 10x10 squares on a 30x30 grid overlapping in 5x10 pixels."""
    a = np.zeros((30, 30), dtype=bool)
    b = np.zeros((30, 30), dtype=bool)
    a[5:15, 10:20] = True
    b[10:20, 10:20] = True
    return a, b


def _assd_reference(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Independent ASSD: boundary = mask minus its erosion; mean over both boundaries."""
    edge_a = a & ~ndimage.binary_erosion(a)
    edge_b = b & ~ndimage.binary_erosion(b)
    to_b = ndimage.distance_transform_edt(~edge_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~edge_a, sampling=spacing)
    distances = np.concatenate([to_b[edge_a], to_a[edge_b]])
    return float(distances.mean())


def test_metrics_on_two_overlapping_squares():
    a, b = _squares()  # prediction a, reference b: TP 50, FP 50, FN 50, TN 900 - 150 = 750
    m = binary_metrics(a, b, (1.0, 1.0))
    assert m["dice"] == pytest.approx(0.5)
    assert m["jaccard"] == pytest.approx(1 / 3)
    assert m["conformity"] == pytest.approx(-1.0)  # (3 * 0.5 - 2) / 0.5
    assert m["tpr"] == pytest.approx(0.5)
    assert m["ppv"] == pytest.approx(0.5)
    assert m["tnr"] == pytest.approx(750 / 800)
    assert m["volume_ratio"] == pytest.approx(1.0)
    assert m["volume_ref_ml"] == pytest.approx(100 / 1000)
    assert m["assd_mm"] == pytest.approx(_assd_reference(a, b, (1.0, 1.0)), rel=1e-5)
    # Physical units: doubling the spacing doubles distances and multiplies areas by 4.
    m2 = binary_metrics(a, b, (2.0, 2.0))
    assert m2["assd_mm"] == pytest.approx(2 * m["assd_mm"], rel=1e-5)
    assert m2["volume_ref_ml"] == pytest.approx(4 * m["volume_ref_ml"])


def test_identical_masks_and_unevaluated_labels():
    ref = np.zeros((20, 20, 3), dtype=np.uint8)
    ref[2:8, 2:8] = 1
    pred = ref.copy()
    pred[12:18, 12:18] = 5  # a label the reference does not annotate: not counted against label 1
    (row,) = label_metrics(pred, ref, [1], (1.0, 1.0, 4.0))
    assert row["dice"] == pytest.approx(1.0)
    assert row["assd_mm"] == pytest.approx(0.0)
    assert row["volume_ref_ml"] == pytest.approx(36 * 3 * 4 / 1000)



def test_error_breakdown_tells_a_shifted_boundary_from_a_smaller_muscle():
    from training.metrics import error_breakdown, error_breakdown_table

    ref = np.zeros((20, 20, 2), dtype=np.uint8)
    ref[2:10, 2:6] = 1  # multifidus R: 8 x 4 x 2 = 64 voxels
    ref[2:10, 6:12] = 3  # erector spinae R beside it
    pred = ref.copy()
    pred[2:10, 6:7] = 1  # the boundary drawn one column into erector spinae: 16 voxels
    pred[2:4, 2:6] = 0  # and multifidus drawn 2 rows shorter: 16 voxels missed to background
    mf, es = error_breakdown(pred, ref, [1, 3])
    assert (mf["ref_voxels"], mf["pred_voxels"]) == (64, 64)
    assert mf["missed_to_background"] == 16 and mf["missed_to_other"] == {}
    assert mf["extra_from_other"] == {3: 16} and mf["extra_from_background"] == 0
    assert es["missed_to_other"] == {1: 16} and es["missed_to_background"] == 0
    table = error_breakdown_table([mf, es])
    assert "| multifidus R | 64 | 25.0 % | 0 % | 0.0 % | erector spinae R 25.0 % |" in table

# ------------------------------------------------------------------ post-processing
def test_postprocess_keeps_largest_component_and_fills_holes_into_background_only():
    labels = np.zeros((40, 40, 5), dtype=np.uint8)
    labels[5:20, 5:20, :] = 1
    labels[10, 10, 2] = 0  # a hole (fatty streak) inside muscle 1
    labels[12, 12, 2] = 3  # a voxel of another muscle inside muscle 1: must survive
    labels[30:33, 30:33, 1:3] = 1  # a small island of label 1: removed
    out = postprocess_labels(labels, (0.9, 0.9, 4.4))
    assert out[10, 10, 2] == 1
    assert out[12, 12, 2] == 3
    assert not (out[30:33, 30:33] == 1).any()
    assert out.dtype == labels.dtype and out.shape == labels.shape


def test_postprocess_fills_holes_across_the_thick_slice_axis_only():
    # Slice axis = the largest spacing, here axis 0 (a (slice, row, col) array).
    labels = np.zeros((4, 12, 12), dtype=np.uint8)
    labels[:, 2:10, 2:10] = 2
    labels[1, 5:7, 5:7] = 0
    out = postprocess_labels(labels, (4.0, 0.8, 0.8))
    assert (out[1, 5:7, 5:7] == 2).all()


# ------------------------------------------------------------------ data
@needs_real
def test_real_cases_are_in_patient_laterality_in_model_space():
    case = real_cases()["myosegmentum_tum01"].load()
    assert set(np.unique(case.label)) == {0, 1, 2, 3, 4}  # remapped to the bundle numbering
    label = to_model_space(case)["label"][0].numpy()
    centre_i = {v: np.argwhere(label == v)[:, 0].mean() for v in (1, 2, 3, 4)}
    # RAS: voxel axis 0 increases towards the patient's right.
    assert centre_i[1] > centre_i[2] and centre_i[3] > centre_i[4]
    assert centre_i[3] > centre_i[1]  # erector spinae lateral to multifidus


def test_site_cases_read_pairs_and_dataset_json(tmp_path: Path):
    affine = np.diag([0.8, 0.8, 4.0, 1.0])
    image = np.random.default_rng(0).uniform(1, 100, (32, 32, 4)).astype(np.float32)
    label = np.zeros((32, 32, 4), dtype=np.uint8)
    label[4:10, 4:10] = 1
    label[20:26, 4:10] = 2
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "s01_image.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "s01_label.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"label_map": {"1": 3, "2": 1},
                                                       "labelled_classes": [0, 1, 2, 3, 4]}))
    cases = site_cases(tmp_path)
    loaded = cases["site:s01"].load()
    assert set(np.unique(loaded.label)) == {0, 1, 3}
    assert loaded.labelled_classes == (0, 1, 2, 3, 4)
    items = case_slices(loaded).items
    assert len(items) == 4 and items[0]["image"].shape == (1, 26, 26)  # 32 x 0.8 mm -> 1 mm grid


# ------------------------------------------------------------------ training, export, evaluation
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    if not HAS_REAL:
        pytest.skip("shared real fixtures not present")
    from training.train import main

    root = tmp_path_factory.mktemp("tiny")
    bundle = root / "bundle"
    rc = main(["--out", str(root / "run"), "--cases", "musclemap_sub0001", "--holdout", "myosegmentum_tum01",
               "--iterations", "3", "--checkpoint-every", "3", *TINY, "--export", str(bundle)])
    assert rc == 0
    return bundle


def test_tiny_training_run_produces_a_loadable_bundle(tiny_bundle: Path):
    bundle = load_bundle(tiny_bundle, "cpu")
    assert bundle.num_classes == NUM_CLASSES
    with torch.no_grad():
        out = bundle.network(torch.zeros(2, 1, 64, 48))
    assert tuple(out.shape) == (2, NUM_CLASSES, 64, 48)
    meta = bundle.metadata
    reference = json.loads(LABELS_JSON.read_text())
    assert meta["labels"] == reference["labels"] and meta["laterality"] == reference["laterality"]
    assert parse_labels(meta)[0].name == "multifidus right"
    for key in ("name", "version", "description", "authors", "license", "monai_version", "pytorch_version",
                "task", "network_data_format", "network_def", "preprocessing", "postprocessing", "training",
                "evaluation"):
        assert key in meta, key
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == NUM_CLASSES
    assert meta["preprocessing"]["roi_size"] == [256, 256] and meta["preprocessing"]["orientation"] == "RAS"
    assert meta["training"]["iterations"] == 3 and meta["training"]["held_out"] == ["myosegmentum_tum01"]
    assert (tiny_bundle / "docs" / "README.md").read_text().count("RESEARCH USE ONLY") == 1


def test_export_refuses_weights_above_the_commit_limit_unless_the_limit_is_lifted(tiny_bundle: Path,
                                                                                    tmp_path: Path):
    """Weights meant for models/ stay under the repository's size limit; an experiment bundle kept in
    output/ (e.g. a wider network) can lift it with --max-weights-mb 0."""
    from training.export import main as export_main

    checkpoint = tiny_bundle.parent / "run" / "checkpoint.pt"
    with pytest.raises(RuntimeError, match="limit for committed weights"):
        export_main([str(checkpoint), "--out", str(tmp_path / "small"), "--max-weights-mb", "0.001"])
    assert export_main([str(checkpoint), "--out", str(tmp_path / "free"), "--max-weights-mb", "0"]) == 0
    assert load_bundle(tmp_path / "free", "cpu").num_classes == NUM_CLASSES


def test_commit_size_limit_applies_only_to_bundles_exported_into_models(tmp_path: Path):
    """``train --export`` and ``export`` without --max-weights-mb: a wide experiment network exported to
    output/ must not fail after hours of training; one exported into models/ is still held to the limit."""
    from training.export import COMMITTED_MODELS_DIR, MAX_WEIGHTS_MB, weights_limit_for

    assert weights_limit_for(COMMITTED_MODELS_DIR / "paraspinal_t2ax") == MAX_WEIGHTS_MB
    assert weights_limit_for(COMMITTED_MODELS_DIR.parent / "output" / "long" / "bundles" / "wide") is None
    assert weights_limit_for(tmp_path / "models" / "paraspinal_t2ax") is None  # another tree's models/


def test_resume_continues_exactly(tmp_path: Path):
    if not HAS_REAL:
        pytest.skip("shared real fixtures not present")
    from training.train import main

    # with every augmentation of the 0.3.0 recipe: their random draws must be seeded per epoch too
    common = ["--cases", "myosegmentum_tum01", "--holdout", "--checkpoint-every", "2", "--geometry", "strong",
              "--label-synthesis", "0.5", "--dixon-contrasts", "0.7", *TINY]
    assert main(["--out", str(tmp_path / "full"), "--iterations", "4", *common]) == 0
    assert main(["--out", str(tmp_path / "split"), "--iterations", "4", "--stop-at", "2", *common]) == 0
    assert torch.load(str(tmp_path / "split" / "checkpoint.pt"), weights_only=False)["iteration"] == 2
    assert main(["--out", str(tmp_path / "split"), "--iterations", "4", "--resume", *common]) == 0
    full = torch.load(str(tmp_path / "full" / "checkpoint.pt"), weights_only=False)
    split = torch.load(str(tmp_path / "split" / "checkpoint.pt"), weights_only=False)
    assert split["iteration"] == full["iteration"] == 4
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key


def test_weight_average_of_two_bundles_is_their_element_wise_mean(tiny_bundle: Path, tmp_path: Path):
    import shutil

    from training.average_weights import average_bundles, main

    shifted = tmp_path / "shifted"
    shutil.copytree(tiny_bundle, shifted)
    model = torch.jit.load(str(shifted / "models" / "model.ts"))
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    torch.jit.save(model, str(shifted / "models" / "model.ts"))
    out = average_bundles([tiny_bundle, shifted], tmp_path / "average")
    original = torch.jit.load(str(tiny_bundle / "models" / "model.ts")).state_dict()
    averaged = load_bundle(out, "cpu")
    for key, value in averaged.network.state_dict().items():
        expected = original[key] + 0.5 if original[key].is_floating_point() else original[key]
        assert torch.allclose(value, expected, atol=1e-6), key
    assert averaged.metadata["weights_average"]["of"] == [str(tiny_bundle), str(shifted)]
    assert main([str(tiny_bundle), "--out", str(tmp_path / "one")]) == 2  # one bundle is no average


def test_training_with_background_noise_gives_tum01_real_air_and_leaves_musclemap_alone():
    """--background-noise: a masked (exactly-0) background is z-scored dark like a real scan's air
    instead of staying at 0 (mid grey); a scanner's own few zeros (MuscleMap) are not touched."""
    if not HAS_REAL:
        pytest.skip("shared real fixtures not present")
    from training.train import TrainConfig, _with_real_air

    cases = real_cases()
    tum01, musclemap = cases["myosegmentum_tum01"].load(), cases["musclemap_sub0001"].load()
    on = TrainConfig(out="unused", cases=[], holdout=[], background_noise=2.0, seed=3)
    filled = _with_real_air(tum01, on)
    assert (tum01.image == 0).mean() > 0.5 and (filled.image == 0).mean() < 0.001
    assert filled.components.keys() == tum01.components.keys()
    assert _with_real_air(musclemap, on) is musclemap  # 6 % zeros at its edges: a scanner's, not a mask
    assert _with_real_air(tum01, TrainConfig(out="unused", cases=[], holdout=[])) is tum01  # off by default: 0.5.0's recipe
    # in the model space the air is now darker than the muscles, where the masked air sat at 0 above them
    before, after = to_model_space(tum01)["image"][0].numpy(), to_model_space(filled)["image"][0].numpy()
    label = to_model_space(tum01)["label"][0].numpy() > 0
    air = to_model_space(tum01)["image"][0].numpy() == 0
    assert np.all(before[air] == 0) and after[air].mean() < after[label].mean() - 1.0


def test_field_of_view_crop_keeps_the_muscles_renormalises_and_sets_the_pad_value():
    from training.transforms import RandFieldOfViewd

    rng = np.random.default_rng(0)
    image = torch.zeros(3, 400, 400)
    image[:, 40:360, 60:340] = torch.from_numpy(rng.normal(5.0, 2.0, (3, 320, 280)).astype(np.float32))
    label = torch.zeros(1, 400, 400, dtype=torch.int64)
    label[0, 180:220, 150:190] = 3  # the muscles, posterior (low axis-1 index) of the centre
    item = {"image": image, "label": label, "labelled": torch.ones(NUM_CLASSES), "pad_value": 0.0}
    transform = RandFieldOfViewd(prob=1.0, fov_mm=(150.0, 150.0))
    transform.set_random_state(3)
    out = transform(item)
    assert tuple(out["image"].shape) == (3, 150, 150) and tuple(out["label"].shape) == (1, 150, 150)
    assert int((out["label"] == 3).sum()) == 40 * 40  # the muscles stay whole inside the field of view
    middle = out["image"][1][out["image"][1] != 0]
    assert abs(float(middle.mean())) < 1e-4 and abs(float(middle.std()) - 1.0) < 1e-3
    assert out["pad_value"] == float(out["image"].min())
    never = RandFieldOfViewd(prob=0.0)
    assert never(item)["image"] is image


def test_wide_gamma_spans_both_real_subjects_muscle_to_fat_contrast():
    """Muscle at 6 % of the intensity range (MuscleMap T2 TSE) must be able to reach 27 % (tum01's
    water + fat sum) and back: gamma 0.48 / 2.1, outside the default 0.6-1.6."""
    from training.transforms import RandContrastd

    levels = torch.tensor([0.064, 0.27])
    default, wide = RandContrastd(keys=("image",)), RandContrastd(keys=("image",), gamma=(0.4, 2.5))
    reached = {"default": set(), "wide": set()}
    for name, transform in (("default", default), ("wide", wide)):
        transform.set_random_state(0)
        for _ in range(200):
            low, high = (float(v) for v in transform._gamma(levels))
            reached[name] |= {"T2 -> in-phase"} if low > 0.25 else set()
            reached[name] |= {"in-phase -> T2"} if high < 0.08 else set()
    assert reached["wide"] == {"T2 -> in-phase", "in-phase -> T2"} and reached["default"] == set()
    with pytest.raises(ValueError, match="gamma"):
        RandContrastd(keys=("image",), gamma=(1.2, 2.0))


def test_air_margin_frames_the_body_with_dark_noise_and_keeps_every_muscle_voxel():
    from training.transforms import RandAirMargind

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(0.0, 1.0, (3, 200, 180)).astype(np.float32))
    label = torch.zeros(1, 200, 180, dtype=torch.int64)
    label[0, 90:130, 40:70] = 3
    label[0, 90:130, 110:140] = 4
    item = {"image": image, "label": label, "labelled": torch.ones(NUM_CLASSES), "pad_value": -2.0}
    for seed in range(6):
        transform = RandAirMargind(prob=1.0, margin_mm=(20, 60), ellipse_prob=1.0)
        transform.set_random_state(seed)
        out = transform(item)
        framed, lab = out["image"], out["label"]
        assert framed.shape[1] >= 240 and framed.shape[2] >= 220 and lab.shape[1:] == framed.shape[1:]
        assert int((lab == 3).sum()) == 40 * 30 and int((lab == 4).sum()) == 40 * 30  # no muscle cut
        # The frame (and the cut outside the ellipse) is air: at the darkest value plus a little noise.
        corner = framed[:, :20, :20]
        assert float(corner.min()) >= -2.0 and float(corner.max()) < -2.0 + 0.5
        assert float((framed <= -1.5).float().mean()) > 0.3
        # Inside the body, the image is untouched: the muscles' voxels keep their values.
        where = lab[0] == 3
        assert torch.equal(framed[:, where], image[:, label[0] == 3])
    never = RandAirMargind(prob=0.0)
    assert never(item)["image"] is image


@needs_real
def test_evaluation_on_a_clinical_field_of_view_crops_around_the_spine(tiny_bundle: Path, tmp_path: Path):
    from training.data import real_cases
    from training.evaluate import field_of_view, main

    case = dict(real_cases())["myosegmentum_tum01"].load()
    crop = field_of_view(case, 160.0)
    assert crop.image.shape[:2] == (157, 157) and crop.image.shape[2] == case.image.shape[2]
    assert int((crop.label > 0).sum()) == int((case.label > 0).sum())  # every muscle voxel inside
    # the crop's affine places its voxels where they were: crop voxel (0, 0, 0) is a case voxel
    # whose block of the crop's size holds the crop's intensities
    origin = np.linalg.solve(case.affine_ras, crop.affine_ras @ np.array([0.0, 0.0, 0.0, 1.0]))[:3]
    i, j, k = (int(round(v)) for v in origin)
    assert np.allclose(origin, (i, j, k), atol=1e-4) and k == 0
    assert np.array_equal(case.image[i:i + 157, j:j + 157], crop.image)
    out = tmp_path / "fov"
    assert main(["--bundle", str(tiny_bundle), "--case", "myosegmentum_tum01", "--fov-mm", "160",
                 "--out", str(out)]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["cases"][0]["fov_mm"] == 160.0 and report["cases"][0]["shape"][:2] == [157, 157]
    assert "160 mm field of view" in (out / "evaluation.md").read_text()
    assert report["cases"][0]["padding"] == "reflect"  # the tiny bundle is exported as the shipped one pads
    assert main(["--bundle", str(tiny_bundle), "--case", "myosegmentum_tum01", "--fov-mm", "160",
                 "--padding", "minimum", "--out", str(out)]) == 0
    assert json.loads((out / "evaluation.json").read_text())["cases"][0]["padding"] == "minimum"
    assert "padded by minimum" in (out / "evaluation.md").read_text()


def test_background_noise_fills_only_the_masked_air_and_is_recorded(tiny_bundle: Path, tmp_path: Path):
    """tum01's air is masked to exactly 0; a real scan's is noise (the evaluation option that shows
    what that does to the held-out figure)."""
    if not HAS_REAL:
        pytest.skip("shared real fixtures not present")
    from training.data import CaseError, real_cases
    from training.data import with_background_noise
    from training.evaluate import main

    case = dict(real_cases())["myosegmentum_tum01"].load()
    noisy = with_background_noise(case, 1.0)
    air = case.image == 0
    assert np.array_equal(noisy.image[~air], case.image[~air])  # the body is untouched
    median = float(np.median(case.image[~air]))
    # Rayleigh noise of sigma = 1 % of the median: mean sigma * sqrt(pi / 2)
    assert noisy.image[air].min() >= 0 and noisy.image[air].mean() == pytest.approx(0.01 * median * 1.2533, rel=0.02)
    assert np.array_equal(with_background_noise(case, 1.0).image, noisy.image)  # seeded: repeatable
    with pytest.raises(CaseError, match="no zero-valued background"):
        with_background_noise(noisy, 1.0)
    out = tmp_path / "noise"
    assert main(["--bundle", str(tiny_bundle), "--case", "myosegmentum_tum01", "--background-noise", "1",
                 "--out", str(out)]) == 0
    assert json.loads((out / "evaluation.json").read_text())["cases"][0]["background_noise_pct"] == 1.0
    assert "Rayleigh noise, 1 % of the median" in (out / "evaluation.md").read_text()


def test_warm_restart_records_the_run_it_continues_in_the_card(tmp_path: Path):
    if not HAS_REAL:
        pytest.skip("shared real fixtures not present")
    from training.model_card import render_model_card
    from training.train import main

    common = ["--cases", "myosegmentum_tum01", "--holdout", "--checkpoint-every", "2", *TINY]
    assert main(["--out", str(tmp_path / "first"), "--iterations", "2", "--seed", "3", *common]) == 0
    first = tmp_path / "first" / "checkpoint.pt"
    assert main(["--out", str(tmp_path / "restart"), "--iterations", "2", "--lr", "5e-4", "--init", str(first),
                 "--export", str(tmp_path / "bundle"), *common]) == 0
    first_run = torch.load(str(first), weights_only=False)
    recipe = load_bundle(tmp_path / "bundle", "cpu").metadata["training"]["recipe"]
    assert recipe["init"] == str(first)
    assert recipe["init_run"]["iterations"] == 2 and recipe["init_run"]["seed"] == 3
    assert recipe["init_run"]["lr"] == 1e-3 and recipe["init_run"]["init"] is None
    assert recipe["init_run"]["train_loop_s"] == round(first_run["elapsed_s"], 1)
    card = render_model_card(load_bundle(tmp_path / "bundle", "cpu").metadata)
    assert "an earlier run of 2 iterations (seed 3, lr 0.001, cosine schedule, the same data)" in card
    assert "itself started from random (MONAI default initialisation)" in card
    assert "min for the run(s) it continues" in card


def test_held_out_figure_weighs_each_held_out_subject_equally_whatever_its_number_of_seeds():
    from training.compare import fold_mean_dice

    def run(case: str, dice: float) -> tuple[str, dict]:
        return case, {"cases": [{"case": case, "rows": [{"label": 1, "dice": dice}]},
                                {"case": "synthetic_test_0", "rows": [{"label": 1, "dice": 1.0}]}]}

    # fold A two seeds (0.8, 0.9 -> 0.85), fold B one (0.6): (0.85 + 0.6) / 2, not (0.8 + 0.9 + 0.6) / 3
    assert fold_mean_dice([run("tum01", 0.8), run("tum01", 0.9), run("musclemap", 0.6)]) == {"1": 0.725}


def test_qc_validation_reports_each_real_held_out_case_beside_the_pooled_figure():
    from training.qc_validation import record_groups

    def rec(case: str, dice: float) -> dict:
        return {"case": case, "dice": dice, "pred_voxels": 10, "mirror_disagreement": 1 - dice}

    records = [rec("tum01", 0.7), rec("tum01", 0.9), rec("musclemap", 0.5), rec("synthetic_test_0", 0.98)]
    groups = record_groups(records)
    assert sorted(groups) == ["all", "real held-out", "real held-out · musclemap", "real held-out · tum01",
                              "synthetic"]
    assert len(groups["real held-out · tum01"]) == 2 and len(groups["real held-out"]) == 3
    assert "real held-out · tum01" not in record_groups(records[:2] + records[3:])  # one real case: no split


def test_model_card_shows_this_recipes_checks_before_the_limits_and_earlier_cards_after_newest_first():
    from training.model_card import render_model_card

    checks = [{"title": "Old ablation [0.3.0 card]", "text": "a"}, {"title": "Folds [0.5.1 card]", "text": "b"},
              {"title": "Timing [0.5.1 card]", "text": "c"}, {"title": "Folds of this recipe", "text": "d"},
              {"title": "QC of this recipe", "text": "e"}]
    card = render_model_card({"name": "m", "version": "1.0.0", "evaluation": {
        "measured": False, "cross_validation": {"method": "folds", "per_label_dice": {"1": 0.7}},
        "recipe_checks": checks}})
    order = [card.index(f"### Recipe check: {c}") for c in
             ("Folds of this recipe", "QC of this recipe")] + [card.index("## Limits"), card.index(
                 "## Earlier recipe checks")] + [card.index(f"### Recipe check: {c}") for c in
                                                 ("Folds [0.5.1", "Timing [0.5.1", "Old ablation [0.3.0")]
    assert order == sorted(order)


def test_shipped_model_card_is_the_rendering_of_its_metadata():
    from training.export import METADATA_RELPATH, README_RELPATH
    from training.model_card import render_model_card

    bundle = Path(__file__).resolve().parents[1] / "models" / "paraspinal_t2ax"
    metadata = json.loads((bundle / METADATA_RELPATH).read_text())
    assert (bundle / README_RELPATH).read_text() == render_model_card(metadata)


def test_reproduce_model_defaults_name_and_train_the_shipped_bundle():
    """`make model` on its defaults must reproduce the version and recipe the shipped card describes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = (root / "training" / "reproduce_model.sh").read_text()
    settings = [line for line in script.splitlines() if line.split("=")[0] in ("ITERS", "BG_NOISE", "LSYN", "VERSION")]
    assert len(settings) == 4, settings
    out = subprocess.run(["bash", "-c", "\n".join(settings) + '\necho "$VERSION $ITERS $BG_NOISE $LSYN"'],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split()
    metadata = read_metadata(root / "models" / "paraspinal_t2ax")
    augmentation = metadata["training"]["recipe"]["augmentation"]
    assert out[0] == metadata["version"]
    assert int(out[1]) == metadata["training"]["iterations"]
    assert float(out[2]) == augmentation["background_noise_pct"]
    assert float(out[3]) == augmentation["label_synthesis_p"]


def test_evaluation_inference_returns_probabilities_on_the_source_grid(tiny_bundle: Path):
    from training.evaluate import predict_probabilities

    rng = np.random.default_rng(1)
    # An oblique-free LPS-like grid (axis 0 to the patient's left), as the real files are.
    affine = np.array([[-0.9, 0, 0, 100], [0, -0.9, 0, 90], [0, 0, 4.5, -20], [0, 0, 0, 1.0]])
    case = LoadedCase("toy", rng.uniform(0, 500, (70, 60, 3)).astype(np.float32), None, affine, (0,), "toy")
    probs, uncertainty = predict_probabilities(case, load_bundle(tiny_bundle, "cpu"))
    assert probs.shape == (NUM_CLASSES, 70, 60, 3)
    assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-3)
    # per-slice scores, one per slice of the case (None where a label is not predicted)
    assert all(len(v) == 3 for v in uncertainty.entropy.values())


@needs_real
def test_evaluation_reports_dice_and_where_the_errors_go_and_refuses_training_cases(tiny_bundle: Path,
                                                                                   tmp_path: Path):
    from training.evaluate import main as evaluate_main

    assert evaluate_main(["--bundle", str(tiny_bundle), "--case", "musclemap_sub0001", "--out", str(tmp_path)]) == 2
    assert evaluate_main(["--bundle", str(tiny_bundle), "--case", "myosegmentum_tum01", "--out", str(tmp_path)]) == 0
    (case,) = json.loads((tmp_path / "evaluation.json").read_text())["cases"]
    assert [r["label"] for r in case["errors"]] == [1, 2, 3, 4]  # the muscles tum01 labels
    for errors, row in zip(case["errors"], case["rows"]):
        assert errors["label"] == row["label"] and errors["ref_voxels"] > 0
        missed = errors["missed_to_background"] + sum(errors["missed_to_other"].values())
        true_positive = errors["ref_voxels"] - missed
        assert row["dice"] == pytest.approx(2 * true_positive / (errors["ref_voxels"] + errors["pred_voxels"]),
                                            abs=1e-4)
    assert "Where the post-processed disagreement goes" in (tmp_path / "evaluation.md").read_text()

def test_ensemble_of_a_model_with_itself_scores_as_the_model_alone(tiny_bundle: Path):
    """The ensemble ablation averages softmax maps: two copies of one model are that model, mirrored
    or not, and the passes per slice count every network run."""
    from training.ensemble_ablation import ensemble_ablation

    rng = np.random.default_rng(2)
    affine = np.array([[-0.9, 0, 0, 100], [0, -0.9, 0, 90], [0, 0, 4.5, -20], [0, 0, 0, 1.0]])
    label = np.zeros((70, 60, 3), np.uint8)
    label[20:35, 30:45] = 1
    label[38:52, 30:45] = 2
    case = LoadedCase("toy", rng.uniform(0, 500, (70, 60, 3)).astype(np.float32), label, affine, (0, 1, 2), "toy")
    bundle = load_bundle(tiny_bundle, "cpu")
    rows = {r["variant"]: r for r in ensemble_ablation(case, {"a": bundle, "b": bundle})}
    assert [r["passes_per_slice"] for r in rows.values()] == [1, 1, 2, 2, 2, 4]
    for mirror in ("one pass", "mirrored"):
        alone, ensemble = rows[f"a, {mirror}"], rows[f"ensemble of 2, {mirror} each"]
        assert ensemble["per_label"] == alone["per_label"] == rows[f"b, {mirror}"]["per_label"]
        assert set(alone["per_label"]) == {label_name(1), label_name(2)}
        assert alone["multifidus_erector_spinae_mean"] == pytest.approx(np.mean(list(alone["per_label"].values())),
                                                                       abs=1e-4)

def test_neighbour_slices_become_channels_in_slice_order_with_the_edges_repeated():
    from paraspinal.preprocessing import with_neighbour_slices

    volume = torch.arange(4.0).reshape(1, 1, 1, 4)  # slice k holds the value k
    stacked = with_neighbour_slices(volume, 1)
    assert stacked.shape == (3, 1, 1, 4)
    assert stacked[:, 0, 0, :].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 3]]
    assert with_neighbour_slices(volume, 0) is volume


@pytest.fixture(scope="module")
def tiny_2_5d_bundle(tmp_path_factory) -> Path:
    if not HAS_REAL:
        pytest.skip("shared real fixtures not present")
    from training.train import main

    root = tmp_path_factory.mktemp("tiny25d")
    rc = main(["--out", str(root / "run"), "--cases", "musclemap_sub0001", "--holdout", "myosegmentum_tum01",
               "--iterations", "3", "--checkpoint-every", "3", "--context-slices", "1", *TINY,
               "--export", str(root / "bundle")])
    assert rc == 0
    return root / "bundle"


def test_2_5d_training_slices_carry_the_neighbours_around_the_centre_slice():
    case = real_cases()["musclemap_sub0001"].load()
    from dataclasses import replace

    from training.data import MODEL_SPEC

    flat = case_slices(case).items
    deep = case_slices(case, replace(MODEL_SPEC, context_slices=1)).items
    assert [i["slice"] for i in flat] == [i["slice"] for i in deep]
    by_slice = {i["slice"]: i["image"] for i in flat}
    tissue_by_slice = {i["slice"]: i["tissue"] for i in flat}
    for item in deep:
        k = item["slice"]
        assert item["image"].shape[0] == 3 and item["tissue"].shape[0] == 3  # label synthesis re-draws each slice
        assert torch.equal(item["image"][1], by_slice[k][0])
        assert torch.equal(item["tissue"][1], tissue_by_slice[k][0])
        if k - 1 in by_slice:
            assert torch.equal(item["image"][0], by_slice[k - 1][0])
            assert torch.equal(item["tissue"][0], tissue_by_slice[k - 1][0])


def test_2_5d_bundle_declares_its_input_and_the_application_feeds_it_the_neighbour_slices(
        tiny_2_5d_bundle: Path, tiny_bundle: Path):
    from training.evaluate import predict_probabilities

    bundle = load_bundle(tiny_2_5d_bundle, "cpu")
    assert bundle.preprocessing.context_slices == 1 and bundle.preprocessing.in_channels == 3
    meta = bundle.metadata
    assert meta["network_def"]["in_channels"] == 3
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 3
    rng = np.random.default_rng(2)
    # 1 mm in-plane: the model space is the source grid flipped, so values stay exact
    affine = np.array([[-1.0, 0, 0, 100], [0, -1.0, 0, 90], [0, 0, 4.5, -20], [0, 0, 0, 1.0]])
    image = rng.uniform(100, 500, (70, 60, 3)).astype(np.float32)
    changed = image.copy()
    # The slice below slice 1, shuffled: same values, so the same volume z-score, another image.
    changed[..., 0] = rng.permutation(image[..., 0].ravel()).reshape(70, 60)
    for path, sees_neighbours in ((tiny_2_5d_bundle, True), (tiny_bundle, False)):
        loaded = load_bundle(path, "cpu")
        a, _ = predict_probabilities(LoadedCase("a", image, None, affine, (0,), "toy"), loaded)
        b, _ = predict_probabilities(LoadedCase("b", changed, None, affine, (0,), "toy"), loaded)
        assert a.shape == (NUM_CLASSES, 70, 60, 3)
        change_in_slice_1 = float(np.abs(a[..., 1] - b[..., 1]).max())
        change_in_slice_2 = float(np.abs(a[..., 2] - b[..., 2]).max())  # slice 0 is no neighbour of it
        assert change_in_slice_2 < 1e-4, path
        if sees_neighbours:
            assert change_in_slice_1 > 1e-3
        else:
            assert change_in_slice_1 < 1e-4


def test_evaluation_in_short_stacks_segments_each_stack_on_its_own_and_keeps_the_grid(tiny_2_5d_bundle: Path):
    from training.evaluate import predict_labels

    rng = np.random.default_rng(4)
    affine = np.array([[-1.0, 0, 0, 100], [0, -1.0, 0, 90], [0, 0, 4.0, -20], [0, 0, 0, 1.0]])
    image = rng.uniform(100, 500, (50, 40, 5)).astype(np.float32)
    bundle = load_bundle(tiny_2_5d_bundle, "cpu")
    whole_raw, _, whole_unc = predict_labels(LoadedCase("w", image, None, affine, (0,), "toy"), bundle)
    raw, post, unc = predict_labels(LoadedCase("s", image, None, affine, (0,), "toy"), bundle, stack_length=2)
    assert raw.shape == post.shape == whole_raw.shape == (50, 40, 5)
    assert all(len(v) == 5 for v in (*unc.entropy.values(), *unc.mirror_disagreement.values()))
    # the last stack is slice 4 alone: its own z-score and itself as both neighbours
    alone, _, _ = predict_labels(LoadedCase("a", image[..., 4:], None, affine, (0,), "toy"), bundle)
    assert np.array_equal(raw[..., 4:], alone)


# ------------------------------------------------------------------ 0.3.0 augmentations
def _slice_item(with_dixon: bool) -> dict:
    rng = np.random.default_rng(3)
    label = torch.zeros(1, 64, 64, dtype=torch.int64)
    label[0, 20:30, 10:25], label[0, 20:30, 39:54] = 3, 4
    water = torch.from_numpy(rng.uniform(50, 100, (1, 64, 64)).astype(np.float32))
    fat = torch.from_numpy(rng.uniform(0, 20, (1, 64, 64)).astype(np.float32))
    fat[0, 40:60], water[0, 40:60] = 300.0, 5.0  # a subcutaneous fat band (almost no water signal)
    water[0, :5], fat[0, :5] = 0.0, 0.0  # masked background rows
    from training.data import tissue_map

    image = water + fat
    item = {"image": image, "label": label, "labelled": torch.ones(NUM_CLASSES), "pad_value": 0.0,
            "tissue": torch.from_numpy(tissue_map(image.numpy(), label.numpy(), range(NUM_CLASSES)).astype(np.int64))}
    if with_dixon:
        item.update(water=water, fat=fat)
    return item


def test_tissue_map_keeps_muscles_and_clusters_the_rest():
    from training.data import MASKED_TISSUE

    item = _slice_item(False)
    tissue, label = item["tissue"].numpy(), item["label"].numpy()
    assert np.array_equal(tissue[label > 0], label[label > 0])
    assert (tissue[0, :5] == MASKED_TISSUE).all()
    rest = tissue[(label == 0) & (tissue != MASKED_TISSUE)]
    assert rest.min() > MASKED_TISSUE and len(np.unique(rest)) >= 2  # fat band apart from the rest


def test_dixon_contrasts_remix_water_and_fat_and_leave_labels_and_other_cases_alone():
    from training.transforms import RandDixonContrastd

    t = RandDixonContrastd(prob=1.0)
    t.set_random_state(0)
    item = _slice_item(True)
    images = []
    for _ in range(30):
        out = t(item)
        assert torch.equal(out["label"], item["label"])
        x = out["image"][item["water"] + item["fat"] > 0]
        assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-2  # z-scored like the application
        images.append(out["image"])
    fat_band = [float(img[0, 45, 30] - img[0, 25, 17]) for img in images]  # fat minus muscle
    assert min(fat_band) < 0 < max(fat_band)  # fat darker than muscle in some draws (water-only), brighter in others
    plain = _slice_item(False)
    assert torch.equal(t(plain)["image"], plain["image"])


def test_label_synthesis_redraws_intensities_but_keeps_the_anatomy():
    from training.transforms import RandLabelSynthd

    t = RandLabelSynthd(prob=1.0)
    t.set_random_state(1)
    item = _slice_item(False)
    differences = []
    for _ in range(8):
        out = t(item)
        assert torch.equal(out["label"], item["label"])
        img = out["image"][0]
        differences.append(float(img[25, 17] - img[45, 30]))  # muscle minus fat, random sign
        assert float(img[20:30, 10:25].std()) < float(img.std())  # a muscle is one tissue class
    assert min(differences) < 0 < max(differences)


def test_label_synthesis_of_a_2_5d_item_draws_each_slice_from_its_own_tissue_with_shared_class_intensities():
    from training.transforms import RandLabelSynthd

    item = _slice_item(False)
    shifted = torch.roll(item["tissue"], shifts=6, dims=2)  # the neighbour slice: the anatomy moved
    item = {**item, "image": item["image"].repeat(3, 1, 1),
            "tissue": torch.cat([shifted, item["tissue"], item["tissue"]], dim=0)}
    t = RandLabelSynthd(prob=1.0)
    t.set_random_state(2)
    contrasts = []
    for _ in range(6):
        out = t(item)["image"]
        assert tuple(out.shape) == (3, 64, 64)
        # one intensity per class in every slice (noise apart); in the moved neighbour the muscle moved along
        muscle, fat = out[:, 20:30, 10:25].mean(dim=(1, 2)), out[:, 40:60, 30:40].mean(dim=(1, 2))
        assert abs(float(muscle[1] - muscle[2])) < 0.1 and abs(float(fat[1] - fat[2])) < 0.1
        assert abs(float(out[0, 20:30, 16:31].mean() - muscle[1])) < 0.1
        contrast = abs(float(muscle[1] - fat[1]))
        contrasts.append(contrast)
    assert max(contrasts) > 0.3  # the drawn classes differ: the checks above are not trivially met


def test_synthetic_cache_write_survives_another_writer_of_the_same_case(tmp_path: Path, monkeypatch):
    """Two trainings started together render the same phantom and both write it to the cache."""
    import training.synthetic as synthetic

    small = LoadedCase("phantom_small", np.ones((4, 4, 2), np.float32), np.zeros((4, 4, 2), np.uint8), np.eye(4),
                       (0,), "test")
    monkeypatch.setattr(synthetic, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(synthetic, "render_synthetic_case", lambda index, seed=0: small)
    real_savez = np.savez_compressed
    other_writer_ran = []

    def savez_then_another_writer_finishes_first(file, **arrays):
        real_savez(file, **arrays)
        if not other_writer_ran:  # the other training writes and renames the same case before this one renames
            other_writer_ran.append(True)
            synthetic.synthetic_case(3, seed=5)

    monkeypatch.setattr(synthetic.np, "savez_compressed", savez_then_another_writer_finishes_first)
    case = synthetic.synthetic_case(3, seed=5)
    assert other_writer_ran and case.case_id == "phantom_small"
    assert [p.name for p in tmp_path.iterdir()] == [synthetic._cache_path(3, 5).name]  # no temporary left
    monkeypatch.setattr(synthetic.np, "savez_compressed", real_savez)
    assert synthetic.synthetic_case(3, seed=5).case_id == "phantom_small"  # read back from the cache

# ------------------------------------------------------------------ MuscleMap import
def test_musclemap_import_maps_labels(tmp_path: Path):
    """Shapes and label mapping only: no MuscleMap weights are available here, so the
    state_dict is a freshly initialised MuscleMap-architecture UNet (random weights). This
    checks the conversion, not the model's quality."""
    from training.import_musclemap import MUSCLEMAP_CHANNELS, import_checkpoint
    from training.network import build_network, network_def

    torch.manual_seed(0)
    source = build_network(network_def(MUSCLEMAP_CHANNELS)).eval()
    path = tmp_path / "musclemap.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, str(path))  # DataParallel-style keys
    order = [0, 2, 1, 4, 3, 6, 5, 8, 7]  # e.g. a checkpoint numbering left before right
    bundle_dir = import_checkpoint(path, tmp_path / "bundle", channel_order=order)
    bundle = load_bundle(bundle_dir, "cpu")
    assert [info.name for info in bundle.labels][:2] == ["multifidus right", "multifidus left"]
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        raw = source(x)
        out = bundle.network(x)
    assert tuple(out.shape) == (1, NUM_CLASSES, 64, 64)
    for label, channel in enumerate(order):
        assert torch.allclose(out[:, label], raw[:, channel], atol=1e-4)
    assert bundle.metadata["network_def"]["channels"] == list(MUSCLEMAP_CHANNELS)

    torch.save({"bogus.weight": torch.zeros(1)}, str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError):
        import_checkpoint(tmp_path / "bad.pth", tmp_path / "bad_bundle")


# ------------------------------------------------------------------ site data as DICOM + SEG
def test_site_dicom_series_with_seg_loads_on_the_nifti_grid(tmp_path: Path):
    import highdicom as hd
    import pydicom

    from paraspinal.nifti_to_dicom import dicom_grid, nifti_to_dicom_series
    from training.site_dicom import label_from_text

    assert label_from_text("Multifidus right") == 1 and label_from_text("erector_spinae_L") == 4
    assert label_from_text("psoas") is None  # no side: refuse rather than guess

    # LPS-like NIfTI grid (voxel axis 0 towards the patient's left), as the real fixtures.
    affine = np.array([[-0.9, 0, 0, 40.0], [0, -0.9, 0, 30.0], [0, 0, 4.0, -10.0], [0, 0, 0, 1]])
    image = np.random.default_rng(0).uniform(50, 500, (24, 20, 3)).astype(np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[3:8, 4:9, :] = 1   # multifidus R
    label[14:20, 6:12, 1:] = 4  # erector spinae L
    case_dir = tmp_path / "c01"
    paths = nifti_to_dicom_series(nib.Nifti1Image(image, affine), case_dir / "image")
    sources = [pydicom.dcmread(str(p)) for p in paths]
    segment_numbers = np.zeros(label.shape, dtype=np.uint8)
    segment_numbers[label == 1] = 1
    segment_numbers[label == 4] = 2
    muscle = hd.sr.CodedConcept("127954009", "SCT", "Skeletal muscle")
    category = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
    descriptions = [
        hd.seg.SegmentDescription(segment_number=n, segment_label=text, segmented_property_category=category,
                                  segmented_property_type=muscle,
                                  algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, text in ((1, "Multifidus right"), (2, "Erector spinae left"))
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=dicom_grid(segment_numbers),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    seg.save_as(str(case_dir / "seg.dcm"))

    loaded = site_cases(tmp_path)["site:c01"].load()
    assert loaded.image.shape == image.shape
    assert np.array_equal(loaded.label, label)
    assert np.allclose(loaded.affine_ras, affine, atol=1e-3)
    # The test writer stores floats as scaled uint16, so compare up to a linear map.
    assert np.corrcoef(loaded.image.ravel(), image.ravel())[0, 1] > 0.999


def test_fine_tune_from_bundle_on_site_nifti(tiny_bundle: Path, tmp_path: Path):
    from training.train import main

    affine = np.diag([-0.8, -0.8, 4.0, 1.0])
    rng = np.random.default_rng(2)
    site = tmp_path / "site"
    site.mkdir()
    image = rng.uniform(10, 300, (80, 70, 3)).astype(np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[20:40, 30:50] = 3
    nib.save(nib.Nifti1Image(image, affine), str(site / "p1_image.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(site / "p1_label.nii.gz"))
    out = tmp_path / "ft"
    assert main(["--out", str(out), "--data-dir", str(site), "--cases", "--holdout", "--init", str(tiny_bundle),
                 "--iterations", "2", "--checkpoint-every", "2", *TINY, "--export", str(tmp_path / "ft_bundle")]) == 0
    meta = load_bundle(tmp_path / "ft_bundle", "cpu").metadata
    assert meta["training"]["data"][0].startswith("site:p1")
    assert meta["training"]["recipe"]["init"] == str(tiny_bundle)


@pytest.mark.parametrize("module", ["training.train", "training.evaluate", "training.export", "training.compare",
                                    "training.qc_validation"])
def test_training_command_help_renders(module: str):
    """argparse formats help with %: a stray % in a help text breaks --help (it did for train)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
