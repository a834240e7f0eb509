"""daily-snapshots at scale: kontod's real job against PostgreSQL's own floor, on the same data.

On a working copy of a generated data set (``bench/dataset.py``: users, accounts, assets, and a
month of snapshot history already in the tables), each repetition runs, in an order that
rotates from one repetition to the next:

- ``kontod``: one scheduled run of ``daily-snapshots`` in a process of its own
  (``bench/job_process.py``: the real settings, pool, job declaration and runner), on a date of
  its own; its time is the run's own duration as the run table records it;
- ``rerun``: right after it, the same day run again (a later tick of the same date) with
  nothing changed in between, which should write nothing;
- ``floor``: every user's rows for a date of its own in one transaction of one ``INSERT …
  SELECT`` per table (``bench/floor.py``);
- ``parallel``: the parallel floor, the same statement cut into as many ranges of user ids as
  kontod has workers, each range in a transaction of its own on a connection of its own, all
  at once; its time runs from the start of the first to the commit of the last;
- ``aggregate``: the same SELECT, counted, nothing written;

and in the first repetition only, ``old``: the old job's per-user round trips
(``bench/snapshots.py``), also on a date of its own. Before every pass a ``CHECKPOINT`` writes
out the dirty pages of the one before, so that none pays for another's writes. Afterwards
kontod's rows of each repetition, and the parallel floor's, are compared with the floor's, row
for row, and the rows each re-run changed are counted in the tables themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from bench import dataset, floor
from bench.snapshots import old_snapshots
from bench.state import ROOT, with_database, working_copy
from kontod import db
from kontod.config import Settings
from kontod.demo import rates_sandbox
from kontod.jobs.snapshots import id_ranges

# The timed passes write the days from here on, one each, all newer than the history.
FIRST_DAY = date(2026, 1, 1)
RUN_SQL = """
SELECT status, extract(epoch FROM finished_at - started_at)::float8 AS seconds, counts
  FROM kontod_runs WHERE id = $1
"""

Progress = Callable[[str], None]
# kontod's own default, unless the run says otherwise (--snapshot-workers).
DEFAULT_WORKERS = Settings().snapshots.workers
# The counts of a kontod run that say it wrote or removed a snapshot row.
WRITE_COUNTS = ("rows_written", "rows_removed", "holdings_written", "holdings_removed")


@dataclass(frozen=True)
class Pass:
    variant: str
    repetition: int
    day: date
    seconds: float
    rows: int
    wall_seconds: float | None = None
    peak_rss_kib: int | None = None
    # A re-run's rows of its date inserted, updated or deleted, as the tables show them (not as
    # the job counts them); None for the other variants.
    changed_in_tables: int | None = None


@dataclass(frozen=True)
class Comparison:
    """kontod's rows of one day against the floor's of another, table by table."""

    table: str
    kontod_day: date
    floor_day: date
    kontod_rows: int
    floor_rows: int
    differing: int

    @property
    def same(self) -> bool:
        return self.differing == 0 and self.kontod_rows == self.floor_rows


@dataclass
class ScaleResult:
    users: int
    sizes: dataset.Sizes
    history_days: int
    generated_seconds: float | None
    repetitions: int
    batch_size: int
    passes: list[Pass] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    # The old job's rows against the floor's (first repetition), reported beside.
    old_comparisons: list[Comparison] = field(default_factory=list)
    # The parallel floor's rows against the floor's, repetition by repetition.
    parallel_comparisons: list[Comparison] = field(default_factory=list)
    old_note: str | None = None
    # Why the template itself was measured instead of a working copy (None: a copy was).
    in_place: str | None = None
    workers: int = DEFAULT_WORKERS

    def seconds(self, variant: str) -> list[float]:
        return [p.seconds for p in self.passes if p.variant == variant]

    def median(self, variant: str) -> float | None:
        values = self.seconds(variant)
        return statistics.median(values) if values else None

    def ratio(self, top: str, bottom: str) -> float | None:
        a, b = self.median(top), self.median(bottom)
        if a is None or b is None or b <= 0:
            return None
        return a / b

    @property
    def peak_rss_kib(self) -> int | None:
        peaks = [p.peak_rss_kib for p in self.passes if p.peak_rss_kib is not None]
        return max(peaks) if peaks else None

    @property
    def rerun_rows_written(self) -> int:
        """Rows the re-runs wrote or removed: by the job's counts or the tables, the larger."""
        return sum(
            max(p.rows, p.changed_in_tables or 0) for p in self.passes if p.variant == "rerun"
        )

    @property
    def same_rows(self) -> bool:
        return bool(self.comparisons) and all(c.same for c in self.comparisons)


