"""Konto's tables as the web app created them: checked once at start, typed for every write.

The web app owns its schema and kontod changes none of it. At start kontod reads
``information_schema`` once, checks that every column it reads or writes exists (and the two
unique keys its upserts rely on), and keeps each column's type, so that the SQL it writes casts
its parameters to the column's own type and Python hands over values of that type: ISO text
for a text ``last_sync``, a float for ``double precision`` money, and so on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# Every Konto column kontod reads or writes, by table.
REQUIRED: dict[str, tuple[str, ...]] = {
    "users": ("id",),
    "bank_accounts": (
        "id",
        "user_id",
        "company_id",
        "provider",
        "provider_account_id",
        "name",
        "balance",
        "hidden",
        "last_sync",
        "type",
        "usage",
        "subtype",
        "currency",
    ),
    "assets": ("user_id", "type", "purchase_price", "current_value"),
    "bank_connections": ("id", "user_id", "powens_connection_id", "powens_token", "status"),
    "transactions": ("bank_account_id", "date", "amount", "label", "category", "tx_hash"),
    "patrimoine_snapshots": ("date", "user_id", "category", "total_value", "created_at"),
}
# The ON CONFLICT targets of kontod's upserts: a unique index or constraint on these columns.
REQUIRED_UNIQUE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("transactions", ("bank_account_id", "tx_hash")),
    ("patrimoine_snapshots", ("date", "user_id", "category")),
)

# information_schema data_type -> the name kontod casts to. Nothing else reaches SQL text.
CASTS: dict[str, str] = {
    "numeric": "numeric",
    "double precision": "double precision",
    "real": "real",
    "integer": "integer",
    "bigint": "bigint",
    "smallint": "smallint",
    "boolean": "boolean",
    "text": "text",
    "character varying": "varchar",
    "date": "date",
    "timestamp with time zone": "timestamptz",
    "timestamp without time zone": "timestamp",
}

COLUMNS_SQL = """
SELECT table_name::text, column_name::text, data_type::text
  FROM information_schema.columns
 WHERE table_schema = current_schema() AND table_name = ANY($1::text[])
"""

# Sets of column names that some unique index of a table covers exactly.
UNIQUE_SQL = """
SELECT c.relname::text AS table_name,
       array_agg(a.attname::text ORDER BY a.attname) AS columns
  FROM pg_index i
  JOIN pg_class c ON c.oid = i.indrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
 WHERE i.indisunique AND i.indpred IS NULL AND c.relname = ANY($1::text[])
 GROUP BY c.relname, i.indexrelid
"""


class KontoSchemaError(Exception):
    """A Konto table lacks what kontod needs; the message names the table and the column."""


@dataclass(frozen=True)
class KontoSchema:
    """The type of every Konto column kontod uses, as a whitelisted SQL cast name."""

    casts: dict[tuple[str, str], str]

    def cast(self, table: str, column: str) -> str:
        """The SQL type to cast a parameter to for ``table.column`` (from ``CASTS`` only)."""
        return self.casts[(table, column)]

    def encode(self, table: str, column: str, values: Iterable[object]) -> list[object]:
        """``values`` as Python values of the column's own type (None stays None)."""
        cast = self.cast(table, column)
        return [None if v is None else _encode(v, cast) for v in values]

    def timestamptz(self, table: str, column: str, alias: str) -> str:
        """An SQL expression reading ``alias.column`` as timestamptz, NULL when unreadable."""
        ref = f"{alias}.{column}"
        cast = self.cast(table, column)
        if cast == "timestamptz":
            return ref
        if cast == "timestamp":
            return f"({ref} AT TIME ZONE 'UTC')"
        if cast == "date":
            return f"({ref}::timestamp AT TIME ZONE 'UTC')"
        if cast in ("text", "varchar"):
            return f"kontod_try_timestamptz({ref})"
        raise KontoSchemaError(f"{table}.{column} has type {cast}; kontod reads it as a time")


def _encode(value: object, cast: str) -> object:
    if cast in ("text", "varchar"):
        if isinstance(value, datetime):
            return iso_text(value)
        if isinstance(value, date):
            return value.isoformat()
        return str(value)
    if cast in ("double precision", "real"):
        return float(value)  # type: ignore[arg-type]
    if cast == "numeric":
        return value if isinstance(value, Decimal) else Decimal(str(value))
    if cast == "date" and isinstance(value, datetime):
        return value.astimezone(UTC).date()
    if cast == "timestamp" and isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def iso_text(value: datetime) -> str:
    """A time as the web app writes it in text columns (JavaScript's ``toISOString``)."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


async def load(conn: asyncpg.Connection | PoolConnectionProxy) -> KontoSchema:
    """Read the Konto columns kontod uses; raise KontoSchemaError naming the first one missing."""
    tables = sorted(REQUIRED)
    found = {
        (r["table_name"], r["column_name"]): r["data_type"]
        for r in await conn.fetch(COLUMNS_SQL, tables)
    }
    casts: dict[tuple[str, str], str] = {}
    for table in tables:
        if not any(t == table for t, _ in found):
            raise KontoSchemaError(
                f"Konto's table {table} does not exist in the database's current schema"
            )
        for column in REQUIRED[table]:
            data_type = found.get((table, column))
            if data_type is None:
                raise KontoSchemaError(
                    f"Konto's table {table} has no column {column}, which kontod needs"
                )
            cast = CASTS.get(data_type)
            if cast is None:
                raise KontoSchemaError(
                    f"Konto's column {table}.{column} has type {data_type}; kontod handles "
                    + ", ".join(sorted(CASTS))
                )
            casts[(table, column)] = cast
    unique = {
        (r["table_name"], tuple(r["columns"]))
        for r in await conn.fetch(UNIQUE_SQL, [t for t, _ in REQUIRED_UNIQUE])
    }
    for table, columns in REQUIRED_UNIQUE:
        if (table, tuple(sorted(columns))) not in unique:
            raise KontoSchemaError(
                f"Konto's table {table} has no unique key on ({', '.join(columns)}),"
                " which kontod's upserts need"
            )
    return KontoSchema(casts)
