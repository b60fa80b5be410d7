#!/usr/bin/env bash
# PixArt-alpha's three stages in sequence, each starting from the previous one's export:
#   bash sweeps/pixart_stages.sh [OUT_DIR] [extra overrides for every stage...]
# GPU, real scale (after `python -m t2ilab.data.captioning DENSE_DIR` for stage-2 captions):
#   bash sweeps/pixart_stages.sh runs/pixart model=... trainer=gpu
# Stage 1 (class-conditional DiT) -> stage 2 (PixArt, reparameterised from the DiT; dense
# captions) -> stage 3 (higher resolution). Each stage is an ordinary run dir with results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-logs/pixart_stages/$(date +%Y-%m-%d_%H-%M-%S)}
shift || true
python train.py experiment=pixart_stage1 hydra.run.dir="$out/stage1" "$@"
python train.py experiment=pixart_stage2 model.init_from="$out/stage1" hydra.run.dir="$out/stage2" "$@"
python train.py experiment=pixart_stage3 model.init_from="$out/stage2" hydra.run.dir="$out/stage3" "$@"
echo "stages done: $out/stage{1,2,3} (final export: $out/stage3/export)"
