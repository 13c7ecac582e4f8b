#!/usr/bin/env bash
# LoRA r=64 on Community Alignment (facebook/community-alignment-dataset): SFT, then DPO (beta 0.1).
# Stage 1: conditional SFT (configs/ca/lora_r64_sft.yaml) into $OUT/sft; stage 2: DPO from that adapter
# (configs/ca/lora_r64_dpo.yaml; the reference is the SFT policy) into $OUT/dpo.
# Env: MODEL, DATA (prepared folder of `cuma data ca`), OUT (default runs/ca/lora_r64), NUM_GPUS,
# ACCELERATE_CONFIG, SKIP_SFT=1 (reuse $OUT/sft). Extra arguments override both stages (e.g. --train.max_steps 10).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/ca/lora_r64}"

# second stage: like scripts/_launch.sh (which runs `cuma train sft` only), for `cuma train STAGE`
stage() {
  local name="$1" config="$2"; shift 2
  local args=(train "$name" --config "$config")
  if [ -n "${MODEL:-}" ]; then args+=(--model.name_or_path "$MODEL"); fi
  if [ -n "${DATA:-}" ]; then args+=(--data.path "$DATA"); fi
  local gpus="${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}"
  if [ "$gpus" -gt 0 ]; then
    accelerate launch --config_file "${ACCELERATE_CONFIG:-configs/accelerate/zero2.yaml}" \
      --num_processes "$gpus" -m cuma.cli "${args[@]}" "$@"
  else
    cuma "${args[@]}" --model.dtype float32 --train.bf16 false --train.gradient_checkpointing false "$@"
  fi
}

if [ "${SKIP_SFT:-0}" != 1 ]; then
  OUT="$out/sft" scripts/_launch.sh configs/ca/lora_r64_sft.yaml "$@"
fi
stage dpo configs/ca/lora_r64_dpo.yaml --init.sft_path "$out/sft" --train.output_dir "$out/dpo" "$@"
