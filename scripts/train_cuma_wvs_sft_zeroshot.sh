#!/usr/bin/env bash
# zero-shot: CuMA r=8 on data with held-out profile groups. Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
# Reproduces the paper: the config keeps the paper's router (method.options.conditioning: paper); train_cuma_wvs_sft_fast.sh trains the recommended one.
exec "$(dirname "$0")/_launch.sh" configs/wvb/cuma_r8_zeroshot.yaml "$@"
