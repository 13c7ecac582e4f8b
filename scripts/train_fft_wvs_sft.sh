#!/usr/bin/env bash
# full fine-tuning (use ACCELERATE_CONFIG=configs/accelerate/zero3.yaml at 8B). Env: MODEL, DATA, OUT, NUM_GPUS, ACCELERATE_CONFIG; extra args override the config.
exec "$(dirname "$0")/_launch.sh" configs/wvb/fft.yaml "$@"
