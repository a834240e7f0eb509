"""daily-snapshots: kontod's set-based batches against the old job's per-user round trips.

Both write the same day's snapshot of the same users, each on a date of its own, in the same
database; their rows are then compared. The old job is re-implemented here as the reference
page describes it (``konto-jobs.md``, defect 1): list the users, then for each user read the
accounts, read the assets, sum them in the application and write each category row and the
total one statement at a time, each statement committing on its own as SQLite's autocommit did.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from bench.postgres import migrated_database, settle, with_database
from kontod import db
from kontod.job import RunContext
from kontod.jobs.snapshots import take_snapshots

UTC_ZONE = ZoneInfo("UTC")

# N users; user u has 2 to 5 accounts (one of five types, a missing one included, some hidden,
# loans negative) and 0 to 2 assets (current value, else purchase price, else nothing). Every
# 50th user owns nothing, so the "total is 0" row is exercised too. Amounts have cents and are
# deterministic, so two runs of the benchmark seed the same data.
SEED_SQL = (
    """
INSERT INTO users (id, email, name)
SELECT u, 'bench' || u || '@example.org', 'User ' || u FROM generate_series(1, $1::int) u
""",
    """
INSERT INTO bank_accounts (user_id, name, type, balance, hidden)
SELECT u, 'account ' || k,
       (ARRAY['checking', 'savings', 'investment', 'loan', NULL])[1 + (u + k) % 5],
       CASE WHEN (u + k) % 5 = 3 THEN -1 ELSE 1 END
           * round(((u::bigint * 7919 + k * 104729) % 10000000)::numeric / 100, 2),
       (u * 3 + k) % 11 = 0
  FROM generate_series(1, $1::int) u, generate_series(1, 2 + u % 4) k
 WHERE u % 50 <> 0
""",
    """
INSERT INTO assets (user_id, name, type, purchase_price, current_value)
SELECT u, 'asset ' || k,
       (ARRAY['real_estate', 'vehicle', 'valuable', 'other', NULL])[1 + (u * k) % 5],
       CASE WHEN (u + k) % 4 = 0 THEN NULL
            ELSE round(((u::bigint * 104729 + k * 7919) % 50000000)::numeric / 100, 2) END,
       CASE WHEN (u + k) % 3 = 0 THEN NULL
            ELSE round(((u::bigint * 15485863 + k * 32452843) % 60000000)::numeric / 100, 2)
                 + 1 END
  FROM generate_series(1, $1::int) u, generate_series(1, u % 3) k
 WHERE u % 50 <> 0
""",
)
ANALYZE_SQL = "VACUUM ANALYZE users, bank_accounts, assets, patrimoine_snapshots"
SIZES_SQL = """
SELECT (SELECT count(*) FROM users) AS users, (SELECT count(*) FROM bank_accounts) AS accounts,
       (SELECT count(*) FROM assets) AS assets
"""

# The old job, statement by statement. "INSERT OR REPLACE" of SQLite becomes an upsert.
OLD_USERS_SQL = "SELECT id FROM users ORDER BY id"
OLD_ACCOUNTS_SQL = "SELECT type, balance FROM bank_accounts WHERE user_id = $1 AND NOT hidden"
OLD_ASSETS_SQL = "SELECT type, purchase_price, current_value FROM assets WHERE user_id = $1"
OLD_WRITE_SQL = """
INSERT INTO patrimoine_snapshots (date, user_id, category, total_value) VALUES ($1, $2, $3, $4)
ON CONFLICT (date, user_id, category)
    DO UPDATE SET total_value = EXCLUDED.total_value, created_at = now()
"""

# Both days hold exactly the same (user, category, value) rows when both differences are empty;
# numeric equality ignores trailing zeros, so 150.10 and 150.1 are the same value.
COMPARE_SQL = """
SELECT (SELECT count(*) FROM patrimoine_snapshots WHERE date = $1) AS rows_a,
       (SELECT count(*) FROM patrimoine_snapshots WHERE date = $2) AS rows_b,
       (SELECT coalesce(sum(total_value), 0) FROM patrimoine_snapshots
         WHERE date = $1 AND category = 'total') AS total_a,
       (SELECT coalesce(sum(total_value), 0) FROM patrimoine_snapshots
         WHERE date = $2 AND category = 'total') AS total_b,
       (SELECT coalesce(sum(total_value), 0) FROM patrimoine_snapshots WHERE date = $1) AS all_a,
       (SELECT coalesce(sum(total_value), 0) FROM patrimoine_snapshots WHERE date = $2) AS all_b,
       (SELECT count(*) FROM (
            SELECT user_id, category, total_value FROM patrimoine_snapshots WHERE date = $1
            EXCEPT ALL
            SELECT user_id, category, total_value FROM patrimoine_snapshots WHERE date = $2) d)
     + (SELECT count(*) FROM (
            SELECT user_id, category, total_value FROM patrimoine_snapshots WHERE date = $2
            EXCEPT ALL
            SELECT user_id, category, total_value FROM patrimoine_snapshots WHERE date = $1) d)
       AS differing
