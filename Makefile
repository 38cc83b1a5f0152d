# make train [ARGS="experiment=cpu_proxy ..."]   create .venv if missing, install, train
# make test [PYTEST_ARGS=...]                     install dev extras, run the test suite (in parallel)
# make report DIR=logs/train/multiruns/<time>      table + plot for a multirun
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# make test runs pytest on one xdist worker per core (docs/testing.md); PYTEST_PARALLEL= runs it in one process.
PYTEST_PARALLEL ?= -n auto --dist loadgroup

.PHONY: install install-dev train test lint report clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

train: install
	$(PY) train.py $(ARGS)

test: install-dev
	$(PY) -m ruff check src tests train.py benchmarks
	$(PY) -m pytest -q -ra $(PYTEST_PARALLEL) $(PYTEST_ARGS)

lint: install-dev
	$(PY) -m ruff check src tests train.py benchmarks

report: install
	$(PY) -m cifar_speedrun.records.report $(DIR) $(REPORT_ARGS)

clean:
	rm -rf logs outputs multirun .pytest_cache
