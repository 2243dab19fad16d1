# OpenSet developer commands. `make serve` and `make test` are the two a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint clean

# Creates .venv and installs the project with its test tools. Idempotent: it reinstalls only
# when pyproject.toml changed since the last run.
setup: $(STAMP) redis

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The tests start a real redis-server; install Debian's when it is missing and we are root.
.PHONY: redis
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)) >/dev/null; \
	  else echo "redis-server is missing: install it (e.g. 'sudo apt-get install redis-server')" >&2; exit 1; fi; }

serve: setup
	$(BIN)/openset serve

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache build *.egg-info
