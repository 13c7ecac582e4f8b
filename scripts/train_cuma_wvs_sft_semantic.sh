#!/usr/bin/env bash
# ablation: semantic-only routing (no profile embedding). Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
exec "$(dirname "$0")/_launch.sh" configs/wvb/cuma_semantic_r8.yaml "$@"