@dataclass(frozen=True)
class WorkingData:
    dsn: str
    users: int
    history_days: int
    sizes: dataset.Sizes
    generated_seconds: float | None
    in_place: str | None = None


# kontod's own tables that a pass fills (runs, their jobs' counters, pauses), emptied when a
# template measured in place is put back as it was; the rates and migrations stay.
RUN_STATE_TABLES = ("kontod_runs", "kontod_jobs", "kontod_pauses")


@asynccontextmanager
async def working_data(
    admin_dsn: str,
    users: int,
    history_days: int,
    progress: Progress,
    *,
    in_place: str | None = None,
) -> AsyncIterator[WorkingData]:
    """A copy of the data set of ``users`` users (generated first when not cached).

    With ``in_place`` (why: a disk that cannot hold a second copy, say), the template itself is
    measured instead, and put back as it was afterwards: every row dated after the history removed, the
    runs forgotten, the snapshot tables vacuumed. An interrupted run is put right the same way
    before the next one measures.
    """
    template, generated = await dataset.ensure_template(admin_dsn, users, history_days, progress)
    how = f"measuring it in place ({in_place})" if in_place else "copying it"
    progress(
        f"snapshots: {users} users, "
        + ("generated" if generated is not None else "cached")
        + f" template {template}; {how}"
    )
    async with _database_for(admin_dsn, template, in_place is not None, progress) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            # Migrations added since the template was built (their tables start empty).
            await db.migrate(conn)
            sizes = await dataset.sizes(conn)
        finally:
            await conn.close()
        yield WorkingData(dsn, users, history_days, sizes, generated, in_place)


@asynccontextmanager
async def _database_for(
    admin_dsn: str, template: str, in_place: bool, progress: Progress
) -> AsyncIterator[str]:
    if not in_place:
        async with working_copy(admin_dsn, template) as dsn:
            yield dsn
        return
    dsn = with_database(admin_dsn, template)
    await restore_template(dsn, progress)
    try:
        yield dsn
    finally:
        await restore_template(dsn, progress)


async def restore_template(dsn: str, progress: Progress) -> None:
    """Remove what measuring a template in place added to it (nothing when nothing did)."""
    conn = await asyncpg.connect(dsn)
    try:
        removed = 0
        for table, _ in floor.SNAPSHOT_TABLES:
            status = await conn.execute(f"DELETE FROM {table} WHERE date > $1", dataset.HISTORY_END)
            removed += int(status.split()[-1])
        present = [t for t in RUN_STATE_TABLES if await conn.fetchval("SELECT to_regclass($1)", t)]
        if present:
            await conn.execute(f"TRUNCATE {', '.join(present)} CASCADE")
        if removed:
            progress(f"template: removed {removed} rows dated after the history; vacuuming")
            for table, _ in floor.SNAPSHOT_TABLES:
                await conn.execute(f"VACUUM (ANALYZE) {table}")
    finally:
        await conn.close()


async def settle(conn: asyncpg.Connection) -> None:
    """Write out the dirty pages of what came before (needs superuser or pg_checkpoint)."""
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


