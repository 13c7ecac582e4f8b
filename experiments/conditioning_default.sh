#!/usr/bin/env bash
# Fast vs paper conditioning of CuMA's router on a second synthetic population (not the demo's), at the demo's small
# budget (50 steps, batch 8, lr 2e-3 linear, r=8 alpha 16), scored on the population's VALID split.
# Evidence for the default of `cuma train sft --method.name cuma` (docs/notes/conditioning-default.md).
# Usage: experiments/conditioning_default.sh [WORK_DIR] [TRAIN_SEEDS]   (run under flock /tmp/cuma-heavy.lock)
set -euo pipefail
W=${1:-runs/conditioning}
SEEDS=${2:-0}
CUMA=${CUMA:-cuma}
mkdir -p "$W"
if [ ! -f "$W/prep/train.jsonl" ]; then
  # population B: other zones, 4 modes, 16 countries, population seed 3 (the demo: 5 zones, 5 modes, 20 countries, seed 0)
  $CUMA data synth --out "$W/raw" --participants 2000 --questions 8 --modes 4 --countries 16 --seed 3 \
    --zones "English-speaking,Catholic Europe,West & South Asia,Latin America" \
    --profile-fields B_COUNTRY,X003R,Q260,Q289 --mode-layout map --country-strength 4.0 --answer-width 0.7 \
    --answer-noise 0.04 --prepare "$W/prep" --train-pairs 960 --test-pairs 100 --valid-pairs 200 --overwrite
fi
common=(--model.name_or_path smollm2-135m --data.path "$W/prep" --method.name cuma --train.max_steps 50
        --train.per_device_train_batch_size 8 --train.learning_rate 2e-3 --train.lr_scheduler_type linear
        --train.logging_steps 10 --train.save_strategy no --train.report_to none --train.split_by_length 2)
for seed in $SEEDS; do
  for variant in paper fast; do
    out="$W/$variant-s$seed"
    [ -f "$out/valid/summary.json" ] && continue
    if [ "$variant" = fast ]; then
      extra=(--method.options.router_input_norm balanced --method.options.router_token_init_scale 0.1
             --method.options.router_profile_center train --train.router_learning_rate 6e-3)
    else
      extra=()
    fi
    /usr/bin/time -f "$variant s$seed train %e s" $CUMA train sft "${common[@]}" "${extra[@]}" \
      --train.seed "$seed" --train.output_dir "$out"
    /usr/bin/time -f "$variant s$seed eval %e s" $CUMA eval wvb --adapter "$out" --data "$W/prep" --split valid \
      --out "$out/valid" --batch-size 16 --no-progress
  done
done
