# vqgen — `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vqgen-installed
PYTEST_FLAGS ?= -q

.PHONY: install demo test test-all bench lint clean

# (Re)install when the venv is missing or a pyproject changed.
$(STAMP): pyproject.toml examples/vqgen-plugin-example/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -e examples/vqgen-plugin-example
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded shapes data: train both stages, sample, write pictures.
demo: $(STAMP)
	$(PY) -m vqgen data preview shapes -o runs/demo/data.png
	$(PY) -m vqgen demo --config configs/demo.yaml --out runs/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_FLAGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
