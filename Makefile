# The two commands a new user needs: `make run` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/local.yaml
# Where pip gets torch 2.13.0 when .venv is created. Empty: pip's default index (PyPI serves the CUDA build on Linux
# x86-64, a CPU build elsewhere). make run TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build,
# .../whl/cu128 for CUDA 12.8 (docs/gpu.md).
TORCH_INDEX ?=

.PHONY: run test bench ui doctor docs clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -e '.[test,bench]'
	touch $(STAMP)

# The local pipeline: ingest → train → evaluate → register → deploy, then serve until Ctrl-C.
# Extra flags go in ARGS, e.g. make run ARGS="--set steps=500 --no-serve-wait".
run: $(STAMP)
	$(BIN)/raydiff run $(CONFIG) $(ARGS)

# pytorch-fid (the FID reference our Inception port is tested against) and the torchvision it builds on, outside the
# environment: that torchvision is a CUDA build whose operators do not load beside the CPU torch (see
# tests/pipelines/test_inception_reference.py).
$(VENV)/fid-reference: | $(STAMP)
	$(BIN)/pip install --no-deps --target $@ torchvision==0.28.0 pytorch-fid==0.3.0

test: $(STAMP) $(VENV)/fid-reference
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

ui: $(STAMP)
	$(BIN)/raydiff ui

# What a run needs (Python, torch build and device, Ray, free ports, disk, Chromium for the tests) and what to fix.
doctor: $(STAMP)
	$(BIN)/raydiff doctor

# docs/reference/*.md from the code (the pipeline keys, the CLI, the sampler catalog).
docs: $(STAMP)
	$(BIN)/python -m docs.generate

clean:
	rm -rf $(VENV) .raydiff mlruns.db mlartifacts
