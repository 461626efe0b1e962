# README command 1: `make demo` (install + full pipeline on the synthetic data); command 2: `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must come as a matching pair from the registry (a local +cpu torch breaks torchvision).
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast bench bench-gpu clean report-check

$(BIN)/sfc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PAIR) -e '.[test]'
	$(BIN)/python -c "import torchvision.ops; torchvision.ops.nms; import pydensecrf.densecrf; print('install ok: torch', __import__('torch').__version__)"
	touch $(BIN)/sfc

install: $(BIN)/sfc

demo: install
	$(BIN)/sfc run --config configs/synthetic.yaml

test: install
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check .
	$(BIN)/mypy

# the fast tier: unit, golden and bad-input tests, no flows, servers or learning runs (under 90 s on 2 cores)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/train_step.py

# every benchmark on CUDA, the CUDA-only tests and the demo flow on CUDA in <= 8 min: bench/results/*-gpu.json.
# No install step: a GPU machine may have only torch, torchvision and numpy (the demo flow is then skipped).
BENCH_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
bench-gpu:
	$(BENCH_PYTHON) bench/gpu_suite.py

clean:
	rm -rf runs .prefect data/synthetic

# RUN's HTML report loaded in headless Chromium: every picture must load (installs Debian's chromium if missing).
RUN ?= synthetic-demo
report-check: install
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/sfc report $(RUN) --check
