# The two commands a new user needs: `make run` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/local.yaml

.PHONY: run test bench ui clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test,bench]'
	touch $(STAMP)

# The local pipeline: ingest → train → evaluate → register → deploy, then serve until Ctrl-C.
# Extra flags go in ARGS, e.g. make run ARGS="--set steps=500 --no-serve-wait".
run: $(STAMP)
	$(BIN)/raydiff run $(CONFIG) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

ui: $(STAMP)
	$(BIN)/raydiff ui

clean:
	rm -rf $(VENV) .raydiff mlruns.db mlartifacts
