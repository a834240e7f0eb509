# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo run test test-clock lint pytest programs bench bench-quick settings-table clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/kontod demo

run: $(VENV)/.installed
	$(BIN)/kontod run

# The programs some tests drive (promtool, prometheus, alertmanager, systemd-analyze).
programs:
	./scripts/install-test-programs

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

pytest: $(VENV)/.installed
	$(BIN)/pytest

test: programs lint pytest

# The suite must not depend on the time of day: the tests that start a daemon (in-process or
# `kontod run`), follow a schedule or write a dated row, with every clock of the run (pytest,
# PostgreSQL, kontod) moved to 01:59, 02:00 and 06:00 of Europe/Paris by
# scripts/test-at-clock. Left out: the tests of Go programs, which do not see the moved clock,
# and tests/test_faults.py (second-by-second schedules, 2.5 min a run), whose slow batches a
# PostgreSQL under libfaketime cancels early (README, Tests). Each time has a bound: a hang
# fails, never waits.
CLOCK_TIMES ?= 01:59 02:00 06:00
CLOCK_TESTS ?= tests/test_http.py tests/test_rates.py tests/test_status_page.py \
	tests/test_operations.py tests/test_cli.py tests/test_cli_operations.py tests/test_daemon.py \
	tests/test_pings.py tests/test_lifecycle.py tests/test_signals.py tests/test_runner.py \
	tests/test_schedule.py tests/test_schedule_zones.py tests/test_health.py \
	tests/test_retries.py tests/test_snapshots.py

test-clock: programs $(VENV)/.installed
	set -e; for at in $(CLOCK_TIMES); do \
		PYTEST=$(BIN)/pytest timeout -k 30 600 ./scripts/test-at-clock $$at -q $(CLOCK_TESTS); \
	done

# The benchmarks (bench/README.md): the full run writes bench/results/ and the README's
# Performance table; the quick one only checks that the harness still works.
bench: $(VENV)/.installed
	$(BIN)/python -m bench --readme README.md

bench-quick: $(VENV)/.installed
	$(BIN)/python -m bench --quick

# The README's settings table, made from the spec table in kontod/config.py.
settings-table: $(VENV)/.installed
	$(BIN)/python scripts/settings-table README.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
