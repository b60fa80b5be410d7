#!/usr/bin/env bash
# PixArt-alpha's three stages in sequence, each starting from the previous one's export:
#   bash sweeps/pixart_stages.sh [OUT_DIR] [extra overrides for every stage...]
# GPU, real scale (after `python -m t2ilab.data.captioning DENSE_DIR` for stage-2 captions):
#   bash sweeps/pixart_stages.sh runs/pixart model=... trainer=gpu
# The toy PixArt (models/toy/toy_pixart; experiments/toy_world/README.md) on the toy world:
#   STAGES=toy_pixart_stage bash sweeps/pixart_stages.sh runs/toy_pixart
# Stage 1 (class-conditional DiT) -> stage 2 (PixArt, reparameterised from the DiT; dense
# captions) -> stage 3 (higher resolution). Each stage is an ordinary run dir with results.json;
# a stage whose results.json says "ok" is not run again, and a stage that was stopped midway
# resumes from its last checkpoint, so a stopped sequence picks up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=${STAGES:-pixart_stage}
out=${1:-logs/pixart_stages/$(date +%Y-%m-%d_%H-%M-%S)}
shift || true
done_ok() { grep -qs '"status": "ok"' "$1/results.json"; }
resume() { [ -f "$1/checkpoints/last.ckpt" ] && echo ckpt_path=last || true; }
previous=""
for n in 1 2 3; do
  dir="$out/stage$n"
  if done_ok "$dir"; then
    echo "stage $n already done: $dir"
  else
    python train.py experiment="${stages}$n" ${previous:+model.init_from="$previous"} \
      hydra.run.dir="$dir" $(resume "$dir") "$@"
  fi
  previous="$dir"
done
echo "stages done: $out/stage{1,2,3} (final export: $out/stage3/export)"