def job_environment(
    dsn: str, batch_size: int, rates_root: str, workers: int = DEFAULT_WORKERS
) -> dict[str, str]:
    """The environment of a kontod process on the benchmark's database, asking the rate
    sandbox served at ``rates_root`` (nothing leaves loopback)."""
    fiat_url, crypto_url = rates_sandbox.urls(rates_root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONTOD_")}
    env.update(
        KONTOD_DATABASE_URL=dsn,
        KONTOD_TIMEZONE="UTC",
        KONTOD_LOG_FORMAT="json",
        KONTOD_LOG_LEVEL="warning",
        KONTOD_SNAPSHOT_BATCH_SIZE=str(batch_size),
        KONTOD_SNAPSHOT_WORKERS=str(workers),
        KONTOD_FIAT_RATES_URL=fiat_url,
        KONTOD_CRYPTO_PRICES_URL=crypto_url,
    )
    return env


async def kontod_pass(
    conn: asyncpg.Connection,
    dsn: str,
    tick: datetime,
    batch_size: int,
    rates_root: str,
    workers: int = DEFAULT_WORKERS,
) -> Pass:
    """One scheduled run in a process of its own; its time is the run's recorded duration."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.job_process",
        "--tick",
        tick.isoformat(),
        cwd=ROOT,
        env=job_environment(dsn, batch_size, rates_root, workers),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    wall = time.perf_counter() - started
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"the snapshot run for {tick.isoformat()} failed (exit {proc.returncode}):"
            f" {out.decode()[-400:]} {err.decode()[-2000:]}"
        )
    report: dict[str, Any] = json.loads(lines[-1])
    row = await conn.fetchrow(RUN_SQL, report["run_id"])
    assert row is not None
    counts = json.loads(row["counts"]) if isinstance(row["counts"], str) else row["counts"]
    return Pass(
        variant="kontod",
        repetition=0,
        day=tick.date(),
        seconds=row["seconds"],
        rows=sum(int(counts.get(key, 0)) for key in WRITE_COUNTS),
        wall_seconds=wall,
        peak_rss_kib=report.get("VmHWM"),
    )


async def floor_pass(conn: asyncpg.Connection, day: date) -> tuple[float, int]:
    started = time.perf_counter()
    async with conn.transaction():
        rows: int = await conn.fetchval(
            floor.FLOOR_SQL, day, floor.BASE_CURRENCY, floor.RATE_MAX_AGE_DAYS
        )
    return time.perf_counter() - started, rows


async def parallel_floor_pass(dsn: str, day: date, connections: int) -> tuple[float, int]:
    """The floor's statement over ``connections`` ranges of user ids, one transaction on a
    connection of its own each, all at once; the connections are opened before the clock starts,
    as kontod's pool is before its run starts."""
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    try:
        bounds = [r["id"] for r in await conns[0].fetch(floor.PARTS_SQL, connections)]
        ranges = id_ranges(bounds)

        async def part(conn: asyncpg.Connection, low: int, high: int) -> int:
            async with conn.transaction():
                rows: int = await conn.fetchval(
                    floor.PARALLEL_FLOOR_SQL,
                    day,
                    floor.BASE_CURRENCY,
                    floor.RATE_MAX_AGE_DAYS,
                    low,
                    high,
                )
            return rows

        started = time.perf_counter()
        rows = await asyncio.gather(
            # Fewer users than connections leave a connection idle, as they would a worker.
            *(part(c, low, high) for c, (low, high) in zip(conns, ranges, strict=False))
        )
        return time.perf_counter() - started, sum(rows)
    finally:
        for c in conns:
            await c.close()


# Before a re-run: a transaction id from before it, and the rows its date holds. After: the rows
# of that date whose version is newer than that id (inserted or updated since), and how many
# fewer rows the date holds (deleted). ``age`` compares transaction ids across wraparound.
XID_SQL = "SELECT (pg_current_xact_id()::text::bigint % 4294967296)::text AS xid"


def day_rows_sql(table: str) -> str:
    return f"SELECT count(*) FROM {table} WHERE date = $1"


def changed_rows_sql(table: str) -> str:
    return f"SELECT count(*) FROM {table} WHERE date = $1 AND age(xmin) < age($2::text::xid)"


async def day_rows(conn: asyncpg.Connection, day: date) -> int:
    """The rows the snapshot tables hold for ``day``."""
    total = 0
    for table, _ in floor.SNAPSHOT_TABLES:
        total += await conn.fetchval(day_rows_sql(table), day)
    return total


async def changed_since(conn: asyncpg.Connection, day: date, xid: str, rows_before: int) -> int:
    """The rows of ``day`` inserted, updated or deleted since transaction ``xid``."""
    changed = 0
    for table, _ in floor.SNAPSHOT_TABLES:
        changed += await conn.fetchval(changed_rows_sql(table), day, xid)
    return changed + max(0, rows_before - await day_rows(conn, day))


async def aggregate_pass(conn: asyncpg.Connection, day: date) -> tuple[float, int]:
    started = time.perf_counter()
    row = await conn.fetchrow(
        floor.AGGREGATE_SQL, day, floor.BASE_CURRENCY, floor.RATE_MAX_AGE_DAYS
    )
    assert row is not None
    return time.perf_counter() - started, int(row["rows"])


async def old_pass(conn: asyncpg.Connection, day: date) -> tuple[float, int]:
    started = time.perf_counter()
    _, rows = await old_snapshots(conn, day)
    return time.perf_counter() - started, rows


def compare_sql(table: str, columns: str) -> str:
    def day(n: int) -> str:
        return f"SELECT {columns} FROM {table} WHERE date = ${n}"

    return f"""
SELECT (SELECT count(*) FROM {table} WHERE date = $1) AS kontod_rows,
       (SELECT count(*) FROM {table} WHERE date = $2) AS floor_rows,
       (SELECT count(*) FROM ({day(1)} EXCEPT ALL {day(2)}) d)
     + (SELECT count(*) FROM ({day(2)} EXCEPT ALL {day(1)}) d) AS differing
"""


async def compare(conn: asyncpg.Connection, kontod_day: date, floor_day: date) -> list[Comparison]:
    found = []
    for table, columns in floor.SNAPSHOT_TABLES:
        row = await conn.fetchrow(compare_sql(table, columns), kontod_day, floor_day)
        assert row is not None
        found.append(Comparison(table, kontod_day, floor_day, **dict(row)))
    return found


async def measure(
    data: WorkingData,
    *,
    repetitions: int,
    batch_size: int,
    workers: int = DEFAULT_WORKERS,
    rates: rates_sandbox.RateSandbox,
    rates_root: str,
    old: bool,
    old_note: str | None,
    progress: Progress,
) -> ScaleResult:
    """Every variant ``repetitions`` times on the working copy, interleaved; rows compared."""
    result = ScaleResult(
        users=data.users,
        sizes=data.sizes,
        history_days=data.history_days,
        generated_seconds=data.generated_seconds,
        repetitions=repetitions,
        batch_size=batch_size,
        workers=workers,
        old_note=old_note,
        in_place=data.in_place,
    )
    days = (FIRST_DAY + timedelta(days=n) for n in range(10_000))
    conn = await asyncpg.connect(data.dsn)
    try:
        pairs: list[tuple[date, date]] = []
        parallel_pairs: list[tuple[date, date]] = []
        old_day: date | None = None
        for rep in range(repetitions):
            variants = ["kontod", "floor", "parallel", "aggregate"]
            shift = rep % len(variants)
            order = variants[shift:] + variants[:shift]
            if rep == 0 and old:
                order.append("old")
            kontod_day = floor_day = parallel_day = None
            for variant in order:
                day = next(days)
                await settle(conn)
                progress(f"snapshots: {data.users} users, pass {rep + 1}, {variant}")
                if variant == "kontod":
                    kontod_day = day
                    # The ECB publishes the day's rates: the run fetches and stores them.
                    rates.ecb_day = day
                    tick = datetime(day.year, day.month, day.day, 2, tzinfo=UTC)
                    first = await kontod_pass(conn, data.dsn, tick, batch_size, rates_root, workers)
                    result.passes.append(_at(first, "kontod", rep))
                    await settle(conn)
                    progress(f"snapshots: {data.users} users, pass {rep + 1}, rerun")
                    xid: str = await conn.fetchval(XID_SQL)
                    before = await day_rows(conn, day)
                    again = await kontod_pass(
                        conn,
                        data.dsn,
                        tick + timedelta(hours=1),
                        batch_size,
                        rates_root,
                        workers,
                    )
                    changed = await changed_since(conn, day, xid, before)
                    result.passes.append(_at(again, "rerun", rep, changed))
                    continue
                if variant == "parallel":
                    parallel_day = day
                    seconds, rows = await parallel_floor_pass(data.dsn, day, workers)
                    result.passes.append(Pass(variant, rep, day, seconds, rows))
                    continue
                timed: Callable[[asyncpg.Connection, date], Awaitable[tuple[float, int]]] = {
                    "floor": floor_pass,
                    "aggregate": aggregate_pass,
                    "old": old_pass,
                }[variant]
                seconds, rows = await timed(conn, day)
                if variant == "floor":
                    floor_day = day
                if variant == "old":
                    old_day = day
                result.passes.append(Pass(variant, rep, day, seconds, rows))
            assert kontod_day is not None
            assert floor_day is not None
            assert parallel_day is not None
            pairs.append((kontod_day, floor_day))
            parallel_pairs.append((parallel_day, floor_day))
        progress("snapshots: comparing kontod's rows with the floor's")
        for kontod_day, floor_day in pairs:
            result.comparisons += await compare(conn, kontod_day, floor_day)
        for parallel_day, floor_day in parallel_pairs:
            result.parallel_comparisons += await compare(conn, parallel_day, floor_day)
        if old_day is not None:
            result.old_comparisons = await compare(conn, old_day, pairs[0][1])
    finally:
        await conn.close()
    return result


def _at(p: Pass, variant: str, rep: int, changed: int | None = None) -> Pass:
    return Pass(variant, rep, p.day, p.seconds, p.rows, p.wall_seconds, p.peak_rss_kib, changed)
