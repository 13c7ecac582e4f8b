#!/usr/bin/env bash
# GPU check (under 5 minutes on one H100): CuMA vs LoRA training steps on a ~1B-parameter Qwen3-style model with
# random bf16 weights at sequence length 1024; prints tokens/s, peak memory and their CuMA/LoRA ratios.
#   bash benchmarks/gpu_check.sh              # on a CUDA machine; JSON also written to ${OUT:-.}/gpu_check.json
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: the same code path on a tiny model
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if [ "${1:-}" != "--dry-run" ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; fi
exec timeout 290 "$PY" benchmarks/gpu_check.py --json "${OUT:-.}/gpu_check.json" "$@"
