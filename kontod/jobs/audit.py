"""``prune-audit-log``: delete the web app's ``audit_log`` rows older than the retention
(``KONTOD_AUDIT_LOG_DAYS``, 90 by default as in the web app), in short batches.

The web app deletes them in one statement over the whole table, holding the database's one
write lock for as long as that takes. Here each batch is one short write transaction of at
most ``batch_size`` rows (the oldest ids first), with a short pause between batches, so that
a writer of the web app never waits for more than one batch. The run counts what it deleted
and never touches a row at or after the cut-off.

The cut-off is the run's start minus the retention, in UTC, written as the web app writes its
timestamps (``datetime('now')``: ``YYYY-MM-DD HH:MM:SS``), whose text order is the time order.
On SQLite a row is deleted only when its text is below the cut-off (the index on
``timestamp`` finds them) *and* ``datetime(timestamp)`` reads as a time below it, so a value in
another form (a number, a date with ``T``) is never deleted early: one SQLite cannot read is
kept. On PostgreSQL a ``timestamp`` column of a time type is compared as a time.

No ``audit_log`` table (kontod's own minimal Konto tables have none): the job is not
configured, as the refresh job without a bank.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from kontod.konto.fenced import FencedWriter
from kontod.konto.schema import KontoSchemaError
from kontod.konto.store import KontoSql, Statement
from kontod.scheduler.contract import JobBody, JobExports, Requirement, RunContext

# Between two batches, the write lock is free this long: a writer of the web app waiting on
# it (SQLite's busy handler retries every few milliseconds, then every 100 ms) gets its turn.
PAUSE_S = 0.05
_TIME_TYPES = ("timestamp with time zone", "timestamp without time zone")
_TEXT_TYPES = ("text", "character varying")

EXPORTS = JobExports(
    # The web app writes audit rows all day: a success that finds none, or far fewer than the
    # success before, reads the wrong or an emptied database.
    population="audit_rows",
)

_LITE_DELETE_SQL = """
DELETE FROM audit_log WHERE id IN (
    SELECT id FROM audit_log
     WHERE timestamp < ?1 AND datetime(timestamp) < ?1
     ORDER BY id LIMIT ?2)
"""
_PG_DELETE_SQL = """
DELETE FROM audit_log WHERE id IN (
    SELECT id FROM audit_log WHERE {condition} ORDER BY id LIMIT $2)
"""
_PG_TEXT = (
    "timestamp < $1 AND timestamp ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}'"
)
_PG_TIME = "timestamp < $1"
_PG_COLUMNS_SQL = """
SELECT column_name::text, data_type::text FROM information_schema.columns
 WHERE table_schema = current_schema() AND table_name = 'audit_log'
"""


def cutoff(at: datetime, days: int) -> datetime:
    """The instant before which rows are deleted: ``days`` before ``at``, in UTC, to the second."""
    return (at.astimezone(UTC) - timedelta(days=days)).replace(microsecond=0)


def webapp_text(at: datetime) -> str:
    """A time as SQLite's ``datetime('now')`` writes it."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


async def _pg_columns(pool: asyncpg.Pool) -> dict[str, str]:
    return {r[0]: r[1] for r in await pool.fetch(_PG_COLUMNS_SQL)}


async def _lite_columns(konto: KontoSql) -> dict[str, str]:
    return {str(r[1]): str(r[2] or "") for r in await konto.read("PRAGMA table_info(audit_log)")}


def _missing(found: dict[str, str], where: str, pg: bool) -> str | None:
    if not found:
        return f"Konto's audit_log table does not exist in {where}"
    missing = [c for c in ("id", "timestamp") if c not in found]
    if missing:
        return f"Konto's audit_log table in {where} has no column {', '.join(missing)}"
    if pg and found["timestamp"] not in _TIME_TYPES + _TEXT_TYPES:
        return f"audit_log.timestamp in {where} has type {found['timestamp']}, not a time or text"
    return None


