#!/usr/bin/env bash
# CuMA r=64, alpha 128, lr 5e-6 (paper: 4.15% trainable). Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
# Reproduces the paper: the config keeps the paper's router (method.options.conditioning: paper); train_cuma_wvs_sft_fast.sh trains the recommended one.
exec "$(dirname "$0")/_launch.sh" configs/wvb/cuma_r64.yaml "$@"
