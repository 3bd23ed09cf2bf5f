# medkernels developer and CI entry points.  Every target does its own set-up
# from a fresh clone: `make test` and `make bench` need nothing else.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON3 ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.14.1

# Build settings; each can be overridden from the environment or the command line.
CUDA_HOME ?= $(wildcard /usr/local/cuda)
# CI (CI=true, no GPU) compiles the CUDA kernels for one architecture to stay fast; elsewhere setup.py
# picks the visible GPUs' architectures, or 8.0;9.0 when there is none.
ifeq ($(CI),true)
TORCH_CUDA_ARCH_LIST ?= 9.0
endif
MAX_JOBS ?= 2
BENCH_ARGS ?=
# The editable build recompiles everything, so it is redone only when a build input changed.
BUILD_STAMP := $(VENV)/.medkernels-build-stamp
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f)

.PHONY: all venv build bench-build test test-sanitize bench bench-full bench-readme bench-pytest clean

all: test

venv:
	@if [ ! -x "$(PY)" ]; then \
		echo "make: creating $(VENV)"; \
		$(PYTHON3) -m venv "$(VENV)"; \
		$(PY) -m pip install --quiet --upgrade pip; \
	fi
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "make: installing torch==$(TORCH_VERSION)"; \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	fi
	$(PIP) install --quiet -r requirements-dev.txt
	$(PIP) install --quiet -r requirements-train.txt

build: venv $(BUILD_STAMP)

$(BUILD_STAMP): $(BUILD_INPUTS) | venv
	@start=$$(date +%s); \
	if [ -n "$(CUDA_HOME)" ]; then export CUDA_HOME="$(CUDA_HOME)"; fi; \
	if [ -n "$(TORCH_CUDA_ARCH_LIST)" ]; then export TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)"; fi; \
	export MAX_JOBS="$(MAX_JOBS)"; \
	echo "make: building medkernels (CUDA_HOME=$${CUDA_HOME:-<none>} TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-<setup.py default>} MAX_JOBS=$$MAX_JOBS)"; \
	$(PIP) install --no-build-isolation --no-deps -e .; \
	echo "make: build took $$(( $$(date +%s) - start ))s"
	@touch $(BUILD_STAMP)

# Without a GPU the benchmarks cannot run CUDA kernels, so `make bench` there builds only the C++ CPU kernels
# (minutes instead of a quarter of an hour of nvcc), unless a full build is already up to date.  The CPU-only
# build replaces the full one in place, so it drops the full build's stamp.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
BUILD_STAMP_CPU := $(VENV)/.medkernels-build-stamp-cpu

$(BUILD_STAMP_CPU): $(BUILD_INPUTS) | venv
	@start=$$(date +%s); \
	echo "make: no GPU: building medkernels with the C++ CPU kernels only (MAX_JOBS=$(MAX_JOBS))"; \
	rm -f $(BUILD_STAMP); \
	MEDKERNELS_BUILD_CUDA=0 MAX_JOBS="$(MAX_JOBS)" $(PIP) install --no-build-isolation --no-deps -e .; \
	echo "make: build took $$(( $$(date +%s) - start ))s"
	@touch $(BUILD_STAMP_CPU)

bench-build: venv
	@if [ -n "$(HAS_GPU)" ]; then \
		$(MAKE) --no-print-directory build; \
	elif [ -f $(BUILD_STAMP) ] && [ -z "$$(find $(BUILD_INPUTS) -newer $(BUILD_STAMP))" ]; then \
		echo "make: using the up-to-date full build"; \
	else \
		$(MAKE) --no-print-directory $(BUILD_STAMP_CPU); \
	fi

test: build
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "make: GPU found, running Triton kernels on it"; \
	else \
		echo "make: no GPU, running Triton kernels with TRITON_INTERPRET=1"; \
		export TRITON_INTERPRET=1; \
	fi; \
	$(PY) -m pytest tests -q

# The C++ CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer, in a copy of the tree under
# build/sanitize (the in-place build is left alone), and the CPU kernel tests run on them with libasan preloaded
# (tools/sanitize.sh; docs/correctness.md).  SANITIZE_ARGS replaces the default tests with pytest arguments.
SANITIZE_ARGS ?=
test-sanitize: venv
	PY="$(PY)" MAX_JOBS="$(MAX_JOBS)" tools/sanitize.sh $(SANITIZE_ARGS)

# The quick suite (a few minutes on a 2-core CPU): prints the tables, writes
# benchmarks/results/<device>.json and the .md table and .png plot beside it.  BENCH_ARGS passes options through.
bench: bench-build
	$(PIP) install --quiet -r requirements-bench.txt
	$(PY) -m benchmarks $(BENCH_ARGS)

# Every stage shape, larger batches and torch.compile: meant for a GPU machine (hours on a small CPU).
bench-full: bench-build
	$(PIP) install --quiet -r requirements-bench.txt
	$(PY) -m benchmarks --full $(BENCH_ARGS)

# Rewrite the README's benchmark summaries, and each recorded JSON's .md table and .png plot, from the recorded
# JSONs (no timing).
bench-readme: venv
	$(PY) -m benchmarks --plot-from $(wildcard benchmarks/results/*.json) \
		--readme-from $(wildcard benchmarks/results/*.json) --update-readme README.md

# The op micro-benchmarks as a pytest-benchmark suite (kept out of `make test`).
bench-pytest: bench-build
	$(PIP) install --quiet -r requirements-bench.txt
	$(PY) -m pytest benchmarks/ --benchmark-only $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache $(BUILD_STAMP) $(BUILD_STAMP_CPU)
	find medkernels -name '_C*.so' -delete
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
