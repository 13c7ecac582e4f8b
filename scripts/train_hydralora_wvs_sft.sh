#!/usr/bin/env bash
# HydraLoRA r=64, 8 heads, q_proj + v_proj (paper: 2.31% trainable). Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
exec "$(dirname "$0")/_launch.sh" configs/wvb/hydralora.yaml "$@"
