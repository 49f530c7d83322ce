"""Render the bundle's model card (docs/README.md) from its metadata.json.

The card is generated, never hand-edited, so every figure in it is the one stored in the
metadata by the training run (``training``) and the evaluation run (``evaluation``).
"""

from __future__ import annotations

import re
from typing import Any

from training.labels import label_name

METRIC_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dice", "Dice", "{:.3f}"),
    ("jaccard", "Jaccard", "{:.3f}"),
    ("conformity", "Conformity", "{:.3f}"),
    ("tpr", "TPR", "{:.3f}"),
    ("tnr", "TNR", "{:.4f}"),
    ("ppv", "PPV", "{:.3f}"),
    ("volume_ref_ml", "V ref (ml)", "{:.1f}"),
    ("volume_pred_ml", "V pred (ml)", "{:.1f}"),
    ("volume_ratio", "V ratio", "{:.2f}"),
    ("assd_mm", "Mean boundary dist. (mm)", "{:.2f}"),
)

RESEARCH_USE = (
    "**RESEARCH USE ONLY.** Not a medical device; not validated for clinical use. Every "
    "segmentation must be reviewed by a qualified reader."
)

DEFAULT_LIMITS: tuple[str, ...] = (
    "Trained on at most two real volumes (MuscleMap sub-0001, MyoSegmenTUM tum01) plus synthetic phantoms. "
    "Held-out figures come from leave-one-subject-out folds, each tested on one real volume, and do not "
    "establish performance on other scanners, sequences, levels or pathologies; a model trained on both real "
    "volumes has no held-out real case left, and its card gives the folds' figures for its recipe. For "
    "orientation only: Wesselink et al. report Dice 0.90-0.93 in-distribution with 76 training participants; "
    "the figures here are not comparable (out-of-distribution volumes, other annotation protocols).",
    "The MyoSegmenTUM input is a Dixon water+fat sum standing in for T2 TSE, and its manual masks label "
    "multifidus and erector spinae only; its annotation protocol (e.g. where multifidus ends and erector "
    "spinae begins) differs from MuscleMap's, which lowers the measured agreement independently of the model. "
    "Measured on the 0.5.0 recipe's folds (3 seeds each): trained on tum01, the model leaves 26-30 % of "
    "MuscleMap's multifidus as background and adds almost none; trained on MuscleMap, it draws multifidus "
    "1.2-1.7 times tum01's reference volume. The references disagree on the multifidus itself, so a site should "
    "fine-tune to its own readers' outlines (README, 'The site teaches the model').",
    "Psoas major and quadratus lumborum have real labels in one volume only (MuscleMap sub-0001, 20 slices): "
    "their only held-out figure is the fold trained without it, where they are learned from phantoms alone.",
    "The MuscleMap sample segmentation may be model-assisted (its provenance says so); it is a "
    "reference, not necessarily a manual ground truth.",
    "2D slice-wise model: no through-plane context; slices far outside L1-S1 are out of scope and "
    "may receive spurious labels (post-processing keeps the largest 3D component per muscle).",
    "Small field of view: the training volumes show the whole trunk, while clinical axial lumbar T2 is often "
    "acquired with a 160-220 mm field of view around the spine. Framed by the volume minimum (the padding of "
    "bundles up to 0.5.0), the 0.5.0 recipe's fold models found no muscle on tum01 cropped to 160 mm "
    "(`training.evaluate --fov-mm`). From 0.5.1 a slice smaller than the window is mirrored at its edge: "
    "the same models (3 seeds) then score 0.64 at 160 mm and 0.69 at 200 mm against 0.75 on the whole volume, "
    "one seed 0.44 at 160 mm. Outlines on small-field-of-view series are less reliable than on a whole "
    "trunk: check them (model card, 'Padding').",
    "Background: MyoSegmenTUM tum01 is masked to exactly 0 outside the body, and the z-score over non-zero "
    "voxels leaves that air at 0, a mid grey; a real scan has noise there, which the z-score makes dark. "
    "Models trained without tum01 (fold A: MuscleMap + phantoms, recipes up to 0.6.0) lost most or all of the "
    "muscles on tum01 with noise in its air (multifidus + erector spinae 0.51 / 0.00 / 0.29 by seed, against "
    "0.79 / 0.77 / 0.70 with the masked air): a subject unlike the training one can fail outright, and the "
    "review flag is the reader's cue. From 0.6.0, tum01's air is filled with noise in training "
    "(`--background-noise 2`) and fold A is tested with real air (`training.evaluate --background-noise 1`; "
    "model card, 'Background'); the cause was the contrast (next limit).",
    "Contrast: the real training data are one T2 TSE subject (MuscleMap: muscle at 6 % of the intensity "
    "range) and one Dixon water + fat sum (tum01: muscle at 27 %). Without label-driven synthesis a model that "
    "learned only one of them lost the muscles of the other (fold A on tum01 with real air, 0.6.0 recipe: "
    "0.51 / 0.00 / 0.29 by seed) and found them again when tum01 was re-mixed with T2-like contrast (0.82 / "
    "0.75 / 0.71; model card, 'Contrast'). From 0.7.0 a share of the training slices is drawn from tissue maps "
    "with random intensities (0.7.0: half; 0.8.0: a quarter, `--label-synthesis 0.25`): fold A then keeps the "
    "muscles (0.8.0: 0.84 / 0.78 by seed), while fold B (trained on tum01, tested on MuscleMap) loses 0.02 for "
    "multifidus + erector spinae against 0.6.0 (0.7.0: 0.08) and 0.12 over all 8 muscles, mostly multifidus drawn "
    "smaller than MuscleMap's outline (model card, 'Label-driven synthesis share'). "
    "A series whose muscle-to-fat contrast lies outside both (proton density, short echo time, strong "
    "T1 weighting) is untested; the series selector admits T2 only, but not every T2 looks alike.",
    "Laterality follows the image geometry (RAS model space); a wrong orientation in the DICOM header "
    "gives wrong sides.",
    "The review flag (quality control) was validated on the two held-out real volumes and on synthetic "
    "phantoms only: a muscle without a flag is not thereby correct, and every outline needs a reader. The "
    "score can also fire on accurate outlines: with bundle 0.3.0 it fired on quadratus lumborum on phantoms "
    "whose outlines had Dice 0.92-0.98; the QC validation table of each version gives the flag's precision "
    "and recall on the held-out real slices and how often it fires on phantoms.",
)


