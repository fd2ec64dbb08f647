# The two commands of the README: `make run` (set up, then run the quickstart workflow) and
# `make test` (set up, then run the whole test suite). Setting up is idempotent.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dagfusion-installed
UI_ASSETS := ui/static/vendor/manifest.json

.PHONY: setup run test test-fast docs bench clean chromium

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build here; a CUDA user installs their own build beforehand
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,diffusion,ui,serve,ray,video]"
	touch $(STAMP)

# The canvas's third-party JavaScript: from the npm registry at the versions in ui/package-lock.json
$(UI_ASSETS): ui/package.json ui/package-lock.json ui/build_assets.py
	cd ui && npm ci --no-audit --no-fund --loglevel=error
	$(PYTHON) ui/build_assets.py

# Debian's chromium for the canvas's browser tests (CI runs as root; elsewhere install it yourself)
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium is not installed, so the canvas's browser tests will be skipped"

setup: $(STAMP) $(UI_ASSETS) chromium

run: $(STAMP) $(UI_ASSETS)
	$(VENV)/bin/dagfusion run workflows/quickstart.yaml --out outputs/quickstart

test: setup
	$(PY) -m pytest

# The fast subset (everything not marked slow): a few minutes on a 2-core machine
test-fast: setup
	$(PY) -m pytest -m "not slow"

docs: setup
	$(VENV)/bin/dagfusion docs

bench: setup
	$(PY) benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) build dist *.egg-info outputs ui/node_modules ui/static/vendor
