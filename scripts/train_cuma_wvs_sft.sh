#!/usr/bin/env bash
# CuMA r=8, alpha 16, lr 2e-5 (paper: 1.53% trainable). Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
exec "$(dirname "$0")/_launch.sh" configs/wvb/cuma_r8.yaml "$@"
