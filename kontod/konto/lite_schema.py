"""Konto's tables in a SQLite-family database, as the web app created them: checked at start,
and the two tables kontod needs beside them created when absent.

The web app owns its schema. kontod reads each table it uses with ``PRAGMA table_info``, stops
(exit 2, ``KontoSchemaError``) naming the first table or column missing, and changes no table of
the web app: no column, type, default or index. It creates only what the web app lacks and
kontod writes:
- ``holding_snapshots``, with the columns and the unique key ``(date, user_id, holding_key)``
  the web app's own snapshot code writes, when the web app has not created it;
- ``kontod_fence``, one row per job, for the fencing of writes across the two databases
  (kontod/konto/store.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from kontod.konto.schema import REQUIRED, REQUIRED_UNIQUE, KontoSchemaError
from kontod.konto.store import FENCE_TABLE_SQL, KontoSql, Statement

HOLDINGS_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS holding_snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    date TEXT NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id),
    holding_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    ref_id INTEGER,
    name TEXT,
    type TEXT,
    value REAL NOT NULL DEFAULT 0,
    created_at TEXT DEFAULT (datetime('now')),
    UNIQUE (date, user_id, holding_key)
)"""

# The holding rows kontod writes, over the Konto columns of kontod/konto/schema.py.
HOLDING_COLUMNS = ("date", "user_id", "holding_key", "kind", "ref_id", "name", "type", "value")
LITE_REQUIRED: dict[str, tuple[str, ...]] = {**REQUIRED, "holding_snapshots": HOLDING_COLUMNS}
LITE_UNIQUE = (*REQUIRED_UNIQUE, ("holding_snapshots", ("date", "user_id", "holding_key")))


@dataclass(frozen=True)
class LiteSchema:
    """The declared type of every column kontod uses (SQLite's text, upper-cased), by table."""

    types: dict[tuple[str, str], str]

    def declared(self, table: str, column: str) -> str:
        return self.types[(table, column)]


async def create_missing(db: KontoSql) -> None:
    """Create ``holding_snapshots`` and ``kontod_fence`` where absent (``kontod migrate``, and
    each start); tables that exist are left exactly as they are."""
    await db.write([Statement(HOLDINGS_TABLE_SQL), Statement(FENCE_TABLE_SQL)], None)


async def load(db: KontoSql, *, absent_own_ok: bool = False) -> LiteSchema:
    """Check every table and column kontod uses, and the unique keys its upserts need; raise
    ``KontoSchemaError`` naming the first one missing. With ``absent_own_ok`` (``kontod
    doctor``, which creates nothing), a missing ``holding_snapshots`` passes: kontod creates it
    at start."""
    types: dict[tuple[str, str], str] = {}
    absent: set[str] = set()
    tables = sorted(LITE_REQUIRED)
    for table in tables:
        # PRAGMA table_info takes no bound parameter; the name comes from the fixed list above.
        rows = await db.read(f"PRAGMA table_info({table})")
        if not rows and absent_own_ok and table == "holding_snapshots":
            absent.add(table)
            continue
        if not rows:
            raise KontoSchemaError(f"Konto's table {table} does not exist in {db.location}")
        declared = {str(r[1]): str(r[2] or "").upper() for r in rows}
        for column in LITE_REQUIRED[table]:
            if column not in declared:
                raise KontoSchemaError(
                    f"Konto's table {table} has no column {column}, which kontod needs"
                    f" ({db.location})"
                )
            types[(table, column)] = declared[column]
    for table, columns in LITE_UNIQUE:
        if table in absent:
            continue
        if frozenset(columns) not in await _unique_keys(db, table):
            raise KontoSchemaError(
                f"Konto's table {table} has no unique key on ({', '.join(columns)}),"
                f" which kontod's upserts need ({db.location})"
            )
    return LiteSchema(types)


async def _unique_keys(db: KontoSql, table: str) -> set[frozenset[str]]:
    """The column sets of the table's unique indexes (constraints included), partial ones left
    out: an upsert's ON CONFLICT target needs a whole-table key."""
    keys = set()
    for index in await db.read(f"PRAGMA index_list({table})"):
        name, unique, partial = str(index[1]), index[2], index[4]
        if not unique or partial:
            continue
        columns = await db.read("SELECT name FROM pragma_index_info(?)", (name,))
        keys.add(frozenset(str(c[0]) for c in columns))
    return keys
