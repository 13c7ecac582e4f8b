#!/usr/bin/env bash
# CuMA r=8 on PRISM: SFT, then DPO (beta 0.1).
# Reproduces the paper: the SFT config keeps the paper's router (method.options.conditioning: paper); for the recommended
# router add --method.options.conditioning fast --train.router_learning_rate 6e-5 (3x the SFT lr; docs/cuma.md).
# Stage 1: SFT (configs/prism/cuma_r8_sft.yaml) into $OUT/sft (skip with SKIP_SFT=1); stage 2: DPO from that adapter, the reference
# being the SFT policy (configs/prism/cuma_r8_dpo.yaml), into $OUT/dpo. Env: MODEL, DATA, OUT (default runs/prism/cuma_r8), NUM_GPUS,
# ACCELERATE_CONFIG. Extra arguments override both stages (e.g. --train.max_steps 10).
set -euo pipefail
here="$(dirname "$0")"; out="${OUT:-runs/prism/cuma_r8}"
if [ "${SKIP_SFT:-0}" != 1 ]; then OUT="$out/sft" "$here/_launch.sh" configs/prism/cuma_r8_sft.yaml "$@"; fi
STAGE=dpo OUT="$out/dpo" exec "$here/_launch.sh" configs/prism/cuma_r8_dpo.yaml --init.sft_path "$out/sft" "$@"
