#!/usr/bin/env bash
# CuMA r=8 with the recommended router (conditioning: fast, routers at 3x the learning rate); not the paper's setting
# (train_cuma_wvs_sft.sh is). Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
exec "$(dirname "$0")/_launch.sh" configs/wvb/cuma_r8_fast.yaml "$@"
