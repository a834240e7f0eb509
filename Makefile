# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo run test lint pytest programs bench bench-quick clean

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

# The benchmarks (bench/README.md): the full run writes bench/results/ and the README's
# Performance table; the quick one only checks that the harness still works.
bench: $(VENV)/.installed
	$(BIN)/python -m bench --readme README.md

bench-quick: $(VENV)/.installed
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
