#!/usr/bin/env bash
# The source models of docs/results.md §1: train each task's CPU config, then score it in-domain (its data.val, at the
# end of training) and source-only on the whole target domain(s). About 30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${TMTSEG:-.venv/bin/tmtseg}
OUT=${OUT:-runs/issue3}
for task in camvid polyp vessels; do
  $T --no-progress train -c "configs/$task.yaml" "output_dir=$OUT/$task"
done
$T --no-progress eval "$OUT/camvid/checkpoints/iter_0001000" data.val.domain=dusk 'data.val.groups=[]' \
  'data.val.roles=[]' --out "$OUT/camvid_dusk.json"
for domain in cvc-colondb endoscene; do
  $T --no-progress eval "$OUT/polyp/checkpoints/iter_0000800" "data.val.domain=$domain" 'data.val.roles=[]' \
    --out "$OUT/polyp_$domain.json"
done
$T --no-progress eval "$OUT/vessels/checkpoints/iter_0000800" data.val.domain=chase_db1 'data.val.roles=[]' \
  --out "$OUT/vessels_chase.json"