"""

# asyncpg's free list holds at most 2000 records of each length (ApgRecord_MAXFREELIST).
DRAIN_RECORD_FREELIST_SQL = "SELECT g FROM generate_series(1, 2000) g"

# One date per pass, so every pass writes a whole day from nothing.
TIMED_DAYS = (date(2026, 6, 10), date(2026, 6, 11))
TRACED_DAYS = (date(2026, 6, 12), date(2026, 6, 13))


@dataclass(frozen=True)
class Timed:
    """One pass of one implementation over every user."""

    seconds: float
    users: int
    rows: int

    @property
    def users_per_second(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class Memory:
    """Peak Python heap (tracemalloc) of one traced pass of each implementation."""

    users: int
    kontod_peak_bytes: int
    old_peak_bytes: int


@dataclass(frozen=True)
class Comparison:
    """What the two days hold: equal when ``differing`` is 0 and the sums agree."""

    rows_kontod: int
    rows_old: int
    total_kontod: Decimal
    total_old: Decimal
    all_kontod: Decimal
    all_old: Decimal
    differing: int

    @property
    def same(self) -> bool:
        return (
            self.differing == 0
            and self.rows_kontod == self.rows_old
            and self.total_kontod == self.total_old
            and self.all_kontod == self.all_old
        )


@dataclass(frozen=True)
class SnapshotResult:
    users: int
    accounts: int
    assets: int
    batch_size: int
    # "statement": every old statement commits alone, as it did; "user": one per user.
    old_commit: str
    kontod: Timed
    old: Timed
    comparison: Comparison
    memory: list[Memory]

    @property
    def speedup(self) -> float:
        return self.old.seconds / self.kontod.seconds if self.kontod.seconds > 0 else float("inf")


Progress = Callable[[str], None]


async def seed(conn: asyncpg.Connection, users: int) -> None:
    """``users`` users with their accounts and assets, in three set-based statements."""
    async with conn.transaction():
        for sql in SEED_SQL:
            await conn.execute(sql, users)
    await conn.execute(ANALYZE_SQL)


def _ctx(day: date) -> RunContext:
    at = datetime(day.year, day.month, day.day, 2, tzinfo=UTC)
    return RunContext(
        run_id=1,
        job="daily-snapshots",
        trigger="manual",
        scheduled_for=None,
        started_at=at,
        log=structlog.get_logger("bench.snapshots"),
    )


async def kontod_snapshots(pool: asyncpg.Pool, day: date, batch_size: int) -> tuple[int, int]:
    """kontod's job body for ``day``; return (users, rows written)."""
    ctx = _ctx(day)
    await take_snapshots(pool, ctx, UTC_ZONE, batch_size)
    return ctx.counts["users"], ctx.counts["rows_written"]


async def old_snapshots(
    conn: asyncpg.Connection | PoolConnectionProxy, day: date, *, commit_per_user: bool = False
) -> tuple[int, int]:
    """The old job for ``day``, one round trip per read and per written row; (users, rows).

    Each statement commits on its own, as the old job's did; with ``commit_per_user`` a user's
    statements share one transaction instead, which leaves the round trips and takes most of
    the commits (and their waits for the disk) away.
    """
    users = await conn.fetch(OLD_USERS_SQL)
    written = errors = 0
    for user in users:
        try:
            if commit_per_user:
                async with conn.transaction():
                    written += await _old_user(conn, day, user["id"])
            else:
                written += await _old_user(conn, day, user["id"])
        except asyncpg.PostgresError:
            # The old job logged, counted and went on; the benchmark's data never fails.
            errors += 1
    if errors:
        raise RuntimeError(f"the old snapshot job failed for {errors} user(s)")
    return len(users), written