SLICE_CONTEXT_LIMIT_2D = DEFAULT_LIMITS[4]


def default_limits(context_slices: int = 0) -> tuple[str, ...]:
    """The standard limits; a 2.5D model's through-plane limit replaces the 2D one."""
    if context_slices <= 0:
        return DEFAULT_LIMITS
    text = (f"2.5D model: each slice is segmented with {context_slices} neighbour slice(s) on each side as input "
            "channels, trained on slice spacings of 3.6-5.3 mm (real: 4.0 and 4.4 mm); much thicker slices or gaps "
            "between slices were not measured. At the ends of a stack the edge slice stands in for its missing "
            "neighbour, as in training at the ends of each volume. Series acquired as short stacks (3 slices per "
            "disc) measured lower than whole volumes (0.5.0 recipe: 0.746 vs 0.792 in fold A, 0.567 vs 0.584 in "
            "fold B; 0.8.0 recipe, fold A: 0.815 in stacks of 3 and 0.781 as single slices vs 0.840; model card, "
            "'Short stacks'): within 3 slices the largest-component rule can keep a false "
            "island of the muscle's size (bowel, in the held-out volume) instead of the muscle, so such outlines "
            "need a closer look. Slices far outside L1-S1 are out of scope and may receive spurious labels "
            "(post-processing keeps the largest 3D component per muscle).")
    return tuple(text if entry == SLICE_CONTEXT_LIMIT_2D else entry for entry in DEFAULT_LIMITS)


def describe_init(init: str | None, run: dict[str, Any] | None, data: list[str]) -> str:
    """Card text for a run's start weights (``init``: the --init path; ``run``: its provenance,
    :func:`training.train.init_provenance`): random, a bundle, or (a warm restart or fine-tune of a
    training run) that run, its settings and its own start, recursively."""
    if not init:
        return "random (MONAI default initialisation)"
    if not run:
        return str(init)
    return f"{_describe_start(run, data)} ({init})"


