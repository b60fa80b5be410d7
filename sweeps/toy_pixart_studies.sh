#!/usr/bin/env bash
# The two PixArt studies on the toy world (experiments/pixart_staged, experiments/pixart_captions),
# per seed, at equal compute (steps x batch); the run folders and their `arm` factor:
#   stage1        stage1        class-conditional DiT, STAGE1_STEPS steps (the shape is the class)
#   stage2        staged_dense  PixArt from stage1's DiT (reparameterised), dense captions,
#                               TEXT_STEPS steps (the toy PixArt recipe's stage 2 for seed 0)
#   stage2_class  staged_class  the same with class-only captions ("a star")
#   scratch       scratch_dense PixArt from scratch, dense captions, STAGE1_STEPS + TEXT_STEPS steps
#   bash sweeps/toy_pixart_studies.sh runs/toy_pixart_studies 0 1
#   python -m t2ilab.analysis.collect runs/toy_pixart_studies --group-by arm
# Environment: STAGE1_STEPS (1000) and TEXT_STEPS (2000) set the budgets; STAGE1_DECAY sets
# stage 1's final lr decay (method.module.lr_scheduler.num_decay_steps; the recipe's 3000 when
# unset); SCRATCH_STEPS the scratch run's steps (STAGE1_STEPS + TEXT_STEPS: equal compute).
# STAGE1_FROM=DIR shares one finished stage-1 run (or its export) across every seed instead of
# training one per seed: the 25,000-step recipe costs about 1.7 h a run on 2 CPU threads.
# ARMS picks the runs (default "stage2 stage2_class scratch"; stage1 is trained when needed):
# after a new stage 1, ARMS="stage2 stage2_class" reruns only the arms that start from it.
# Each run ends with eval=toy_alignment (colours and shape read from the pixels). A run whose
# results.json says "ok" is skipped and a stopped one resumes from its last checkpoint, so the
# script resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash sweeps/toy_pixart_studies.sh OUT_DIR SEED [SEED...]}
shift
[ $# -ge 1 ] || { echo "name at least one seed, e.g. 0" >&2; exit 2; }
stage1_steps=${STAGE1_STEPS:-1000}
text_steps=${TEXT_STEPS:-2000}
scratch_steps=${SCRATCH_STEPS:-$((stage1_steps + text_steps))}
stage1_from=${STAGE1_FROM:-}
arms=" ${ARMS:-stage2 stage2_class scratch} "
for arm in $arms; do
  case $arm in stage2|stage2_class|scratch) ;;
    *) echo "ARMS: unknown arm '$arm'; choose from stage2 stage2_class scratch" >&2; exit 2 ;;
  esac
done
wanted() { [[ $arms == *" $1 "* ]]; }
if [ -n "$stage1_from" ] && [ ! -d "$stage1_from/transformer" ] && [ ! -d "$stage1_from/export/transformer" ]; then
  echo "STAGE1_FROM=$stage1_from holds no transformer/ (nor export/transformer/): name a finished stage-1 run or its export" >&2
  exit 2
fi
stage1_decay=()
[ -n "${STAGE1_DECAY:-}" ] && stage1_decay=(method.module.lr_scheduler.num_decay_steps="$STAGE1_DECAY")
done_ok() { grep -qs '"status": "ok"' "$1/results.json"; }
train() {  # train DIR OVERRIDES...
  local dir=$1; shift
  if done_ok "$dir"; then echo "done already: $dir"; return; fi
  local resume=()
  [ -f "$dir/checkpoints/last.ckpt" ] && resume=(ckpt_path=last)
  python train.py hydra.run.dir="$dir" "${resume[@]}" "$@"
}
for seed in "$@"; do
  s="$out/seed$seed"
  seeds=(seed="$seed" data.seed="$seed" model.tiny.seed="$seed")
  stage1=${stage1_from:-$s/stage1}
  if [ -z "$stage1_from" ] && { wanted stage2 || wanted stage2_class; }; then
    train "$s/stage1" experiment=toy_pixart_stage1 +arm=stage1 "${seeds[@]}" \
      trainer.max_steps="$stage1_steps" "${stage1_decay[@]}"
  fi
  if wanted stage2; then
    train "$s/stage2" experiment=toy_pixart_stage2 +arm=staged_dense "${seeds[@]}" \
      model.init_from="$stage1" data.caption=dense trainer.max_steps="$text_steps"
  fi
  if wanted stage2_class; then
    train "$s/stage2_class" experiment=toy_pixart_stage2 +arm=staged_class "${seeds[@]}" \
      model.init_from="$stage1" data.caption=class trainer.max_steps="$text_steps"
  fi
  if wanted scratch; then
    train "$s/scratch" experiment=toy_pixart_stage2 +arm=scratch_dense "${seeds[@]}" \
      data.caption=dense trainer.max_steps="$scratch_steps"
  fi
done
echo "done: python -m t2ilab.analysis.collect $out"
