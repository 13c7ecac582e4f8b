#!/usr/bin/env bash
# Community Alignment ("facebook") 4-way choice accuracy / macro-F1 with the vanilla prompting baseline.
# Env: MODEL (default Qwen/Qwen3-8B), DATA (default runs/data/ca, from cuma data ca), OUT (default
# runs/eval/ca_vanilla); extra args pass through (e.g. --fewshot-k 3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cuma eval choice --model "${MODEL:-Qwen/Qwen3-8B}" --method vanilla --data "${DATA:-runs/data/ca}" \
  --out "${OUT:-runs/eval/ca_vanilla}" "$@"
