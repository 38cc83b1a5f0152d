# make train [ARGS="experiment=cpu_proxy ..."]   create .venv if missing, install, train
# make test [PYTEST_ARGS=...]                     install dev extras, run the test suite (in parallel)
# make report DIR=logs/train/multiruns/<time>      table + plot for a multirun
# make install TORCH_CPU=1                        no GPU: PyTorch's CPU-only wheels (pip's default torch brings CUDA's)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# make test runs pytest on one xdist worker per core (docs/testing.md); PYTEST_PARALLEL= runs it in one process.
PYTEST_PARALLEL ?= -n auto --dist loadgroup
# TORCH_CPU=1: torch and torchvision from PyTorch's CPU-only index first, so pip keeps them (no CUDA wheels).
TORCH_CPU ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install install-dev train test lint report clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(if $(TORCH_CPU),$(PY) -m pip install torch torchvision --index-url $(TORCH_CPU_INDEX))

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
