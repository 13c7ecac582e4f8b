#!/usr/bin/env bash
# GPU check, one command, under 5 minutes on one H100/H200: LoRA r=64 vs CuMA r=64 (reference path, fast path, the
# per-expert loop, and the fast path's parts) on a ~1B-parameter Qwen3-style model with random bf16 weights, batch
# 4 x 1024: training tokens/s, step time, peak memory, generation tokens/s at batch 16 with mixed profiles, the ratios
# and the issue-15 targets.
#   bash benchmarks/gpu_check.sh              # on a CUDA machine; JSON to ${OUT:-benchmarks/results}/gpu_check_<date>.json
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: the same code path on a tiny model (JSON to ${OUT:-/tmp})
#   SERVE_METHODS=1 bash benchmarks/gpu_check.sh   # then also benchmarks/bench_serve_methods.py --device cuda
# Needs torch with CUDA and triton (pip install triton; the CUDA wheels of torch bring it) in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if [ "${1:-}" != "--dry-run" ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; fi
DEST=${OUT:-benchmarks/results}
if [ "${1:-}" = "--dry-run" ]; then DEST=${OUT:-${TMPDIR:-/tmp}}; fi  # a CPU dry run is not a result
mkdir -p "$DEST"
if [ "${SERVE_METHODS:-0}" != "1" ] || [ "${1:-}" = "--dry-run" ]; then
  exec timeout 295 "$PY" benchmarks/gpu_check.py --json "$DEST/gpu_check_$(date -u +%Y-%m-%dT%H%M%S).json" "$@"
fi
# SERVE_METHODS=1: afterwards, the same cuma serve with a LoRA and a CuMA adapter on the GPU (issue 33's ratios);
# adds about 5-8 minutes (SmolLM2-135M servers; three start-ups)
status=0
timeout 295 "$PY" benchmarks/gpu_check.py --json "$DEST/gpu_check_$(date -u +%Y-%m-%dT%H%M%S).json" "$@" || status=$?
timeout 600 "$PY" benchmarks/bench_serve_methods.py --device cuda --repeats 5 --stream-repeats 2 \
  --json "$DEST/serve_methods_cuda_$(date -u +%Y-%m-%dT%H%M%S).json" || status=$?
exit $status
