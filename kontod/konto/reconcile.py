"""Duplicates in Konto's ``transactions`` that an earlier kontod made, found and removed.

Before kontod adopted the web app's unkeyed rows, its first import of an account inserted each
Powens transaction under the web app's key (``powens_<id>``) beside the row the web app's old
refresh job had imported without a ``tx_hash``. Such a pair is a keyed row and an unkeyed row
of one account with the same date, amount and label (two NULL labels are equal). Multiplicity
counts: each keyed row pairs with at most one unkeyed twin, so two real purchases of the same
amount on the same day, both keyed, remove at most two unkeyed rows, never a third.

Meant to be run once. Nothing records which rows a run removed, so a second run pairs what the
first one left: a group that had more unkeyed rows than keyed ones keeps its surplus after the
first run, and the second run takes it for twins again. ``--dry-run`` first shows the count.

The keyed row is kept (the web app's sync routes find it by its key); the unkeyed twin goes.
The same SQL runs on PostgreSQL and on SQLite/libSQL: no parameters, window functions and
``DELETE ... RETURNING`` both engines know. The removal is one statement, so finding and
deleting happen in one transaction: a row the web app writes meanwhile is either seen whole or
not at all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import asyncpg

from kontod.konto.store import KontoSql, Statement

# The n-th unkeyed row of a (account, date, amount, label) group pairs with the n-th keyed one.
_TWINS = r"""
WITH keyed AS (
    SELECT bank_account_id, date, amount, label,
           ROW_NUMBER() OVER (PARTITION BY bank_account_id, date, amount, label ORDER BY id) AS n
      FROM transactions
     WHERE tx_hash LIKE 'powens\_%' ESCAPE '\'
), bare AS (
    SELECT id, bank_account_id, date, amount, label,
           ROW_NUMBER() OVER (PARTITION BY bank_account_id, date, amount, label ORDER BY id) AS n
      FROM transactions
     WHERE tx_hash IS NULL
)
SELECT bare.id
  FROM bare JOIN keyed
    ON keyed.bank_account_id = bare.bank_account_id
   AND keyed.date = bare.date
   AND keyed.amount = bare.amount
   AND (keyed.label = bare.label OR (keyed.label IS NULL AND bare.label IS NULL))
   AND keyed.n = bare.n
"""
FIND_SQL = "SELECT bank_account_id FROM transactions WHERE id IN (" + _TWINS + ")"
REMOVE_SQL = "DELETE FROM transactions WHERE id IN (" + _TWINS + ") RETURNING bank_account_id"


@dataclass(frozen=True)
class Report:
    """Per account id, the unkeyed twins found and those removed (0 on a dry run)."""

    found: dict[int, int]
    removed: dict[int, int]

    @property
    def total_found(self) -> int:
        return sum(self.found.values())

    @property
    def total_removed(self) -> int:
        return sum(self.removed.values())


def _per_account(rows: list[tuple[object, ...]]) -> dict[int, int]:
    counts = Counter(int(str(r[0])) for r in rows)
    return dict(sorted(counts.items()))


async def reconcile_lite(konto: KontoSql, dry_run: bool) -> Report:
    """On Konto's SQLite/libSQL database: one plain write transaction, not a fenced one
    (fences order the writes of job runs; this one-shot command is not a run)."""
    if dry_run:
        found = _per_account(list(await konto.read(FIND_SQL)))
        return Report(found, {})
    [result] = await konto.write([Statement(REMOVE_SQL)], None)
    removed = _per_account(list(result.rows))
    return Report(dict(removed), removed)


async def reconcile_pg(pool: asyncpg.Pool, dry_run: bool) -> Report:
    """On Konto's tables in PostgreSQL, in one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        if dry_run:
            found = _per_account([tuple(r) for r in await conn.fetch(FIND_SQL)])
            return Report(found, {})
        removed = _per_account([tuple(r) for r in await conn.fetch(REMOVE_SQL)])
    return Report(dict(removed), removed)
