#!/usr/bin/env bash
# MixLoRA, 8 FFN experts, top-2. Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
exec "$(dirname "$0")/_launch.sh" configs/wvb/mixlora.yaml "$@"
