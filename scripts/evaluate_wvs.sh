#!/usr/bin/env bash
# Evaluate a trained method (or a prompting baseline) on the WVB test split: predictions.tsv + summary.json.
# Env: MODEL (default Qwen/Qwen3-8B), ADAPTER (trained output dir; empty for vanilla/persona), METHOD (default: read
# from the adapter), DATA (default runs/data/wvb), OUT (default runs/eval/<adapter or method>); extra args pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
args=(eval wvb --model "${MODEL:-Qwen/Qwen3-8B}" --data "${DATA:-runs/data/wvb}")
if [ -n "${ADAPTER:-}" ]; then args+=(--adapter "$ADAPTER"); fi
if [ -n "${METHOD:-}" ]; then args+=(--method "$METHOD"); fi
exec cuma "${args[@]}" --out "${OUT:-runs/eval/$(basename "${ADAPTER:-${METHOD:-vanilla}}")}" "$@"
