# Everyday commands. `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv run test test-services services-up services-down services-clean check lint typecheck fmt bench deploy-check lock clean

help:
	@echo "make run           run the engine on its embedded defaults (config/dev.toml)"
	@echo "make test          install what the tests need and run them"
	@echo "make test-services start Kafka, ClickHouse, S3 and Prometheus (no Docker) and run the service tier"
	@echo "make check         ruff and mypy --strict"
	@echo "make deploy-check  validate deploy/ (promtool, dashboards), compose.yaml and requirements.lock"
	@echo "make lock          regenerate requirements.lock (the image's pinned, hashed dependencies)"
	@echo "make bench         pipeline benchmark (synthetic -> embedded bus -> chDB, with bars)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,services]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/alphaengine run --config config/dev.toml

test: $(STAMP)
	$(BIN)/pytest -q

test-services: $(STAMP)
	bash scripts/services/all.sh start >/dev/null
	$(BIN)/pytest -q tests/services; rc=$$?; \
	  [ -n "$(KEEP_SERVICES)" ] || bash scripts/services/all.sh clean; exit $$rc

services-up: $(STAMP)
	bash scripts/services/all.sh start

services-down:
	bash scripts/services/all.sh stop

services-clean:
	bash scripts/services/all.sh clean

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py

deploy-check: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/check-deploy.sh

# requirements.lock: the runtime dependencies of pyproject.toml (not the extras) for the image (CPython
# 3.11, x86_64 manylinux), with hashes. The versions installed in the venv, which the tests ran, are the
# constraints: to upgrade a dependency, upgrade it in the venv, run the tests, then `make lock`.
lock: $(STAMP)
	$(BIN)/pip install --quiet 'uv==0.13.9'
	$(BIN)/pip freeze --exclude-editable >$(VENV)/freeze.txt
	$(BIN)/uv pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --constraints $(VENV)/freeze.txt \
	  --custom-compile-command 'make lock' --output-file requirements.lock

clean:
	rm -rf var .mypy_cache .ruff_cache .pytest_cache
