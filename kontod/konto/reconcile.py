"""Duplicates in Konto's ``transactions`` that an earlier kontod made, found and removed.

Before kontod adopted the web app's unkeyed rows, its first import of an account inserted each
Powens transaction under the web app's key (``powens_<id>``) beside the row the web app's old
refresh job had imported without a ``tx_hash``. Such a pair is a keyed row and an unkeyed row
of one account with the same date, amount and label (two NULL labels are equal). Multiplicity
counts: each keyed row pairs with at most one unkeyed twin, so two real purchases of the same
amount on the same day, both keyed, remove at most two unkeyed rows, never a third.

Safe to run again: each removal is recorded in kontod's own database (``kontod_reconciled``,
per Konto database, keyed row and removed twin), and a recorded keyed row never pairs again.
The unkeyed rows a run leaves (a group with more unkeyed rows than keyed ones keeps its
surplus) are genuine: a later run must not take them for twins.

The keyed row is kept (the web app's sync routes find it by its key); the unkeyed twin goes.
A run plans the pairs, then deletes each planned twin only if its pair still holds at the
moment of the delete (the row unkeyed, its keyed row there with the same date, amount and
label), so a row the web app changed meanwhile stays.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from kontod.config import KontoLocation
from kontod.konto.store import KontoSql, Statement

# The n-th unkeyed row of a (account, date, amount, label) group pairs with the n-th keyed one;
# keyed rows already recorded are left out before numbering ({recorded}).
_TWINS = r"""
WITH keyed AS (
    SELECT bank_account_id, date, amount, label, tx_hash,
           ROW_NUMBER() OVER (PARTITION BY bank_account_id, date, amount, label ORDER BY id) AS n
      FROM transactions
     WHERE tx_hash LIKE 'powens\_%' ESCAPE '\' {recorded}
), bare AS (
    SELECT id, bank_account_id, date, amount, label,
           ROW_NUMBER() OVER (PARTITION BY bank_account_id, date, amount, label ORDER BY id) AS n
      FROM transactions
     WHERE tx_hash IS NULL
)
SELECT bare.id, bare.bank_account_id, keyed.tx_hash
  FROM bare JOIN keyed
    ON keyed.bank_account_id = bare.bank_account_id
   AND keyed.date = bare.date
   AND keyed.amount = bare.amount
   AND (keyed.label = bare.label OR (keyed.label IS NULL AND bare.label IS NULL))
   AND keyed.n = bare.n
 ORDER BY bare.id
"""
# The twin ids of the given (twin id, keyed tx_hash) pairs that still hold.
_HOLDING = """
SELECT t.id
  FROM transactions AS t
  JOIN transactions AS k
    ON k.bank_account_id = t.bank_account_id
   AND k.date = t.date
   AND k.amount = t.amount
   AND (k.label = t.label OR (k.label IS NULL AND t.label IS NULL))
  JOIN {pairs} ON {pair_id} = t.id AND {pair_hash} = k.tx_hash
 WHERE t.tx_hash IS NULL
