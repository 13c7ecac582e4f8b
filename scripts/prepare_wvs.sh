#!/usr/bin/env bash
# Prepare WorldValuesBench pairs from your WVB checkout with built TSVs (licence-gated WVS data, never shipped here).
# Env: WVB (checkout dir, required), DATA (default runs/data/wvb), TRAIN_PAIRS, TEST_PAIRS, SEED; extra args pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cuma data wvb --wvb "${WVB:?set WVB to your WorldValuesBench checkout}" --out "${DATA:-runs/data/wvb}" \
  --train-pairs "${TRAIN_PAIRS:-100000}" --test-pairs "${TEST_PAIRS:-10000}" --seed "${SEED:-0}" "$@"
