#!/usr/bin/env bash
# Shared launcher of the train_*.sh scripts: `cuma train STAGE --config CONFIG` (STAGE: sft | dpo | grpo, default
# sft), under `accelerate launch` when GPUs are present, else one CPU process. Environment: MODEL (base model id or path; default from the config, Qwen/Qwen3-8B),
# DATA (prepared-data dir), OUT (output dir), NUM_GPUS (default: GPUs seen by nvidia-smi), ACCELERATE_CONFIG
# (default configs/accelerate/zero2.yaml). Extra arguments are config overrides (--train.max_steps 10 ...).
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; shift
args=(train "${STAGE:-sft}" --config "$config")
if [ -n "${MODEL:-}" ]; then args+=(--model.name_or_path "$MODEL"); fi
if [ -n "${DATA:-}" ]; then args+=(--data.path "$DATA"); fi
if [ -n "${OUT:-}" ]; then args+=(--train.output_dir "$OUT"); fi
gpus="${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}"
if [ "$gpus" -gt 0 ]; then
  exec accelerate launch --config_file "${ACCELERATE_CONFIG:-configs/accelerate/zero2.yaml}" \
    --num_processes "$gpus" -m cuma.cli "${args[@]}" "$@"
fi
# CPU: fp32, no DeepSpeed, no checkpointing (any of these can still be overridden by the extra arguments)
exec cuma "${args[@]}" --model.dtype float32 --train.bf16 false --train.gradient_checkpointing false "$@"
