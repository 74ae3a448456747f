# `make demo` and `make test` bootstrap .venv on a fresh machine (python3 >= 3.11 needed), then do their job.
# The install is skipped while .venv is current with pyproject.toml.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.visionpipe-installed
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck unit install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/visionpipe demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy components pipelines serving

unit: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint typecheck unit

clean:
	rm -rf runs bundles .pytest_cache .mypy_cache .ruff_cache