def _describe_start(run: dict[str, Any] | None, data: list[str]) -> str:
    if not run:
        return "random (MONAI default initialisation)"
    if "bundle" in run:
        return f"bundle {run.get('bundle')} {run.get('version')}"
    same = list(run.get("data", [])) == list(data)
    return (f"the final weights of an earlier run of {run.get('iterations')} iterations (seed {run.get('seed')}, "
            f"lr {run.get('lr')}, {run.get('lr_schedule')} schedule, "
            f"{'the same data' if same else 'data: ' + '; '.join(run.get('data', []))}), itself started from "
            f"{_describe_start(run.get('init'), run.get('data', []))}; this run continues them on a new schedule")


def earlier_minutes(run: dict[str, Any] | None) -> float:
    """Training-loop minutes of the run(s) a run continues (0 for a bundle or random start)."""
    total = 0.0
    while run and "bundle" not in run:
        total += float(run.get("train_loop_s", 0.0)) / 60.0
        run = run.get("init")
    return total


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return pattern.format(value)


def metric_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per label, columns :data:`METRIC_COLUMNS`."""
    header = "| label | " + " | ".join(title for _, title, _ in METRIC_COLUMNS) + " |"
    rule = "|---|" + "---|" * len(METRIC_COLUMNS)
    lines = [header, rule]
    for row in rows:
        cells = [_fmt(row.get(key), pattern) for key, _, pattern in METRIC_COLUMNS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CONTRAST_AUGMENTATION = {
    "none": "none",
    "contrast": "on (background masking, bias field, gamma, histogram shift, foreground scale/shift, noise; "
                "training/transforms.py RandContrastd)",
}


def summarise_data(entries: list[str]) -> list[str]:
    """Training-data lines with the synthetic phantoms folded into one line."""
    real = [e for e in entries if not e.startswith("synthetic_")]
    synthetic = [e for e in entries if e.startswith("synthetic_")]
    if synthetic:
        slices = sum(int(e.split(": ")[1].split(" ")[0]) for e in synthetic)
        t2 = sum(", T2," in e for e in synthetic)
        real.append(f"{len(synthetic)} synthetic lumbar phantom volumes (paraspinal.phantom; {t2} T2-like, "
                    f"{len(synthetic) - t2} T1-like; randomised field of view, spacing, tilt, noise and bias field), "
                    f"{slices} slices, all 8 muscles labelled")
    return real


def _training_section(training: dict[str, Any]) -> list[str]:
    if training.get("imported_from"):
        source = training["imported_from"]
        return ["## Training", "", f"Not trained here: imported from `{source.get('file')}` (sha256 "
                f"{str(source.get('sha256'))[:16]}…) with output channel order "
                f"{training.get('recipe', {}).get('channel_order')}. Training data and recipe: as documented by "
                "the checkpoint's provider.", ""]
    recipe = training.get("recipe", {})
    aug = recipe.get("augmentation", {})
    context = int(recipe.get("context_slices", 0))
    lines = ["## Training", "", ("Data (2D axial slices in model space):" if not context else
                                 f"Data (axial slices in model space, each with its {context} neighbour slice(s) on "
                                 "each side as input channels, 2.5D):"), ""]
    lines += [f"- {entry}" for entry in summarise_data(training.get("data", []))]
    lines += [
        "",
        f"Held out (never trained on): {', '.join(training.get('held_out', [])) or 'none'}.",
        "",
        f"- Slices: {training.get('num_slices')}; iterations: {training.get('iterations')} "
        f"(batch {recipe.get('batch_size')}, {recipe.get('patch', [256, 256])[0]}x{recipe.get('patch', [256, 256])[1]} patches); "
        f"seed {training.get('seed')}.",
        f"- Loss: {recipe.get('loss')}.",
        f"- Optimiser: {recipe.get('optimizer')} lr {recipe.get('lr')}, weight decay {recipe.get('weight_decay')}, "
        f"{recipe.get('lr_schedule')} schedule.",
        f"- Augmentation: geometric ({aug.get('geometric')}); contrast augmentation: "
        f"{CONTRAST_AUGMENTATION.get(str(aug.get('contrast')), aug.get('contrast'))}"
        + (f"; label-driven synthesis (SynthSeg-style, training/transforms.py RandLabelSynthd) p="
           f"{aug['label_synthesis_p']}" if aug.get("label_synthesis_p") else "")
        + (f"; Dixon contrast synthesis from water and fat (RandDixonContrastd) p={aug['dixon_contrasts_p']}"
           if aug.get("dixon_contrasts_p") else "")
        + (f"; clinical field-of-view crop (140-260 mm around the spine, re-z-scored; RandFieldOfViewd) "
           f"p={aug['fov_crop_p']}" if aug.get("fov_crop_p") else "")
        + (f"; a masked (exactly-0) background filled with Rayleigh noise of {aug['background_noise_pct']:g} % of "
           "the median intensity, as a real scan's air (tum01)" if aug.get("background_noise_pct") else "")
        + (f"; the slice framed by 0-120 mm of noisy air, half the time inside an elliptical body outline, "
           f"p={aug['air_margin_p']}" if aug.get("air_margin_p") else "")
        + (f"; gamma {aug['gamma_range'][0]:g}-{aug['gamma_range'][1]:g} log-uniform (p=0.5) in the contrast augmentation"
           if aug.get("gamma_range") else "") + ".",
        f"- Model selection: {recipe.get('selection')}.",
        f"- Initial weights: {describe_init(recipe.get('init'), recipe.get('init_run'), training.get('data', []))}.",
        f"- Final training loss (mean of the last 100 iterations): {training.get('final_loss_mean_last_100')}.",
        f"- Training time: {training.get('time', {}).get('train_loop_min')} min (training loop)"
        + (f", after {earlier_minutes(recipe.get('init_run')):.1f} min for the run(s) it continues"
           if earlier_minutes(recipe.get('init_run')) else "")
        + f" on {training.get('machine')}.",
        "",
    ]
    return lines


def _evaluation_section(evaluation: dict[str, Any]) -> list[str]:
    lines = ["## Evaluation", ""]
    if not evaluation.get("measured"):
        if evaluation.get("cross_validation"):
            cv = evaluation["cross_validation"]
            lines += ["These weights were trained on every real labelled volume there is, so none is left to test "
                      f"them on. Held-out figures are those of the recipe: {cv.get('method')}. Per-label Dice "
                      "(mean over the folds that label it; the application shows it beside each muscle): "
                      + ", ".join(f"{label_name(int(k))} {v:.3f}" for k, v in cv.get("per_label_dice", {}).items()) + ".", ""]
        else:
            lines += ["Not measured for these weights yet. Run:", "", f"    {evaluation.get('how', '')}", ""]
        lines += _checks_lines(current_checks(evaluation))
        return lines
    lines += [evaluation.get("method", ""), ""]
    for case in evaluation.get("cases", []):
        lines += [
            f"### {case['case']} ({'post-processed' if case.get('postprocessed') else 'raw arg-max'})",
            "",
            f"Data: {case.get('source', '')}.",
            "",
            metric_table(case["rows"]),
            "",
        ]
        if case.get("raw_rows"):
            lines += ["Without post-processing (raw arg-max):", "", metric_table(case["raw_rows"]), ""]
        if case.get("figure"):
            lines += [f"Overlay (reference vs prediction, three slices): ![overlay](evaluation/{case['figure']})", ""]
    lines += _checks_lines(current_checks(evaluation))
    return lines


# A check carried from an earlier bundle's card ends its title with "[<version> card]" (training/export.py keeps
# them); the card shows this recipe's own checks first and the history after the limits, newest card first,
# so a reader meets the figures that describe these weights before a hundred kilobytes of earlier ablations.
_CARRIED = re.compile(r"\[(\d+(?:\.\d+)*) card\]$")


def _version_key(check: dict[str, Any]) -> tuple[int, ...]:
    match = _CARRIED.search(check["title"])
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def current_checks(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe checks measured for this bundle's recipe (not carried from an earlier card), in stored order."""
    return [c for c in evaluation.get("recipe_checks", []) if not _CARRIED.search(c["title"])]


