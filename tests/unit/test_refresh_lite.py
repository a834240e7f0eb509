"""The SQLite-family refresh's pure parts: column types read as casts, text times, the JSON batch."""

from __future__ import annotations

import sqlite3
from datetime import UTC, date, datetime

import pytest

from kontod.jobs.refresh import TransactionRow
from kontod.jobs.refresh_lite import UPSERT_TRANSACTIONS_SQL, _json, as_konto_schema, read_time
from kontod.konto.lite_schema import LITE_REQUIRED, LiteSchema
from kontod.konto.schema import KontoSchemaError

# The web app's declared types of the columns kontod uses (kontod/demo/webapp_tables.sql).
WEBAPP_TYPES = {
    ("bank_accounts", "balance"): "REAL",
    ("bank_accounts", "last_sync"): "TEXT",
    ("bank_accounts", "hidden"): "INTEGER",
    ("transactions", "amount"): "REAL",
    ("transactions", "date"): "TEXT",
}


def lite(**changed: str) -> LiteSchema:
    types = {(t, c): "TEXT" for t, columns in LITE_REQUIRED.items() for c in columns}
    types.update(WEBAPP_TYPES)
    for key, declared in changed.items():
        table, column = key.split("__")
        types[(table, column)] = declared
    return LiteSchema(types)


def test_the_web_apps_types_encode_as_its_columns_store_them() -> None:
    schema = as_konto_schema(lite())
    assert schema.cast("bank_accounts", "balance") == "double precision"
    assert schema.cast("bank_accounts", "hidden") == "bigint"
    assert schema.encode("bank_accounts", "last_sync", [datetime(2026, 3, 1, 9, tzinfo=UTC)]) == [
        "2026-03-01T09:00:00.000Z"
    ]
    assert schema.encode("transactions", "date", [date(2026, 3, 1)]) == ["2026-03-01"]


@pytest.mark.parametrize(
    ("column", "declared"),
    [
        ("bank_accounts__balance", "TEXT"),
        ("transactions__date", "INTEGER"),
        ("transactions__amount", ""),
    ],
)
def test_a_money_or_time_column_of_another_type_is_refused_by_name(
    column: str, declared: str
) -> None:
    table, name = column.split("__")
    with pytest.raises(KontoSchemaError, match=f"{table}.{name} is declared"):
        as_konto_schema(lite(**{column: declared}))


def test_a_naive_time_is_utc_and_a_zone_is_kept() -> None:
    assert read_time("2026-03-01 09:00:00") == datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert read_time("2026-03-01T11:00:00+02:00") == datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert read_time(1772355600) is None  # not text: unreadable, as on PostgreSQL's text column


def test_money_goes_through_the_json_batch_to_the_same_double() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute(
        """CREATE TABLE transactions (bank_account_id INTEGER, date TEXT, amount REAL,
               label TEXT, category TEXT, tx_hash TEXT, UNIQUE (bank_account_id, tx_hash))"""
    )
    amounts = [0.1, -148237.68, 1e15, 2.675, 123456789.01, -0.0, 5e-324]
    rows = [
        TransactionRow(1, "2026-03-01", amount, "l\u00e9a \u2603", None, f"powens_{n}")
        for n, amount in enumerate(amounts)
    ]
    conn.execute(UPSERT_TRANSACTIONS_SQL, (_json(rows),)).fetchall()
    stored = conn.execute("SELECT amount, label FROM transactions ORDER BY rowid").fetchall()
    conn.close()
    assert [a for a, _ in stored] == amounts
    assert {label for _, label in stored} == {"l\u00e9a \u2603"}
