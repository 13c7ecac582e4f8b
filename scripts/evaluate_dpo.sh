#!/usr/bin/env bash
# Win-rate of a DPO/GRPO-trained adapter against the base model (or REFERENCE_ADAPTER) on held-out preference prompts.
# Env: MODEL (default Qwen/Qwen3-8B), ADAPTER (required), REFERENCE_ADAPTER (optional), DATA (default runs/data/ca),
# JUDGE (local|http, default http), JUDGE_URL (default https://api.openai.com/v1), JUDGE_MODEL (default gpt-4o;
# the key is read from $OPENAI_API_KEY), OUT (default runs/eval/winrate/<adapter>); extra args pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${ADAPTER:?set ADAPTER to the trained adapter folder}"
args=(eval winrate --model "${MODEL:-Qwen/Qwen3-8B}" --candidate-adapter "$ADAPTER" --data "${DATA:-runs/data/ca}"
      --judge "${JUDGE:-http}")
if [ -n "${REFERENCE_ADAPTER:-}" ]; then args+=(--reference-adapter "$REFERENCE_ADAPTER"); fi
if [ "${JUDGE:-http}" = "http" ]; then
  args+=(--judge-url "${JUDGE_URL:-https://api.openai.com/v1}" --judge-model "${JUDGE_MODEL:-gpt-4o}")
elif [ -n "${JUDGE_MODEL:-}" ]; then args+=(--judge-model "$JUDGE_MODEL"); fi
exec cuma "${args[@]}" --out "${OUT:-runs/eval/winrate/$(basename "$ADAPTER")}" "$@"
