#!/usr/bin/env bash
# ablation: no profile in the router, no balance loss. Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
exec "$(dirname "$0")/_launch.sh" configs/wvb/cuma_r64_minimal.yaml "$@"
