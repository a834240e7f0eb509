"""prune-audit-log: exactly the rows older than the cut-off go, in short batches, while the
web app keeps writing; on the web app's SQLite file and on a PostgreSQL Konto."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import structlog

from kontod.jobs import AUDIT
from kontod.jobs.audit import prune
from kontod.konto import lite_schema
from kontod.konto.sqlite import open_sqlite
from kontod.konto.store import Fence
from kontod.scheduler.contract import ClaimLost, RunContext
from tests.helpers import webapp_konto
from tests.konto_engines import ENGINES, konto_on

# The run starts at 03:00 UTC on 7 December 2026: with 90 days kept, the cut-off is
# 2026-09-08 03:00:00 (the web app's datetime('now') form).
STARTED = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
CUTOFF = datetime(2026, 9, 8, 3, 0, tzinfo=UTC)
OLD, NEW = 40_000, 60_000


def new_ctx() -> RunContext:
    return RunContext(
        run_id=1,
        job=AUDIT,
        trigger="manual",
        scheduled_for=None,
        started_at=STARTED,
        log=structlog.get_logger().bind(job=AUDIT),
    )


def stamps(old: int, new: int) -> list[str]:
    """``old`` times from 100 days before the cut-off up to one second before it, then ``new``
    from the cut-off itself on, as the web app writes them."""
    out = []
    for i in range(old):
        at = CUTOFF - timedelta(seconds=1) - timedelta(seconds=(old - 1 - i) * 216)
        out.append(at.strftime("%Y-%m-%d %H:%M:%S"))
    for i in range(new):
        out.append((CUTOFF + timedelta(seconds=i * 129)).strftime("%Y-%m-%d %H:%M:%S"))
    return out


class Writer(threading.Thread):
    """The web app: one audit row every 10 ms on its own connection, each write's wait kept."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.waits: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            while not self.stop.is_set():
                began = time.perf_counter()
                conn.execute("INSERT INTO audit_log (action, resource) VALUES ('login', 'session')")
                self.waits.append(time.perf_counter() - began)
                time.sleep(0.01)
        finally:
            conn.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_100000_rows_exactly_the_old_ones_go_in_batches_beside_a_writer(
    pool: asyncpg.Pool, tmp_path: Path, engine: str
) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    rows: list[tuple[str | int, str, str]] = [(t, "login", "session") for t in stamps(OLD, NEW)]
    # An older row in JavaScript's ISO form (read by datetime(): it goes), and a number, which
    # the column's TEXT affinity stores as '1700000000': below the cut-off as text, but no
    # time datetime() reads, so it stays.
    rows += [("2026-09-01T10:00:00.000Z", "odd", "iso"), (1_700_000_000, "odd", "number")]
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO audit_log (timestamp, action, resource) VALUES (?, ?, ?)", rows
        )
    conn.close()
    writer = Writer(path)
    ctx = new_ctx()
    async with konto_on(engine, path, busy_timeout=10) as konto:
        await lite_schema.create_missing(konto)
        writer.start()
        began = time.perf_counter()
        try:
            await prune(pool, ctx, 90, 2_000, konto)
        finally:
            took = time.perf_counter() - began
            writer.stop.set()
            writer.join()
    with sqlite3.connect(path) as check:
        left_old = check.execute(
            "SELECT timestamp FROM audit_log WHERE timestamp < '2026-09-08 03:00:00'"
        ).fetchall()
        kept = check.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'login' AND resource = 'session'"
            " AND timestamp >= '2026-09-08 03:00:00'"
        ).fetchone()[0]
    check.close()
    # 40 000 old rows and the ISO one: 40 001, in 21 batches of at most 2 000.
    assert ctx.counts["rows_deleted"] == 40_001
    assert left_old == [("1700000000",)]
    assert kept == NEW + len(writer.waits)  # every newer row, the writer's included
    assert ctx.counts["batches"] == 21
    assert ctx.counts["largest_batch"] == 2_000
    assert ctx.counts["audit_rows"] >= OLD + NEW + 2
    assert len(writer.waits) > 0
    print(
        f"\n{engine}: prune of 40 001 of 100 002 rows: {took:.2f} s in {ctx.counts['batches']} batches;"
        f" the writer's {len(writer.waits)} inserts waited at most"
        f" {max(writer.waits) * 1000:.1f} ms"
    )


async def test_on_a_postgresql_konto_with_text_timestamps(pool: asyncpg.Pool) -> None:
    await pool.execute(
        """CREATE TABLE audit_log (id serial PRIMARY KEY, timestamp text NOT NULL,
                                   action text NOT NULL, resource text NOT NULL)"""
    )
    await pool.executemany(
        "INSERT INTO audit_log (timestamp, action, resource) VALUES ($1, 'login', 'session')",
        [(t,) for t in stamps(2_500, 1_500)],
    )
    ctx = new_ctx()
    await prune(pool, ctx, 90, 1_000, None)
    # 2 500 old rows: batches of 1 000, 1 000 and 500.
    assert (ctx.counts["rows_deleted"], ctx.counts["batches"]) == (2_500, 3)
    assert await pool.fetchval("SELECT count(*) FROM audit_log") == 1_500
    assert await pool.fetchval("SELECT min(timestamp) FROM audit_log") == "2026-09-08 03:00:00"


async def test_a_run_a_newer_run_took_over_deletes_nothing(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO audit_log (timestamp, action, resource) VALUES (?, 'login', 'session')",
            [(t,) for t in stamps(10, 10)],
        )
    conn.close()
    konto = open_sqlite(str(path), busy_timeout=10)
    try:
        await lite_schema.create_missing(konto)
        await konto.advance_fence(Fence(AUDIT, 7))
        with pytest.raises(ClaimLost, match="run 7"):
            await prune(pool, new_ctx(), 90, 5, konto)
        [(left,)] = await konto.read("SELECT count(*) FROM audit_log")
    finally:
        await konto.close()
    assert left == 20
