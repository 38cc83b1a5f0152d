# make train [ARGS="experiment=cpu_proxy ..."]   create .venv if missing, install, train
# make test                                       install dev extras, run the test suite
# make report DIR=logs/train/multiruns/<time>      table + plot for a multirun
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

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
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: install-dev
	$(PY) -m ruff check src tests train.py benchmarks

report: install
	$(PY) -m cifar_speedrun.records.report $(DIR) $(REPORT_ARGS)

clean:
	rm -rf logs outputs multirun .pytest_cache