def earlier_checks(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """The checks carried from earlier cards, newest card first (stored order kept within one card)."""
    carried = [c for c in evaluation.get("recipe_checks", []) if _CARRIED.search(c["title"])]
    return sorted(carried, key=_version_key, reverse=True)  # sorted() is stable


def _checks_lines(checks: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for check in checks:
        lines += [f"### Recipe check: {check['title']}", "", check.get("text", ""), ""]
        if check.get("rows"):
            lines += [metric_table(check["rows"]), ""]
    return lines


PADDING_TEXT = {
    "minimum": "a slice smaller than the window padded with the volume's minimum",
    "reflect": "a slice smaller than the window (a field of view under 256 mm) mirrored at its edge to fill it",
    "replicate": "a slice smaller than the window padded by repeating its edge voxels",
}


def render_model_card(metadata: dict[str, Any]) -> str:
    """The model card markdown for ``metadata`` (the bundle's metadata.json content)."""
    pre = metadata.get("preprocessing", {})
    net = metadata.get("network_def", {})
    weights = metadata.get("weights", {})
    labels = metadata.get("labels", {})
    lines = [
        f"# {metadata.get('name')} {metadata.get('version')} — model card",
        "",
        RESEARCH_USE,
        "",
        metadata.get("description", ""),
        "",
        "## Intended use",
        "",
        "Automatic segmentation of the lumbar paraspinal muscles on axial T2-weighted MRI (L1-S1) in the "
        "research DICOM node and in batch research pipelines; outputs are reviewed by a reader before any use.",
        "",
        "## Inputs, outputs, processing",
        "",
        (f"- Input: one axial slice, (B, 1, H, W) float32, " if not pre.get("context_slices") else
         f"- Input: one axial slice with its {pre['context_slices']} neighbour slice(s) on each side as channels "
         f"(2.5D; channel order inferior to superior, the edge slice repeated past the ends of a stack), "
         f"(B, {1 + 2 * int(pre['context_slices'])}, H, W) float32, ")
        + f"in the model space: orientation {pre.get('orientation')} "
        f"(voxel axis 0 towards the patient's right, axis 1 anterior; slices along axis 2), in-plane spacing "
        f"{pre.get('pixdim_mm')} mm (slice spacing kept), z-score over the non-zero voxels of the volume.",
        f"- Output: (B, {len(labels) + 1}, H, W) logits; label = arg-max. Labels (patient side): "
        + ", ".join(f"{k} {v['muscle']} {v['side']}" for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])))
        + "; 0 background.",
        f"- Inference: sliding window {pre.get('roi_size')} per slice, overlap {pre.get('overlap')}, "
        f"{pre.get('blend_mode')} blending; {PADDING_TEXT.get(pre.get('padding', 'minimum'), pre.get('padding'))}; probabilities mapped back to the source grid by inverting the "
        "preprocessing.",
        "- Post-processing: "
        + ", ".join(k for k, v in metadata.get("postprocessing", {}).items() if v)
        + " (largest 3D connected component per label, holes filled per slice, `training/postprocess.py`).",
        "",
        "## Architecture",
        "",
        f"MONAI UNet, {net.get('spatial_dims')}D, {net.get('in_channels', 1)} input channel(s), "
        f"channels {net.get('channels')}, strides {net.get('strides')}, "
        f"{net.get('num_res_units')} residual units per level (two 3x3 convolutions each), strided-convolution "
        f"downsampling, transposed-convolution upsampling, {net.get('norm')} norm, {net.get('act')} activation "
        f"(Wesselink et al. design at reduced width for CPU training). {weights.get('parameters')} parameters; "
        f"TorchScript {weights.get('size_mb')} MB. MONAI {metadata.get('monai_version')}, PyTorch "
        f"{metadata.get('pytorch_version')}.",
        "",
    ]
    lines += _training_section(metadata.get("training", {}))
    lines += _evaluation_section(metadata.get("evaluation", {}))
    lines += ["## Limits", ""]
    lines += [f"- {text}" for text in metadata.get("limits", DEFAULT_LIMITS)]
    lines += [
        "",
        "## Data licences and citation",
        "",
        "- MuscleMap sample (image and segmentation): MuscleMap project, MIT licence.",
        "- MyoSegmenTUM spine: Burian E. et al., \"Lumbar muscle and vertebral bodies segmentation of chemical "
        "shift encoding-based water-fat MRI: the reference database MyoSegmenTUM spine\", BMC Musculoskeletal "
        "Disorders 2019; left/right masks as curated by the LPM_Segmentator project (Apache-2.0).",
        "- Method: Wesselink E.O. et al., Sci Rep (2D U-Net for lumbar muscle segmentation on axial T2).",
        "",
    ]
    history = earlier_checks(metadata.get("evaluation", {}))
    if history:
        lines += ["## Earlier recipe checks", "",
                  "Measured for earlier bundles' recipes and carried for the record (each title names the card it "
                  "came from; newest first). Their figures describe those recipes, not these weights.", ""]
        lines += _checks_lines(history)
    return "\n".join(lines)
