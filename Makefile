# Developer commands; `make install` first. CI runs .ci/run.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install lint format test test-slow bench demo docs docs-inventories ci

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e ".[dev]"

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy pyro_fdiv

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test:
	$(PY) -m pytest -q -n auto

test-slow:
	$(PY) -m pytest -q -m slow

bench:
	$(PY) benchmarks/bench_vae_step.py
	$(PY) benchmarks/bench_vae_step.py --memory

demo:
	$(VENV)/bin/pyro-fdiv demo

# the Sphinx site: warnings are errors, notebooks executed (PYRO_FDIV_SMOKE=1 unless set)
docs:
	$(VENV)/bin/sphinx-build -W --keep-going -n -b html docs docs/_build/html

# where there is a network: cache the intersphinx inventories in docs/_inventories
docs-inventories:
	curl -fsSL -o docs/_inventories/python.inv https://docs.python.org/3/objects.inv
	curl -fsSL -o docs/_inventories/torch.inv https://docs.pytorch.org/docs/stable/objects.inv
	curl -fsSL -o docs/_inventories/pyro.inv https://docs.pyro.ai/en/stable/objects.inv
	curl -fsSL -o docs/_inventories/numpy.inv https://numpy.org/doc/stable/objects.inv
	curl -fsSL -o docs/_inventories/pandas.inv https://pandas.pydata.org/docs/objects.inv
	curl -fsSL -o docs/_inventories/arviz.inv https://python.arviz.org/en/stable/objects.inv

ci:
	bash .ci/run