"""

# SQLite/libSQL: the recorded keyed rows and the planned pairs come as one JSON parameter.
TWINS_LITE = _TWINS.format(
    recorded="AND NOT EXISTS (SELECT 1 FROM json_each(?) AS r"
    " WHERE json_extract(r.value, '$[0]') = transactions.bank_account_id"
    " AND json_extract(r.value, '$[1]') = transactions.tx_hash)"
)
HOLDING_LITE = _HOLDING.format(
    pairs="json_each(?) AS p",
    pair_id="json_extract(p.value, '$[0]')",
    pair_hash="json_extract(p.value, '$[1]')",
)
REMOVE_LITE = f"DELETE FROM transactions WHERE id IN ({HOLDING_LITE}) RETURNING id"

# PostgreSQL: Konto's tables and kontod_reconciled are in the same database.
IN_PG = "postgresql"
TWINS_PG = _TWINS.format(
    recorded="AND NOT EXISTS (SELECT 1 FROM kontod_reconciled AS r"
    f" WHERE r.konto_location = '{IN_PG}' AND r.bank_account_id = transactions.bank_account_id"
    " AND r.tx_hash = transactions.tx_hash)"
)
REMOVE_PG = (
    "DELETE FROM transactions WHERE id IN ("
    + _HOLDING.format(
        pairs="unnest($1::bigint[], $2::text[]) AS p(id, tx_hash)",
        pair_id="p.id",
        pair_hash="p.tx_hash",
    )
    + ") RETURNING id"
)

_RECORDS = (
    "SELECT bank_account_id, tx_hash, twin_id, state FROM kontod_reconciled"
    " WHERE konto_location = $1"
)
_CLAIM = (
    "INSERT INTO kontod_reconciled (konto_location, bank_account_id, tx_hash, twin_id, state)"
    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING twin_id"
)
_DONE = (
    "UPDATE kontod_reconciled SET state = 'done', removed_at = now()"
    " WHERE konto_location = $1 AND bank_account_id = $2 AND tx_hash = $3"
)
_DROP = (
    "DELETE FROM kontod_reconciled"
    " WHERE konto_location = $1 AND bank_account_id = $2 AND tx_hash = $3 AND state = 'pending'"
)


@dataclass(frozen=True)
class Pair:
    """An unkeyed twin (``twin_id``) and the keyed row of its account that claims it."""

    twin_id: int
    bank_account_id: int
    tx_hash: str


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


def konto_key(location: KontoLocation) -> str:
    """How ``kontod_reconciled`` names a Konto database: a SQLite file by its absolute path,
    a libSQL server by its URL, Konto's tables in kontod's own database by ``postgresql``."""
    if location.kind == "sqlite":
        return f"sqlite:{Path(location.target).resolve()}"
    if location.kind == "libsql":
        return f"libsql:{location.target}"
    return IN_PG


def _per_account(pairs: list[Pair]) -> dict[int, int]:
    return dict(sorted(Counter(p.bank_account_id for p in pairs).items()))


def _pairs(rows: list[tuple[object, ...]]) -> list[Pair]:
    return [Pair(int(str(r[0])), int(str(r[1])), str(r[2])) for r in rows]


async def reconcile_lite(konto: KontoSql, pool: asyncpg.Pool, dry_run: bool) -> Report:
    """On Konto's SQLite/libSQL database, with the records in kontod's PostgreSQL (``pool``).

    The two databases share no transaction, so the order makes any stop safe. A planned pair
    is first recorded as pending in PostgreSQL, then its twin is deleted in Konto, then the
    record is marked done (or dropped if the pair no longer held). A run that finds pending
    records, left by a kontod that died between those steps or by a Konto write whose outcome
    is unknown, settles each first: if its pair still holds in Konto, the delete did not
    happen, and the record is dropped so the keyed row pairs afresh; otherwise the twin is gone
    (Konto's ids are never reused) and the record is done. Recording after the delete instead
    would leave, after a stop in between, keyed rows with no record that a second run could
    pair with a genuine row: the data loss this table exists to prevent.
    """
    where = konto_key(konto.location)
    async with pool.acquire() as conn:
        records = await conn.fetch(_RECORDS, where)
    done = {(r["bank_account_id"], r["tx_hash"]) for r in records if r["state"] == "done"}
    pending = [
        Pair(r["twin_id"], r["bank_account_id"], r["tx_hash"])
        for r in records
        if r["state"] == "pending"
    ]
    if pending:
        holding = await konto.read(HOLDING_LITE, [_pairs_json(pending)])
        unfinished = {int(str(r[0])) for r in holding}
        settled = [p for p in pending if p.twin_id not in unfinished]
        done |= {(p.bank_account_id, p.tx_hash) for p in settled}
        if not dry_run:
            await _settle(pool, where, settled, [p for p in pending if p.twin_id in unfinished])
    recorded = json.dumps(sorted(done))
    planned = _pairs(list(await konto.read(TWINS_LITE, [recorded])))
    if dry_run:
        return Report(_per_account(planned), {})
    claimed: set[int] = set()
    async with pool.acquire() as conn, conn.transaction():
        for p in planned:
            row = await conn.fetchval(
                _CLAIM, where, p.bank_account_id, p.tx_hash, p.twin_id, "pending"
            )
            if row is not None:
                claimed.add(int(row))
    # Another run claimed what this one did not: it deletes that twin, not this one.
    mine = [p for p in planned if p.twin_id in claimed]
    [result] = await konto.write([Statement(REMOVE_LITE, [_pairs_json(mine)])], None)
    gone = {int(str(r[0])) for r in result.rows}
    removed = [p for p in mine if p.twin_id in gone]
    await _settle(pool, where, removed, [p for p in mine if p.twin_id not in gone])
    return Report(_per_account(planned), _per_account(removed))


def _pairs_json(pairs: list[Pair]) -> str:
    return json.dumps([[p.twin_id, p.tx_hash] for p in pairs])


async def _settle(pool: asyncpg.Pool, where: str, removed: list[Pair], kept: list[Pair]) -> None:
    """Pending records: done for the twins removed, dropped for the pairs that did not hold."""
    async with pool.acquire() as conn, conn.transaction():
        for query, pairs in ((_DONE, removed), (_DROP, kept)):
            if pairs:
                await conn.executemany(
                    query, [(where, p.bank_account_id, p.tx_hash) for p in pairs]
                )


async def reconcile_pg(pool: asyncpg.Pool, dry_run: bool) -> Report:
    """On Konto's tables in PostgreSQL: plan, delete and record in one transaction, so a
    stop anywhere leaves either everything or nothing."""
    async with pool.acquire() as conn, conn.transaction():
        planned = _pairs([tuple(r) for r in await conn.fetch(TWINS_PG)])
        if dry_run:
            return Report(_per_account(planned), {})
        rows = await conn.fetch(
            REMOVE_PG, [p.twin_id for p in planned], [p.tx_hash for p in planned]
        )
        gone = {int(r[0]) for r in rows}
        removed = [p for p in planned if p.twin_id in gone]
        await conn.executemany(
            _CLAIM, [(IN_PG, p.bank_account_id, p.tx_hash, p.twin_id, "done") for p in removed]
        )
    return Report(_per_account(planned), _per_account(removed))
