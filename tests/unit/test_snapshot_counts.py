"""The snapshot job's decisions outside its SQL, as tables: what a batch's row and the rate
sources' report add to the run's counts. No database, no rate source."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from kontod.jobs.snapshots import batch_counts, rate_counts
from kontod.providers.rates import CurrencyRate, RateReport

DAY = date(2026, 3, 1)


def batch_row(**overrides: Any) -> dict[str, Any]:
    """A batch statement's row: ten users, all written, nothing odd; ``overrides`` change it."""
    row: dict[str, Any] = {
        "users": 10,
        "fresh_rows": 40,
        "written": 40,
        "removed": 0,
        "holdings": 30,
        "holdings_written": 30,
        "holdings_removed": 0,
        "unconverted_currencies": None,
        "unconverted_accounts": None,
        "invalid": 0,
        "invalid_keys": None,
        "failed": 0,
        "failed_users": None,
    }
    row.update(overrides)
    return row


BASE = {
    "users": 10,
    "items_users": 10,
    "items_failed": 0,
    "items_invalid": 0,
    "rows_written": 40,
    "rows_unchanged": 0,
    "rows_removed": 0,
    "holdings_written": 30,
    "holdings_unchanged": 0,
    "holdings_removed": 0,
    "batches": 1,
}


# (what the batch's row says) -> (the counts that differ from a plain batch of ten users).
@pytest.mark.parametrize(
    ("row", "changed"),
    [
        ({}, {}),
        # A re-run where nothing changed: everything unchanged, nothing written.
        (
            {"written": 0, "holdings_written": 0},
            {
                "rows_written": 0,
                "rows_unchanged": 40,
                "holdings_written": 0,
                "holdings_unchanged": 30,
            },
        ),
        (
            {"written": 25, "removed": 3},
            {"rows_written": 25, "rows_unchanged": 15, "rows_removed": 3},
        ),
        # A failed user is a user of the batch, but not an item done.
        ({"failed": 2, "failed_users": [3, 4]}, {"items_users": 8, "items_failed": 2}),
        ({"invalid": 3, "invalid_keys": ["asset:1"]}, {"items_invalid": 3}),
        # Accounts left out for want of a rate: by currency, and in all.
        (
            {"unconverted_currencies": ["BTC", "USD"], "unconverted_accounts": [2, 5]},
            {"unconverted_BTC": 2, "unconverted_USD": 5, "items_unconverted": 7},
        ),
    ],
)
def test_what_a_batch_adds_to_the_counts(row: dict[str, Any], changed: dict[str, int]) -> None:
    assert dict(batch_counts(batch_row(**row))) == BASE | changed


def test_a_batch_with_mismatched_unconverted_arrays_is_refused() -> None:
    with pytest.raises(ValueError, match="longer"):
        batch_counts(batch_row(unconverted_currencies=["USD"], unconverted_accounts=[1, 2]))


def rate(cur: str, *, fetched: bool, age: int | None, max_age: int = 7) -> CurrencyRate:
    return CurrencyRate(
        currency=cur,
        fetched=fetched,
        day=None if age is None else DAY,
        source=None if age is None else "ecb",
        age_days=age,
        usable=age is not None and age <= max_age,
    )


# (the currencies' rates, sources failed, quotes stored) -> the counts recorded.
@pytest.mark.parametrize(
    ("rates", "failed", "stored", "counts"),
    [
        # Nothing in use: the two totals are still recorded, at zero.
        ([], {}, 0, {"rates_stored": 0, "rate_sources_failed": 0}),
        (
            [rate("USD", fetched=True, age=0)],
            {},
            1,
            {"rates_stored": 1, "rate_sources_failed": 0, "rate_age_days_USD": 0},
        ),
        # A source failed: an older stored rate stands in, and says so.
        (
            [rate("USD", fetched=False, age=3)],
            {"ecb": "down"},
            0,
            {
                "rates_stored": 0,
                "rate_sources_failed": 1,
                "rate_age_days_USD": 3,
                "rate_fallback_USD": 1,
            },
        ),
        # Too old to use is still an age; no rate at all has none.
        (
            [rate("GBP", fetched=False, age=30), rate("XAU", fetched=False, age=None)],
            {"ecb": "down", "crypto": "down"},
            0,
            {
                "rates_stored": 0,
                "rate_sources_failed": 2,
                "rate_age_days_GBP": 30,
                "rate_fallback_GBP": 1,
            },
        ),
    ],
)
def test_what_the_rate_sources_add_to_the_counts(
    rates: list[CurrencyRate], failed: dict[str, str], stored: int, counts: dict[str, int]
) -> None:
    report = RateReport(
        currencies={r.currency: r for r in rates}, failed_sources=failed, stored=stored
    )
    assert rate_counts(report) == counts
