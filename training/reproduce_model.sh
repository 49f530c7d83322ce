#!/usr/bin/env bash
# Reproduces the shipped bundle paraspinal_t2ax 0.8.0 and the recipe figures of its card. 0.8.0 is 0.6.0's
# recipe with label-driven synthesis (SynthSeg-style images drawn from tissue maps) on a quarter of the
# training slices (--label-synthesis 0.25; LSYN=0.5 gives 0.7.0, LSYN=0 gives 0.6.0). 0.6.0 is 0.5.1's
# recipe (0.5.0's training, reflection padding of slices smaller than the inferer's window) with tum01's
# masked background filled with noise as a real scan's air (--background-noise 2; BG_NOISE=0 LSYN=0 gives 0.5.1);
# fold A is tested on tum01 with noise in its air too (--background-noise 1), the figure a real scan gives:
#   1. two leave-one-subject-out folds of the recipe (train on one real subject + 16 phantoms,
#      test on the other real subject, fold A also on 4 unseen synthetic phantoms), with
#      test-time mirroring as the application runs it, each trained with SEEDS (default 0 1 2:
#      one seed's figure moves by 0.02-0.04, so the card reports the mean over seeds);
#   2. the QC validation of the outline-uncertainty score on those held-out predictions;
#   3. the shipped model (seed 0), trained on both real subjects + 16 phantoms, exported into models/;
#   4. the fold table (held-out Dice for multifidus and erector spinae, the labels both folds train
#      on real data, mean over folds and seeds) and the QC table written into the bundle's metadata
#      and model card.
# The recipe is 0.3.0's with a 2.5D input (--context-slices 1: the slice and its two neighbours
# as channels) and 3000 iterations; both raised held-out Dice in both folds, while stronger geometry and
# Dixon contrast synthesis did not (model card); label-driven synthesis, neutral in 0.3.0's ablation,
# kept fold A's muscles on tum01 with real air from 0.7.0, and a share of 0.25 instead of 0.5 kept that at a
# smaller cost on fold B in 0.8.0 (model card). ITERS=1500 BG_NOISE=0 LSYN=0 gives 0.4.0's
# recipe. Every step resumes (--resume), so an interrupted run continues where it stopped.
# CPU: about 30-50 min per run on one free core (torch 1 thread; 2-3x longer on a busy machine),
# 7 runs with the default seeds (SEEDS=0 gives the one-seed figures of earlier cards in 3 runs).
# The ablation tables of the card are separate runs (README "The model and its quality control").
# Usage: make model   (or: bash training/reproduce_model.sh [OUT])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUNDLE=${BUNDLE:-models/paraspinal_t2ax}
ITERS=${ITERS:-3000}  # the shipped 0.8.0: 3000; ITERS=1500 BG_NOISE=0 LSYN=0 gives 0.4.0's recipe
BG_NOISE=${BG_NOISE:-2}  # % of the median intensity in tum01's masked air; 0: the 0.5.1 recipe
LSYN=${LSYN:-0.25}  # probability of a label-synthesised training slice; 0.5: the 0.7.0 recipe; 0: the 0.6.0 recipe
# (card, 'Label-driven synthesis share': 0.25 keeps most of 0.5's fold A gain and recovers most of its fold B cost)
VERSION=${VERSION:-$(case "$LSYN" in 0) [ "$BG_NOISE" = 0 ] && echo 0.5.1 || echo 0.6.0 ;; 0.5) echo 0.7.0 ;; 0.25) echo 0.8.0 ;; *) echo "0.8.0+lsyn${LSYN}" ;; esac)$([ "$ITERS" = 3000 ] || echo "+${ITERS}it")$([ "${FOV_CROP:-0}" != 0 ] && echo "+fov${FOV_CROP}")}
SEEDS=(${SEEDS:-0 1 2})
OUT=${1:-output/reproduce_${ITERS}it_bg${BG_NOISE}_lsyn${LSYN}$([ "${FOV_CROP:-0}" != 0 ] && echo "_fov${FOV_CROP}")}  # named after the settings above
RECIPE=(--synthetic 16 --batch-size 4 --threads 1 --checkpoint-every 100 --context-slices 1 --resume)
# FOV_CROP=0.5 adds the clinical field-of-view crop (training.transforms.RandFieldOfViewd), a candidate
# measured with one seed (model card, 'Field of view'); 0 (default) reproduces the shipped recipe.
if [ "${FOV_CROP:-0}" != 0 ]; then RECIPE+=(--fov-crop "$FOV_CROP"); fi
if [ "$BG_NOISE" != 0 ]; then RECIPE+=(--background-noise "$BG_NOISE"); fi
if [ "$LSYN" != 0 ]; then RECIPE+=(--label-synthesis "$LSYN"); fi
SYNTH=(--case synthetic_test_0 --case synthetic_test_1 --case synthetic_test_2 --case synthetic_test_3)
export PYTHONPATH=.

