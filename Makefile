# The two commands the README starts with:
#   make bench   set everything up (venv, torch, build) and print the benchmark table
#   make test    run the test suite (builds first if needed)
# TORCH selects the torch a new venv gets: the newest supported release the package index
# serves by default, TORCH=2.11.0 for the oldest supported (use another VENV to keep both).
PYTHON ?= python3
TORCH ?= 2.14.1
VENV ?= .venv
BIN := $(VENV)/bin
# torchvision (the model benchmark's and tests' architectures) must be the release built for
# this torch; an unknown TORCH gets none and the model rows are skipped.
TORCHVISION_FOR_2.14.1 := 0.29.1
TORCHVISION_FOR_2.11.0 := 0.26.0
TORCHVISION ?= $(TORCHVISION_FOR_$(TORCH))
DEPS := torch==$(TORCH) $(if $(TORCHVISION),torchvision==$(TORCHVISION)) numpy ninja setuptools wheel pytest \
	pytest-timeout hypothesis psutil matplotlib tqdm scikit-learn ruff
DEPS_STAMP := $(VENV)/.deps-torch-$(TORCH)-torchvision-$(TORCHVISION)
# CUDA sources build whenever nvcc and torch's CUDA build are present (BATCHOPS_CUDA=auto).
export MAX_JOBS ?= 2
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h)
# One checkout holds one build of batchops._C: the stamp says which venv it was built for, so
# switching VENV (and with it torch) rebuilds; objects are kept per torch under build/.
BUILT := build/.built-for-$(subst /,_,$(VENV))
PYTEST_ARGS ?= -q --timeout 300 --durations 15

.PHONY: setup build bench test test-quick lint gpu-check clean

setup: $(DEPS_STAMP) $(BUILT)

$(DEPS_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(DEPS)
	rm -f $(VENV)/.deps-torch-*
	touch $@

# Not --no-deps: pip checks batchops' torch range against the installed torch and keeps it.
$(BUILT): $(DEPS_STAMP) $(SOURCES)
	@mkdir -p build && rm -f build/.built-for-*
	$(BIN)/python scripts/build.py $(BIN)/pip install --no-build-isolation -e .
	$(BIN)/python -c "import batchops, sys; i = batchops.build_info(); print(i); sys.exit(0 if i['extension_loaded'] else 1)"
	touch $@

build: setup

bench: setup
	$(BIN)/batchops bench

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# Local iteration: everything but the tests marked slow (examples, torchrun, multi-process).
test-quick: setup
	$(BIN)/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

# ruff, configured in pyproject.toml (CI runs this).
lint: $(DEPS_STAMP)
	$(BIN)/python -m ruff --version > /dev/null 2>&1 || $(BIN)/pip install -q ruff
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

# One call on a lent GPU machine (about 8 minutes): build for the visible GPU, the cuda tests,
# compute-sanitizer, a quick benchmark; stages and outputs: scripts/gpu-check.sh.
gpu-check:
	bash scripts/gpu-check.sh

clean:
	rm -rf build *.egg-info batchops/_C*.so
