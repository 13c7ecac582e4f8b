#!/usr/bin/env bash
# LoRA r=64 on q_proj + v_proj (paper: 0.37% trainable). Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
exec "$(dirname "$0")/_launch.sh" configs/wvb/lora_r64.yaml "$@"
