#!/usr/bin/env bash
# P-Tuning v2, 32 virtual tokens. Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
exec "$(dirname "$0")/_launch.sh" configs/wvb/prefix.yaml "$@"
