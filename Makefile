# The two commands of the README: `make run` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint format bench clean prometheus chromium stack stack-stop

# Re-install when pyproject.toml changes. torch is pinned exactly (==2.13.0) in pyproject so pip takes the
# local CPU wheel instead of downloading CUDA builds.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Train models if none exist (built-in synthetic data), then serve the API on embedded backends.
run: install
	$(BIN)/decision-platform run

## Lint, then the whole suite: unit tests (embedded backends) and integration tests (real PostgreSQL, Redis).
test: install prometheus chromium
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest

## Debian's prometheus + promtool, which the observability tests and `make stack` use (skips when not root).
prometheus:
	sh scripts/install-prometheus.sh

## Debian's chromium + chromium-driver, which the analyst console's browser tests drive headless (skips when not root).
chromium:
	sh scripts/install-chromium.sh

## The full stack without Docker: tansu (Kafka), Prometheus, the API and the worker, on the running
## PostgreSQL and Redis. `make stack-stop` stops what it started, nothing else.
stack: install
	$(BIN)/python scripts/stack.py start

stack-stop:
	$(PYTHON) scripts/stack.py stop

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: install
	$(BIN)/python bench/bench_api.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
