# Two commands on a fresh machine: `make demo` and `make test` (both create .venv if missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FAST := not ray and not chaos and not cluster

export RAY_AUTH_MODE ?= disabled

.PHONY: install demo lint test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision are pinned to the builds this machine serves from disk; see README.
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

# Everything (CI runs this): contracts, then unit, Ray, chaos and cluster tests. The cluster
# tests need sshd and rsync: scripts/test_deps.sh installs them if missing.
test: lint
	bash scripts/test_deps.sh
	$(BIN)/python -m pytest -q

# Under a minute: no Ray instance, no chaos, no clusters.
test-fast: lint
	$(BIN)/python -m pytest -q -m "$(FAST)"

clean:
	rm -rf results .pytest_cache
