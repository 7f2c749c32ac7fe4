#!/usr/bin/env bash
# The source models of docs/results.md §1: each task's config (DINOv2 ViT-S/14) trained with every seed in SEEDS,
# scored in-domain (its data.val, at the end of training) and source-only on every target domain.
# SEEDS="0 1 2" OUT=runs/source bash scripts/source_models.sh   (add model.backbone.pretrained="" for from scratch)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${TMTSEG:-.venv/bin/tmtseg}
OUT=${OUT:-runs/source}
SEEDS=${SEEDS:-0}
TASKS=${TASKS:-camvid polyp vessels}
for seed in $SEEDS; do
  for task in $TASKS; do
    run="$OUT/$task/seed$seed"
    [ -f "$run/eval.json" ] || $T --no-progress train -c "configs/$task.yaml" "train.seed=$seed" "output_dir=$run" "$@"
    ckpt=$(ls -d "$run"/checkpoints/iter_* | tail -1)  # the final model: data.val is scored, never selected on
    case $task in
      camvid) $T --no-progress eval "$ckpt" data.val.domain=dusk 'data.val.groups=[]' 'data.val.roles=[]' \
                --out "$run/source_only_dusk.json" ;;
      polyp) for domain in cvc-colondb endoscene; do
               $T --no-progress eval "$ckpt" "data.val.domain=$domain" 'data.val.roles=[]' \
                 --out "$run/source_only_$domain.json"
             done ;;
      vessels) $T --no-progress eval "$ckpt" data.val.domain=chase_db1 'data.val.roles=[]' \
                 --out "$run/source_only_chase_db1.json" ;;
    esac
  done
done
