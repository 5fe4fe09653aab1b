# The two commands the README starts with:
#   make bench   set everything up (venv, torch, build) and print the benchmark table
#   make test    run the test suite (builds first if needed)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := torch==2.14.1 numpy ninja setuptools wheel pytest pytest-timeout hypothesis psutil matplotlib tqdm scikit-learn
# CUDA sources build whenever nvcc and torch's CUDA build are present (BATCHOPS_CUDA=auto).
export MAX_JOBS ?= 2
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
PYTEST_ARGS ?= -q --timeout 300 --durations 15

.PHONY: setup build bench test gpu-check clean

setup: $(VENV)/.deps-installed $(VENV)/.built

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps-installed $(SOURCES)
	$(BIN)/pip install --no-build-isolation --no-deps -e . -v 2>&1 | grep -E "batchops setup|error|Error" || true
	$(BIN)/python -c "import batchops, sys; i = batchops.build_info(); print(i); sys.exit(0 if i['extension_loaded'] else 1)"
	touch $@

build: $(VENV)/.built

bench: setup
	$(BIN)/batchops bench

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# One call on a GPU machine: build for the visible GPU, run the whole suite (cuda cases
# included), run the benchmarks on cuda and write benchmarks/results/.
gpu-check:
	bash scripts/gpu-check.sh

clean:
	rm -rf build *.egg-info batchops/_C*.so $(VENV)/.built
