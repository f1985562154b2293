#!/usr/bin/env bash
# Refresh everything derived from the bundled toy model after retraining it.
#
#   bash tools/refresh_toy_assets.sh RUN_DIR [WORK_DIR]
#
# RUN_DIR is the output folder of `python -m clipdecomp.toyworld.train`; WORK_DIR
# (default /tmp/toyrefresh) holds the generated data and logs. Copies the weights and
# the training log into assets/toyclip/, regenerates the demo's example scenes and
# assets/toyclip_textspan.{json,safetensors},
# and prints the figures that the model card, README.md and docs/toy-report/ quote:
# zero-shot accuracy, head-role check, Waterbirds repair, the reproduce report.
# The model card and the readings in the READMEs are then edited by hand.
set -euo pipefail
RUN=${1:?usage: tools/refresh_toy_assets.sh RUN_DIR [WORK_DIR]}
WORK=${2:-/tmp/toyrefresh}
cd "$(dirname "$0")/.."
mkdir -p "$WORK"

echo "== weights"
cp "$RUN/open_clip_model.safetensors" "$RUN/open_clip_config.json" assets/toyclip/
cp "$RUN/training.json" assets/toyclip/training_log.json

echo "== zero-shot accuracy (model card)"
python -m clipdecomp.toyworld.evaluate --n 1000 | tee "$WORK/zero_shot.txt"

echo "== toy data sets and the demo's example scenes (the world may have changed with the model)"
rm -rf "$WORK/toydata"
clipdecomp toyworld make-datasets "$WORK/toydata"
python -m demo.examples

echo "== TextSpan results of the bundled model"
python bench/toy_roles.py write-scenes "$WORK/toy_scenes" --n 2000 --seed 777
clipdecomp textspan --images "$WORK/toy_scenes" --pool general --layers 4 --k 60 --rank 80 \
    --batch-size 64 --seed 0 --out assets/toyclip_textspan.json
python bench/toy_roles.py check --results assets/toyclip_textspan.json --n 2000 --seed 778 \
    | tee "$WORK/roles.txt" || true   # exit status 1 = some factor fails; the table is the result

echo "== Waterbirds repair (README)"
rm -rf "$WORK/repaired_toy"
clipdecomp repair --textspan assets/toyclip_textspan.json --roles "background scene" --score variance --top-n 6 \
    --means-split val --data "$WORK/toydata/waterbirds" --out "$WORK/repaired_toy" --evaluate --no-progress \
    | tee "$WORK/repair.txt"

echo "== reproduce report (docs/toy-report)"
rm -rf "$WORK/report"
clipdecomp reproduce --out "$WORK/report" --quiet
cp "$WORK"/report/*.md "$WORK"/report/*.png "$WORK"/report/*.csv docs/toy-report/
echo "done: see $WORK/*.txt and docs/toy-report/report.md"
