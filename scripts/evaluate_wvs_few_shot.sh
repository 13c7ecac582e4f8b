#!/usr/bin/env bash
# Few-shot prompting baseline on WVB: k shots (default 3) from training records of the same country, else random.
# Env: MODEL (default Qwen/Qwen3-8B), DATA (default runs/data/wvb), OUT (default runs/eval/fewshot), K (default 3).
exec env METHOD=fewshot OUT="${OUT:-runs/eval/fewshot}" "$(dirname "$0")/evaluate_wvs.sh" --fewshot-k "${K:-3}" "$@"