RUNS=()
EVALS=()
for SEED in "${SEEDS[@]}"; do
  S=$([ "$SEED" = 0 ] && echo "" || echo "_s$SEED")  # seed 0 keeps the earlier cards' folder names
  "$PY" -m training.train --out "$OUT/foldA$S" --cases musclemap_sub0001 --holdout myosegmentum_tum01 \
    --iterations "$ITERS" --seed "$SEED" "${RECIPE[@]}" --export "$OUT/bundles/foldA$S" --version "$VERSION-foldA$S"
  "$PY" -m training.train --out "$OUT/foldB$S" --cases myosegmentum_tum01 --holdout musclemap_sub0001 \
    --iterations "$ITERS" --seed "$SEED" "${RECIPE[@]}" --export "$OUT/bundles/foldB$S" --version "$VERSION-foldB$S"
  "$PY" -m training.evaluate --bundle "$OUT/bundles/foldA$S" --case myosegmentum_tum01 "${SYNTH[@]}" \
    --background-noise 1 --out "$OUT/eval/foldA$S"
  "$PY" -m training.evaluate --bundle "$OUT/bundles/foldB$S" --case musclemap_sub0001 --out "$OUT/eval/foldB$S"
  RUNS+=(--run "foldA seed $SEED=$OUT/eval/foldA$S/evaluation.json" --run "foldB seed $SEED=$OUT/eval/foldB$S/evaluation.json")
  EVALS+=("$OUT/eval/foldA$S/evaluation.json" "$OUT/eval/foldB$S/evaluation.json")
done

"$PY" -m training.train --out "$OUT/shipped" --cases musclemap_sub0001 myosegmentum_tum01 --holdout \
  --iterations "$ITERS" --seed 0 "${RECIPE[@]}" --export "$BUNDLE" --version "$VERSION"

"$PY" -m training.compare --title "Leave-one-subject-out folds of the $VERSION recipe ($ITERS iterations)" \
  --text "$([ "$LSYN" != 0 ] && echo "Label-driven synthesis on a share of $LSYN of the training slices (--label-synthesis). ")Fold A: trained on MuscleMap sub-0001 + 16 phantoms, tested on MyoSegmenTUM tum01 (multifidus and erector spinae labelled; its masked air filled with 1 % Rayleigh noise, as a real scan has it) and 4 unseen phantoms. Fold B: trained on tum01 + 16 phantoms, tested on MuscleMap sub-0001 (all 8 muscles). Each fold trained with seeds ${SEEDS[*]}; the held-out figure shown in the application is the mean over folds and seeds. Inference with test-time mirroring, as the application runs it. Psoas major and quadratus lumborum get no held-out figure in the application: their only fold (B) learned them from phantoms alone." \
  "${RUNS[@]}" --out "$OUT/folds.md" --into-bundle "$BUNDLE" --cross-validation --cv-labels 1 2 3 4
"$PY" -m training.qc_validation "${EVALS[@]}" --out "$OUT/qc_validation.md" --into-bundle "$BUNDLE"
echo "bundle: $BUNDLE; figures: $OUT"
