# Two commands on a fresh machine: `make demo` and `make test` (both create .venv if missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FAST := not ray and not chaos and not cluster
# Two pytest processes, a test file each at a time (a file's module fixtures are built once), the
# longest files first (tests/conftest.py orders them): much of a Ray test is waiting on start-up.
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadfile --no-loadscope-reorder

# Bytecode for our own modules, written once: where PYTHONDONTWRITEBYTECODE is set (it is on these
# machines), each of the few hundred processes a test run starts would compile kd_ray again (~0.3 s).
COMPILE := $(BIN)/python -m compileall -q kd_ray tests scripts

export RAY_AUTH_MODE ?= disabled
export NO_MKDOCS_2_WARNING ?= 1  # mkdocs-material's end-of-life notice on every build

.PHONY: install demo lint docs test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision are pinned to the builds this machine serves from disk; see docs/getting-started.md.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kd-ray demo

# The import contracts in pyproject.toml: layers, Ray only in kd_ray.cluster, no cycles.
lint: $(STAMP)
	$(BIN)/lint-imports

# The manual (mkdocs.yml, docs/) into site/; `mkdocs serve` serves it while you edit.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# Everything (CI runs this): contracts, the manual (a broken link or a page left out fails), then
# unit, Ray, chaos and cluster tests.
test: lint
	bash scripts/test_deps.sh  # sshd and rsync for the cluster tests, if missing
	$(BIN)/mkdocs build --strict
	$(COMPILE)
	$(BIN)/python -m pytest -q $(XDIST) --durations=15

# Under a minute: no Ray instance, no chaos, no clusters.
test-fast: lint
	$(COMPILE)
	$(BIN)/python -m pytest -q $(XDIST) -m "$(FAST)"

clean:
	rm -rf results .pytest_cache site
