# The README's two commands: `make demo` (main job on the embedded default)
# and `make test` (lint + the whole test suite). Each installs what it needs.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install install-test demo test lint

install:
	$(PIP) install -e .

# torch first, as the CPU build: anything that pulls torch later finds it there.
install-test:
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"

demo: install
	$(PYTHON) -m vqdiffusion_jax.main --config=configs/shapes.py --workdir=runs/shapes

lint:
	$(PYTHON) -m ruff check .

test: install-test lint
	$(PYTHON) -m pytest
