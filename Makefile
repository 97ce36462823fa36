# Two entry points for a fresh machine: `make demo` and `make test`. Both set up the venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: venv browser compose lint test gates demo docker-smoke clean

venv: $(STAMP)

# The web page is tested in a real browser: Debian's chromium, driven by playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The compose file is checked by the Compose that Debian ships (docker-compose 1.29), as an operator would run it.
compose:
	@command -v docker-compose >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; }

# torch comes from this machine's local wheels through pip (uv/poetry would download GBs).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

# Lint and types first: a few seconds, before minutes of tests (configured in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check service indexer training tests benchmarks
	$(PY) -m mypy service indexer

test: lint browser compose
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Quality gates of the training methods on the synthetic benchmark (trains the base, three demo models and two
# unlearning runs).
gates: venv
	$(PY) -m pytest -q -m gates tests/training/test_quality_gates.py

demo: venv
	$(VENV)/bin/safe-retrieval demo --workdir $(DEMO_DIR)

# The image on a real Docker engine (installs docker.io and debootstrap when missing; root): build,
# serve a demo gallery, search, media, a retrain job through the admin API. Not part of `make test`.
docker-smoke:
	bash docker/smoke.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
