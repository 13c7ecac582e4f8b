#!/usr/bin/env bash
# CuMA r=8, alpha 16, lr 2e-5 (paper: 1.53% trainable). Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
# Reproduces the paper: the config keeps the paper's router (method.options.conditioning: paper); train_cuma_wvs_sft_fast.sh trains the recommended one.
exec "$(dirname "$0")/_launch.sh" configs/wvb/cuma_r8.yaml "$@"
