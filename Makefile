# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo run test test-fast test-clock lint docs pytest programs bench bench-quick settings-table clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The demo installs kontod and its embedded PostgreSQL only (no test tools), with a Python
# that pgserver has a build for (scripts/pick-python says so before installing anything).
$(VENV)/.installed-demo: pyproject.toml scripts/pick-python
	@if [ -x $(BIN)/python ]; then \
		./scripts/pick-python --only $(BIN)/python >/dev/null || { \
			echo "make demo: $(VENV) was made with it; remove it (make clean) first" >&2; \
			exit 1; }; \
	else \
		python=$$(./scripts/pick-python $(PYTHON)) || exit 1; \
		echo "$$python -m venv $(VENV)"; $$python -m venv $(VENV); \
	fi
	$(BIN)/pip install --quiet -e '.[embedded]'
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/kontod demo

run: $(VENV)/.installed
	$(BIN)/kontod run

# The programs some tests drive (promtool, prometheus, alertmanager, systemd-analyze, chromium,
# faketime, and PM2 from npm).
programs:
	./scripts/install-test-programs

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

pytest: $(VENV)/.installed
	$(BIN)/pytest

# The docs site, built as CI builds it: a broken link or anchor fails.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

test: programs lint docs pytest

# The unit tests alone: pure functions and settings, no database, no program, a few seconds.
test-fast: $(VENV)/.installed
	$(BIN)/pytest -q tests/unit

# The suite must not depend on the time of day: the tests that start a daemon (in-process or
# `kontod run`), follow a schedule or write a dated row, with every clock of the run (pytest,
# PostgreSQL, kontod) moved to 01:59, 02:00 and 06:00 of Europe/Paris by
# scripts/test-at-clock. Left out: the tests of Go programs, which do not see the moved clock,
# and tests/integration/test_faults.py (second-by-second schedules, 2.5 min a run), whose slow
# batches a PostgreSQL under libfaketime cancels early (docs/design.md, Tests). Each time has a bound: a
# hang fails, never waits.
CLOCK_TIMES ?= 01:59 02:00 06:00
IT := tests/integration
CLOCK_TESTS ?= $(IT)/test_http.py $(IT)/test_rates.py $(IT)/test_status_page.py \
	$(IT)/test_operations.py $(IT)/test_cli.py $(IT)/test_cli_operations.py $(IT)/test_daemon.py \
	$(IT)/test_cli_listing.py $(IT)/test_cli_demo.py \
	$(IT)/test_pings.py $(IT)/test_lifecycle.py $(IT)/test_signals.py $(IT)/test_runner.py \
	$(IT)/test_snapshots.py tests/unit/test_schedule.py tests/unit/test_schedule_zones.py \
	tests/unit/test_health.py tests/unit/test_retries.py

test-clock: programs $(VENV)/.installed
	set -e; for at in $(CLOCK_TIMES); do \
		PYTEST=$(BIN)/pytest timeout -k 30 600 ./scripts/test-at-clock $$at -q $(CLOCK_TESTS); \
	done

# The benchmarks (bench/README.md): the full run writes bench/results/ and docs/performance.md's
# Performance table; the quick one only checks that the harness still works.
bench: $(VENV)/.installed
	$(BIN)/python -m bench --readme docs/performance.md

bench-quick: $(VENV)/.installed
	$(BIN)/python -m bench --quick

# The settings table of docs/configuration.md, made from the spec table in kontod/config.py.
settings-table: $(VENV)/.installed
	$(BIN)/python scripts/settings-table docs/configuration.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
