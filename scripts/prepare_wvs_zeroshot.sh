#!/usr/bin/env bash
# Zero-shot split: hold whole profile groups out of training (HOLDOUT_COUNTRIES=A,B or HOLDOUT_FRACTION=0.2) and test
# on them only. Env as prepare_wvs.sh; DATA defaults to runs/data/wvb_zeroshot.
set -euo pipefail
if [ -n "${HOLDOUT_COUNTRIES:-}" ]; then hold=(--holdout-countries "$HOLDOUT_COUNTRIES"); else hold=(--holdout-fraction "${HOLDOUT_FRACTION:-0.2}"); fi
exec env DATA="${DATA:-runs/data/wvb_zeroshot}" "$(dirname "$0")/prepare_wvs.sh" "${hold[@]}" "$@"
