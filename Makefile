# OpenSet developer commands. `make serve` and `make test` are the two a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint clean

# Creates .venv and installs the project with its test tools. Idempotent: it reinstalls only
# when pyproject.toml changed since the last run.
setup: $(STAMP) redis promtool ops

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

# promtool checks the alert rules in tests/test_deploy.py. Only the binary is unpacked from Debian's
# prometheus package into .cache/tools (nothing is installed or started); without apt the check is skipped.
PROMTOOL := .cache/tools/bin/promtool
.PHONY: promtool
promtool:
	@command -v promtool >/dev/null 2>&1 || test -x $(PROMTOOL) || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    tmp=$$(mktemp -d); \
	    (cd $$tmp && (apt-get download -q prometheus || (apt-get update -q && apt-get download -q prometheus))) >/dev/null 2>&1 \
	      && dpkg-deb -x $$tmp/prometheus_*.deb $$tmp/root && mkdir -p $(dir $(PROMTOOL)) \
	      && cp $$tmp/root/usr/bin/promtool $(PROMTOOL) \
	      || echo "could not unpack promtool from Debian's prometheus package" >&2; \
	    rm -rf $$tmp; \
	  else echo "promtool is missing: the rule check in tests/test_deploy.py is skipped" >&2; fi; }

# Builds the C++ multi-scale deformable attention kernel once into .cache/torch_extensions (later runs
# only check it). Without a compiler the operator falls back to its reference with a warning.
.PHONY: ops
ops: $(STAMP)
	@$(BIN)/python -m models.ops.build || echo "C++ ms_deform_attn kernel not built: using the reference" >&2

serve: setup
	$(BIN)/openset serve

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache build *.egg-info
