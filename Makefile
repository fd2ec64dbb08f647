# The two commands of the README: `make run` (set up, then run the quickstart workflow) and
# `make test` (set up, then run the whole test suite). Setting up is idempotent.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dagfusion-installed

.PHONY: setup run test docs bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build here; a CUDA user installs their own build beforehand
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,diffusion]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/dagfusion run workflows/quickstart.yaml --out outputs/quickstart

test: setup
	$(PY) -m pytest

docs: setup
	$(VENV)/bin/dagfusion docs

bench: setup
	$(PY) benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) build dist *.egg-info outputs
