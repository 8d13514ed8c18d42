# Two commands set up a fresh machine (see README):
#   make quickstart   installs into .venv and runs the main job
#   make test         installs into .venv and runs the test suite
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup quickstart test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

quickstart: setup
	$(VENV)/bin/visto quickstart

test: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -n 2 --timeout 900 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench
