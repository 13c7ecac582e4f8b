#!/usr/bin/env bash
# ablation: dense soft routing over all experts. Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
exec "$(dirname "$0")/_launch.sh" configs/wvb/cuma_r64_soft.yaml "$@"
