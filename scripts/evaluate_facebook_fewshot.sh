#!/usr/bin/env bash
# Community Alignment ("facebook") 4-way choice accuracy / macro-F1 with the fewshot prompting baseline.
# Env: MODEL (default Qwen/Qwen3-8B), DATA (default runs/data/ca, from cuma data ca), OUT (default
# runs/eval/ca_fewshot); extra args pass through (e.g. --fewshot-k 3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cuma eval choice --model "${MODEL:-Qwen/Qwen3-8B}" --method fewshot --data "${DATA:-runs/data/ca}" \
  --out "${OUT:-runs/eval/ca_fewshot}" "$@"
