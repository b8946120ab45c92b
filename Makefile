# Developer commands; `make install` first. CI runs .ci/run.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install lint format test test-slow bench demo ci

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e ".[dev]"

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test:
	$(PY) -m pytest -q

test-slow:
	$(PY) -m pytest -q -m slow

bench:
	$(PY) benchmarks/bench_vae_step.py
	$(PY) benchmarks/bench_vae_step.py --memory

demo:
	$(VENV)/bin/pyro-fdiv demo

ci:
	bash .ci/run