def requirement(pool: asyncpg.Pool, konto: KontoSql | None) -> Requirement:
    """Why the job cannot run on this Konto (no ``audit_log`` table), or None."""

    async def check() -> str | None:
        if konto is None:
            return _missing(await _pg_columns(pool), "PostgreSQL", True)
        return _missing(await _lite_columns(konto), str(konto.location), False)

    return check


async def prune(
    pool: asyncpg.Pool,
    ctx: RunContext,
    days: int,
    batch_size: int,
    konto: KontoSql | None = None,
    pause_s: float = PAUSE_S,
) -> None:
    """Delete every audit row older than ``days`` before the run's start, batch by batch."""
    limit = cutoff(ctx.started_at, days)
    try:
        delete = await _deleter(pool, ctx, konto, limit)
    except KontoSchemaError as exc:
        # Run by hand while not configured: nothing to do, as the refresh job without a bank.
        ctx.counts["not_configured"] = 1
        ctx.log.warning("audit.not_configured", reason=str(exc))
        return
    for key in ("audit_rows", "rows_deleted", "batches", "largest_batch"):
        ctx.counts[key] += 0
    ctx.counts["audit_rows"] = await _count(pool, konto)
    ctx.log.info("audit.started", cutoff=webapp_text(limit), rows=ctx.counts["audit_rows"])
    while True:
        deleted = await delete(batch_size)
        ctx.counts["rows_deleted"] += deleted
        ctx.counts["largest_batch"] = max(ctx.counts["largest_batch"], deleted)
        if deleted:
            ctx.counts["batches"] += 1
            ctx.report_progress(ctx.counts["rows_deleted"], None)
        if deleted < batch_size:
            break
        await asyncio.sleep(pause_s)
    ctx.log.info(
        "audit.pruned",
        cutoff=webapp_text(limit),
        deleted=ctx.counts["rows_deleted"],
        batches=ctx.counts["batches"],
    )


async def _count(pool: asyncpg.Pool, konto: KontoSql | None) -> int:
    if konto is None:
        return int(await pool.fetchval("SELECT count(*) FROM audit_log"))
    [(n,)] = await konto.read("SELECT count(*) FROM audit_log")
    assert isinstance(n, int)
    return n


async def _deleter(
    pool: asyncpg.Pool, ctx: RunContext, konto: KontoSql | None, limit: datetime
) -> Callable[[int], Awaitable[int]]:
    """A function deleting one batch (its size given) and returning how many rows went."""
    if konto is not None:
        reason = _missing(await _lite_columns(konto), str(konto.location), False)
        if reason is not None:
            raise KontoSchemaError(reason)
        writer = await FencedWriter.start(konto, pool, ctx)
        text = webapp_text(limit)

        async def lite(size: int) -> int:
            [result] = await writer.write([Statement(_LITE_DELETE_SQL, (text, size))])
            return result.changes

        return lite
    found = await _pg_columns(pool)
    reason = _missing(found, "PostgreSQL", True)
    if reason is not None:
        raise KontoSchemaError(reason)
    bound: str | datetime
    if found["timestamp"] in _TEXT_TYPES:
        sql, bound = _PG_DELETE_SQL.format(condition=_PG_TEXT), webapp_text(limit)
    elif found["timestamp"] == "timestamp with time zone":
        sql, bound = _PG_DELETE_SQL.format(condition=_PG_TIME), limit
    else:  # a timestamp without zone holds UTC, as the web app's times are
        sql, bound = _PG_DELETE_SQL.format(condition=_PG_TIME), limit.replace(tzinfo=None)

    async def pg(size: int) -> int:
        async with pool.acquire() as conn, conn.transaction():
            await ctx.check_claim(conn)
            status = await conn.execute(sql, bound, size)
        return int(status.split()[-1])

    return pg


def make_body(
    pool: asyncpg.Pool, days: int, batch_size: int, konto: KontoSql | None = None
) -> JobBody:
    """The job body: rows older than ``days`` deleted, ``batch_size`` per transaction."""

    async def body(ctx: RunContext) -> None:
        await prune(pool, ctx, days, batch_size, konto)

    return body
