#!/usr/bin/env bash
# LoRA r=64 on Community Alignment (facebook/community-alignment-dataset): SFT, then DPO (beta 0.1).
# Stage 1: SFT (configs/ca/lora_r64_sft.yaml) into $OUT/sft (skip with SKIP_SFT=1); stage 2: DPO from that adapter, the reference
# being the SFT policy (configs/ca/lora_r64_dpo.yaml), into $OUT/dpo. Env: MODEL, DATA, OUT (default runs/ca/lora_r64), NUM_GPUS,
# ACCELERATE_CONFIG. Extra arguments override both stages (e.g. --train.max_steps 10).
set -euo pipefail
here="$(dirname "$0")"; out="${OUT:-runs/ca/lora_r64}"
if [ "${SKIP_SFT:-0}" != 1 ]; then OUT="$out/sft" "$here/_launch.sh" configs/ca/lora_r64_sft.yaml "$@"; fi
STAGE=dpo OUT="$out/dpo" exec "$here/_launch.sh" configs/ca/lora_r64_dpo.yaml --init.sft_path "$out/sft" "$@"
