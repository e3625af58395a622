# Steward developer commands. Works on a fresh clone: the virtualenv is created on first use and
# re-installed only when pyproject.toml changes (stamp files inside .venv).

# Prefer python3.11 explicitly; any python3 >= 3.11 is accepted (checked below).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help run test lint bench vendor clean distclean

help:
	@echo "make run        install and start everything (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL)"
	@echo "make test       run the test suite (pytest -n 2); PYTEST_ARGS='-k name' to narrow it"
	@echo "make lint       ruff + mypy --strict + deptry (undeclared or unused dependencies)"
	@echo "make bench      run the engine benchmark"
	@echo "make vendor     re-fetch the pinned browser assets in static/vendor/ from the npm registry"
	@echo "make clean      remove caches and install stamps (keeps .venv and the .steward data)"
	@echo "make distclean  clean, and remove .venv too"

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "error: python3.11 (or python3 >= 3.11) not found on PATH" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: $(PYTHON) is older than Python 3.11" >&2; exit 1; }
	@# Debian/Ubuntu ship the venv module separately; say so instead of leaving a half-made .venv.
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "error: '$(PYTHON) -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	@touch $@

# The dev extras include everything `make run` needs, so this stamps both.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/steward up

# tests/auth needs a real OpenID provider (node, from the committed lock file) and a headless Chromium.
OIDC_MODULES := tests/oidc/node_modules/.installed

$(OIDC_MODULES): tests/oidc/package-lock.json
	cd tests/oidc && npm ci --no-audit --no-fund
	@touch $@

# tests/dashboard checks pages with axe-core (node, from the committed lock file), injected into Chromium.
BROWSER_MODULES := tests/browser/node_modules/.installed

$(BROWSER_MODULES): tests/browser/package-lock.json
	cd tests/browser && npm ci --no-audit --no-fund
	@touch $@

/usr/bin/chromium:
	apt-get install -y chromium

# tests/test_metrics.py checks both metrics endpoints with Prometheus's promtool.
/usr/bin/promtool:
	apt-get install -y --no-install-recommends prometheus

test: $(VENV)/.installed-dev $(OIDC_MODULES) $(BROWSER_MODULES) /usr/bin/chromium /usr/bin/promtool
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy --strict app workers
	$(BIN)/deptry .

bench: $(VENV)/.installed
	$(BIN)/python bench/engine.py

# Pinned versions and integrities are in the script; it refuses a tarball that does not match them.
vendor:
	python3 scripts/vendor-static.py

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	@# Data directories of interrupted test runs (tests/test_cli.py removes its own when it finishes).
	rm -rf .steward-test-*
	rm -f $(VENV)/.installed $(VENV)/.installed-dev

distclean: clean
	rm -rf $(VENV)
