"""The database layer against a real PostgreSQL: migrations, existing data, pool sessions."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from kontod import db
from kontod.config import Settings
from kontod.scheduler import runs
from kontod.scheduler.history import History
from tests.helpers import LEGACY_TABLES, konto_schema_of


async def test_migrate_creates_tables_in_proper_types(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        applied = await db.migrate(conn)
        assert applied[:2] == ["0001_konto_tables", "0002_kontod_runs"]
        types = {
            (r["table_name"], r["column_name"]): r["data_type"]
            for r in await conn.fetch(
                "SELECT table_name, column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = 'public'"
            )
        }
        assert types[("bank_accounts", "balance")] == "numeric"
        assert types[("bank_accounts", "hidden")] == "boolean"
        assert types[("bank_accounts", "last_sync")] == "timestamp with time zone"
        assert types[("patrimoine_snapshots", "date")] == "date"
        assert types[("patrimoine_snapshots", "total_value")] == "numeric"
        assert types[("assets", "current_value")] == "numeric"
        assert types[("kontod_runs", "scheduled_for")] == "timestamp with time zone"
        assert await db.migrate(conn) == []
    finally:
        await conn.close()


async def test_existing_konto_tables_keep_every_row_and_their_types(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(LEGACY_TABLES)
        await conn.execute(
            """
            CREATE TABLE patrimoine_snapshots (id serial PRIMARY KEY, date date, user_id integer,
                category text, total_value real, created_at timestamptz DEFAULT now(),
                UNIQUE (date, user_id, category));
            INSERT INTO users VALUES (1, 'a@example.org', 'A', now());
            INSERT INTO bank_accounts (id, user_id, name, balance, hidden, type)
                VALUES (1, 1, 'Courant', 1234.56, 0, 'checking'), (2, 1, 'Vieux', 0.1, 1, NULL);
            INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)
                VALUES ('2026-01-01', 1, 'total', 1234.5);
            """
        )
        before = await konto_schema_of(conn)
        await db.migrate(conn)
        # Floats stay floats and 0/1 flags stay integers: the web app's schema is its own.
        existing = {row[0] for row in before}
        assert [row for row in await konto_schema_of(conn) if row[0] in existing] == before
        rows = await conn.fetch("SELECT id, balance, hidden FROM bank_accounts ORDER BY id")
        assert [(r["id"], r["balance"], r["hidden"]) for r in rows] == [
            (1, 1234.56, 0),
            (2, 0.1, 1),
        ]
        assert await conn.fetchval("SELECT count(*) FROM users") == 1
        assert await conn.fetchval("SELECT total_value FROM patrimoine_snapshots") == 1234.5
        # Only the missing tables were created, kontod's own next to them.
        created = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
        assert {"assets", "bank_connections", "transactions", "kontod_accounts"} <= created
    finally:
        await conn.close()


async def test_two_processes_migrating_together_do_not_race(empty_dsn: str) -> None:
    import asyncio

    conns = [await asyncpg.connect(empty_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(db.migrate(c) for c in conns))
        applied = [name for names in results for name in names]
        assert sorted(applied) == sorted(f"{m.version:04d}_{m.name}" for m in db.migrations())
    finally:
        for c in conns:
            await c.close()


async def test_pool_sessions_carry_only_their_name(dsn: str) -> None:
    # Nothing but application_name is set per session, so a pooler in transaction mode, which
    # hands one server session to many clients, changes nothing.
    pool = await db.create_pool(dsn, "kontod-settings-test", max_size=1)
    try:
        for _ in range(2):  # the second checkout comes after the pool's RESET ALL
            async with pool.acquire() as conn:
                assert await conn.fetchval("SHOW application_name") == "kontod-settings-test"
                assert await conn.fetchval("SHOW statement_timeout") == "0"
                assert await conn.fetchval("SHOW client_connection_check_interval") == "0"
    finally:
        await pool.close()


async def test_the_fence_limits_its_own_transaction_only(dsn: str) -> None:
    pool = await db.create_pool(dsn, "fence-test", max_size=1)
    try:
        run_id = await runs.claim(pool, "job", "manual", None, 1, "fence-test", 30)
        assert run_id is not None
        async with pool.acquire() as conn:
            async with conn.transaction():
                assert await runs.fence(conn, run_id, "fence-test", 30000, 10000)
                assert await conn.fetchval("SHOW statement_timeout") == "30s"
                assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "10s"
            assert await conn.fetchval("SHOW statement_timeout") == "0"
            async with conn.transaction():
                # Another instance, or a run whose lease is over, does not pass.
                assert not await runs.fence(conn, run_id, "someone-else", 30000, 10000)
            await conn.execute("UPDATE kontod_runs SET lease_until = now() - interval '1 s'")
            async with conn.transaction():
                assert not await runs.fence(conn, run_id, "fence-test", 30000, 10000)
    finally:
        await pool.close()


async def _old_runs(
    pool: asyncpg.Pool, job: str, statuses: list[str], days_ago: list[float]
) -> list[int]:
    """Finished (or running) manual runs of ``job`` started ``days_ago`` days ago; their ids."""
    ids: list[int] = []
    for status, age in zip(statuses, days_ago, strict=True):
        ids.append(
            await pool.fetchval(
                """INSERT INTO kontod_runs (job, trigger, started_at, finished_at, status, error,
                                            instance, lease_until)
                   VALUES ($1, 'manual', now() - make_interval(secs => $2 * 86400),
                           CASE WHEN $3 <> 'running'
                                THEN now() - make_interval(secs => $2 * 86400 - 60) END,
                           $3, CASE WHEN $3 NOT IN ('running', 'success') THEN 'boom' END,
                           'prune-test', now() + interval '1 hour')
                   RETURNING id""",
                job,
                age,
                status,
            )
        )
    return ids


async def test_pruning_keeps_the_last_runs_the_last_failure_and_success_and_running_ones(
    pool: asyncpg.Pool,
) -> None:
    await runs.register_jobs(pool, ["failed-once", "succeeded-once", "recent"])
    # All older than the 90 days window: 120 successes after one old failure.
    [old_failure] = await _old_runs(pool, "failed-once", ["error"], [300])
    successes = await _old_runs(
        pool, "failed-once", ["success"] * 120, [250 - i for i in range(120)]
    )
    # One old success, then a run still going since long ago, then 120 failures.
    [old_success] = await _old_runs(pool, "succeeded-once", ["success"], [300])
    [running] = await _old_runs(pool, "succeeded-once", ["running"], [299])
    failures = await _old_runs(
        pool,
        "succeeded-once",
        [("error", "timeout", "interrupted")[i % 3] for i in range(120)],
        [250 - i for i in range(120)],
    )
    # 150 runs younger than the window: all stay, whatever their number.
    young = await _old_runs(pool, "recent", ["success"] * 150, [60 - i * 0.3 for i in range(150)])
    await pool.execute(
        "UPDATE kontod_jobs SET runs = 1000 + length(name), errors = 500 + length(name)"
    )
    history = History(pool, "prune-test", lease_s=30)
    before = await history.refresh()

    assert await history.prune() == 40
    left = {r["id"] for r in await pool.fetch("SELECT id FROM kontod_runs")}
    assert (
        left
        == {
            old_failure,
            *successes[20:],  # the newest 100
            old_success,
            running,
            *failures[20:],
            *young,
        }
    )
    assert await pool.fetchval("SELECT status FROM kontod_runs WHERE id = $1", running) == (
        "running"
    )
    after = await history.refresh()
    for job in ("failed-once", "succeeded-once", "recent"):
        # The counters, and the last success and failure the health reads, are unchanged.
        assert (after[job].runs, after[job].errors) == (1000 + len(job), 500 + len(job))
        assert after[job].last_success_at == before[job].last_success_at
        assert after[job].last_error == before[job].last_error
    assert await history.prune() == 0
    assert len(left) == await pool.fetchval("SELECT count(*) FROM kontod_runs")


def test_only_a_process_allowed_to_create_may_start_without_a_database(tmp_path: Path) -> None:
    external = Settings().replace(database={"url": "postgresql://u@h/d", "state_dir": tmp_path})
    assert db.refusal(external, create=False) is None
    assert db.refusal(external, create=True) is None
    # kontod run: an embedded database only when asked for.
    bare = Settings().replace(database={"state_dir": tmp_path})
    embedded = Settings().replace(database={"state_dir": tmp_path, "embedded": True})
    assert db.refusal(bare, create=True) == db.run_without_url(tmp_path)
    assert db.refusal(embedded, create=True) is None
    # Any other command opens one that exists, or none: KONTOD_EMBEDDED does not change that.
    for settings in (bare, embedded):
        assert db.refusal(settings, create=False) == db.command_without_database(tmp_path)
    assert not (tmp_path / "pgdata").exists()