async def _old_user(conn: asyncpg.Connection | PoolConnectionProxy, day: date, user_id: int) -> int:
    """One user's snapshot the old way: two reads, sums in Python, one write per row."""
    sums: dict[str, Decimal] = {}
    for account in await conn.fetch(OLD_ACCOUNTS_SQL, user_id):
        category = account["type"] or "checking"
        sums[category] = sums.get(category, Decimal(0)) + account["balance"]
    for asset in await conn.fetch(OLD_ASSETS_SQL, user_id):
        category = asset["type"] or "other"
        value = asset["current_value"]
        if value is None:
            value = asset["purchase_price"]
        sums[category] = sums.get(category, Decimal(0)) + (value or Decimal(0))
    total = Decimal(0)
    written = 0
    for category, value in sums.items():
        if value != 0:
            await conn.execute(OLD_WRITE_SQL, day, user_id, category, value)
            total += value
            written += 1
    await conn.execute(OLD_WRITE_SQL, day, user_id, "total", total)
    return written + 1


async def _timed(run: Callable[[], Awaitable[tuple[int, int]]]) -> Timed:
    started = time.perf_counter()
    users, rows = await run()
    return Timed(time.perf_counter() - started, users, rows)


async def _traced(run: Callable[[], Awaitable[tuple[int, int]]]) -> int:
    """Peak bytes the Python heap grew by during ``run`` (tracemalloc slows it; not timed)."""
    # Garbage left by what ran before would be freed at some random point of the pass.
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        await run()
        _, peak = tracemalloc.get_traced_memory()
        return peak - before
    finally:
        tracemalloc.stop()


async def _memory(
    admin_dsn: str, users: int, batch_size: int, commit_per_user: bool, progress: Progress
) -> Memory:
    """Peak heap of each implementation on a database of ``users`` users of its own."""
    async with migrated_database(admin_dsn) as name:
        progress(f"snapshots: tracing memory with {users} users")
        dsn = with_database(admin_dsn, name)
        conn = await asyncpg.connect(dsn)
        try:
            await seed(conn, users)
            # Commits that do not wait for the disk make these untimed passes quicker; what
            # Python allocates is the same.
            await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        finally:
            await conn.close()
        pool = await db.create_pool(dsn, db.new_instance_name(), max_size=1)
        try:
            day_new, day_old = TRACED_DAYS
            kontod_peak = await _traced(lambda: kontod_snapshots(pool, day_new, batch_size))
            async with pool.acquire() as pconn:
                # asyncpg keeps up to 2000 freed one-column records for reuse, and a reused
                # record is no allocation tracemalloc sees: holding 2000 of them through the
                # pass empties that list, so each user's record counts whatever ran before.
                held = await pconn.fetch(DRAIN_RECORD_FREELIST_SQL)
                old_peak = await _traced(
                    lambda: old_snapshots(pconn, day_old, commit_per_user=commit_per_user)
                )
                del held
        finally:
            await pool.close()
    return Memory(users, kontod_peak, old_peak)


async def run(
    admin_dsn: str,
    users: int,
    *,
    batch_size: int = 1000,
    memory_users: tuple[int, ...] = (),
    commit_per_user: bool = False,
    progress: Progress = lambda _: None,
) -> SnapshotResult:
    """Seed ``users`` users, time both implementations on them and compare their rows; then
    trace the memory of both on databases of each size of ``memory_users``.

    Memory is traced in passes of their own: tracemalloc slows the code it watches, and far
    more the old job's, which allocates per row in Python.
    """
    async with migrated_database(admin_dsn) as name:
        dsn = with_database(admin_dsn, name)
        progress(f"snapshots: seeding {users} users")
        conn = await asyncpg.connect(dsn)
        try:
            await seed(conn, users)
            sizes = await conn.fetchrow(SIZES_SQL)
            assert sizes is not None
        finally:
            await conn.close()
        pool = await db.create_pool(dsn, db.new_instance_name(), max_size=1)
        try:
            day_new, day_old = TIMED_DAYS
            async with pool.acquire() as pconn:
                await settle(pconn)
            progress(f"snapshots: kontod, batches of {batch_size}")
            kontod = await _timed(lambda: kontod_snapshots(pool, day_new, batch_size))
            async with pool.acquire() as pconn:
                await settle(pconn)
                progress("snapshots: the old way, user by user")
                old = await _timed(
                    lambda: old_snapshots(pconn, day_old, commit_per_user=commit_per_user)
                )
            row = await pool.fetchrow(COMPARE_SQL, day_new, day_old)
            assert row is not None
            comparison = Comparison(*row.values())
        finally:
            await pool.close()
    memory = [
        await _memory(admin_dsn, n, batch_size, commit_per_user, progress) for n in memory_users
    ]
    return SnapshotResult(
        users=sizes["users"],
        accounts=sizes["accounts"],
        assets=sizes["assets"],
        batch_size=batch_size,
        old_commit="user" if commit_per_user else "statement",
        kontod=kontod,
        old=old,
        comparison=comparison,
        memory=memory,
    )
