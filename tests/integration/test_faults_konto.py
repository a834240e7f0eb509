"""Faults with real ``kontod run`` processes on a Konto kept in SQLite (a file, or a libSQL
server): a Konto kontod cannot use stops the start with exit 2 and says why; a replica frozen
between two batches is taken over and writes nothing after; a writer holding the file's lock
delays a run, never breaks it.

How the frozen replica is stopped between two batches. SQLite cannot sleep inside a statement,
so the PostgreSQL tests' slow trigger has no equivalent here. The test holds the file's write
lock itself instead (``BEGIN IMMEDIATE`` in a thread of its own) as soon as the victim has
written a batch: the victim's next write waits for the lock *before* its transaction begins
(kontod logs ``konto.busy`` while it waits), the test freezes it there and lets the lock go.
The victim is then frozen holding no lock of the file, between two of its write transactions;
the two live replicas start then, and one takes the run over once its lease has expired.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from kontod.demo.hrana_sandbox import HranaSandbox
from kontod.demo.rates_sandbox import RateSandbox
from kontod.demo.rates_sandbox import urls as rate_urls
from kontod.konto import lite_schema
from kontod.konto.fenced import FencedWriter
from kontod.konto.sqlite import open_sqlite
from kontod.konto.store import Statement
from kontod.scheduler.contract import RunContext
from kontod.scheduler.runner import Started
from tests.helpers import close, free_port, runner_on, spec, webapp_konto
from tests.integration.test_faults import FAST, LEASE_S, recent_daily, tick_of, wait_until
from tests.integration.test_signals import JOB, START_TIMEOUT_S, Kontod, clean_environ, kontod

SECRET = "the-right-libsql-token-8d1e"
WRONG = "a-wrong-libsql-token-4c2a"


async def exits_with(k: Kontod, status: int) -> str:
    """Wait for kontod to exit with ``status``; its output."""
    assert await k.wait_exit(START_TIMEOUT_S) == status, k.log()
    return k.log()


def drop_column(path: Path, table: str, column: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.commit()
    finally:
        conn.close()


async def test_a_missing_konto_column_stops_the_start_naming_table_and_column(
    dsn: str, tmp_path: Path
) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    drop_column(path, "bank_accounts", "currency")
    async with kontod(dsn, tmp_path, "schema", {"KONTOD_KONTO_URL": f"file:{path}"}) as k:
        out = await exits_with(k, 2)
    assert "Konto's table bank_accounts has no column currency, which kontod needs" in out, out
    assert "Traceback" not in out, out
    assert k.logged("job.registered") is None


async def test_a_missing_konto_file_stops_the_start_and_is_not_created(
    dsn: str, tmp_path: Path
) -> None:
    missing = tmp_path / "db" / "konto.db"
    async with kontod(dsn, tmp_path, "missing", {"KONTOD_KONTO_URL": f"file:{missing}"}) as k:
        out = await exits_with(k, 2)
    assert f"Konto's SQLite file {missing} does not exist" in out, out
    assert "Traceback" not in out, out
    assert not missing.exists() and not missing.parent.exists()


async def test_a_libsql_konto_refusing_the_token_stops_the_start_without_showing_it(
    dsn: str, tmp_path: Path
) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    server = HranaSandbox(path, SECRET)
    async with server.serve() as url:
        settings = {"KONTOD_KONTO_URL": url, "KONTOD_KONTO_AUTH_TOKEN": WRONG}
        async with kontod(dsn, tmp_path, "token", settings) as k:
            out = await exits_with(k, 2)
    assert f"libSQL server {url}" in out, out
    assert "refused kontod's token (HTTP 401)" in out, out
    assert WRONG not in out and SECRET not in out, out
    assert "Traceback" not in out, out
    # The right token starts it (the same server, the same file): the token was the fault.
    async with server.serve() as url:
        settings = {"KONTOD_KONTO_URL": url, "KONTOD_KONTO_AUTH_TOKEN": SECRET}
        async with kontod(dsn, tmp_path, "token-ok", settings) as k:
            await k.wait_logged("job.registered", timeout=START_TIMEOUT_S)
            await k.wait_logged("konto.opened", engine="libsql")
            k.proc.send_signal(signal.SIGTERM)
            assert await k.wait_exit(20) == 0, k.log()
        assert SECRET not in k.log()


@contextmanager
def write_lock(path: Path) -> Iterator[threading.Event]:
    """Hold the file's write lock (``BEGIN IMMEDIATE``) in a thread until the event is set."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            taken.set()
            release.wait(60)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    thread = threading.Thread(target=hold, name="konto-lock-holder")
    thread.start()
    try:
        if not taken.wait(30):
            pytest.fail("the test could not take the file's write lock")
        yield release
    finally:
        release.set()
        thread.join()


async def test_a_konto_write_waiting_longer_than_the_guards_idle_limit_still_succeeds(
    dsn: str, tmp_path: Path
) -> None:
    """The PostgreSQL transaction guarding a Konto write gets an idle limit of a third of the
    lease (2 s here); the web app holds the file's lock for 4 s. The write waits, commits once,
    and the run succeeds: the guard the server ended meanwhile fails nothing."""
    path = webapp_konto(tmp_path / "konto.db")
    konto = open_sqlite(str(path), busy_timeout=30)
    await lite_schema.create_missing(konto)
    holding = asyncio.Event()

    async def body(ctx: RunContext) -> None:
        writer = await FencedWriter.start(konto, runner.pool, ctx)
        with write_lock(path) as release:
            holding.set()
            asyncio.get_running_loop().call_later(4, release.set)
            await writer.write([Statement("INSERT INTO users (email) VALUES ('late@x')")])

    runner, _ = await runner_on(dsn, [spec(body=body)], lease_s=6)
    try:
        with capture_logs() as logs:
            started = await runner.trigger("test-job", "manual")
            assert isinstance(started, Started)
            status = await asyncio.wait_for(started.task, timeout=30)
        assert holding.is_set()
        assert status == "success", logs
        assert "konto.guard_ended" in [e["event"] for e in logs]
        assert await konto.read("SELECT email FROM users") == [("late@x",)]
    finally:
        await close(runner)
        await konto.close()


# Users in the Konto of the two tests below, one per batch: enough that a run (about 60 batches
# a second here) is still writing when the test takes the lock, right after its first batch.
USERS = 400


def seed_konto(path: Path, users: int = USERS) -> None:
    """``users`` users with one EUR checking account each (balance 100.25 + id)."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO users (id, email) VALUES (?, ?)",
                [(i, f"u{i}@example.org") for i in range(1, users + 1)],
            )
            conn.execute(
                """INSERT INTO bank_accounts (user_id, name, type, balance, hidden, currency)
                   SELECT id, 'acc', 'checking', 100.25 + id, 0, 'EUR' FROM users"""
            )
    finally:
        conn.close()


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    """One read of the file on a connection of its own (waits up to 30 s for a writer)."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def execute(path: Path, sql: str) -> None:
    """One write transaction on the file, as the web app would make it."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        with conn:
            conn.execute(sql)
    finally:
        conn.close()


def users_written(path: Path) -> int:
    [(n,)] = query(path, "SELECT count(*) FROM patrimoine_snapshots WHERE category = 'total'")
    return int(str(n))


def half_written(path: Path) -> list[tuple[object, ...]]:
    """Users whose rows of a date are not whole: a total without its checking row or holding,
    or the other way round, or a total that is not their balance."""
    return query(
        path,
        """SELECT u.id, p.date, t.total_value, p.total_value, h.value, a.balance
             FROM users u
             JOIN bank_accounts a ON a.user_id = u.id
             JOIN (SELECT DISTINCT date FROM patrimoine_snapshots) d
             LEFT JOIN patrimoine_snapshots t
               ON t.user_id = u.id AND t.date = d.date AND t.category = 'total'
             LEFT JOIN patrimoine_snapshots p
               ON p.user_id = u.id AND p.date = d.date AND p.category = 'checking'
             LEFT JOIN holding_snapshots h ON h.user_id = u.id AND h.date = d.date
            WHERE NOT ((t.total_value IS NULL AND p.total_value IS NULL AND h.value IS NULL)
                       OR (t.total_value = a.balance AND p.total_value = a.balance
                           AND h.value = a.balance))""",
    )


def snapshot_tables(path: Path) -> list[tuple[object, ...]]:
    """Every snapshot row of the file, ids and creation times included."""
    return query(path, "SELECT * FROM patrimoine_snapshots ORDER BY id") + query(
        path, "SELECT * FROM holding_snapshots ORDER BY id"
    )


async def until_written(path: Path, k: Kontod, at_least: int = 1) -> None:
    async def some() -> bool:
        return await asyncio.to_thread(users_written, path) >= at_least

    await k.until(some, f"{at_least} user(s) written to {path}", timeout=START_TIMEOUT_S)


async def test_a_writer_holding_the_lock_for_3_s_delays_the_run_which_succeeds_whole(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    seed_konto(path, USERS)
    async with RateSandbox().serve() as rates_root:
        fiat, crypto = rate_urls(rates_root)
        settings = FAST | {
            "KONTOD_KONTO_URL": f"file:{path}",
            "KONTOD_SNAPSHOT_SCHEDULE": recent_daily(datetime.now(UTC)),
            "KONTOD_FIAT_RATES_URL": fiat,
            "KONTOD_CRYPTO_PRICES_URL": crypto,
        }
        async with kontod(dsn, tmp_path, "writer", settings) as k:
            await until_written(path, k)
            with write_lock(path) as release:
                # The web app's transaction: kontod's batches wait, none is half-written.
                held_at = time.monotonic()
                written = await asyncio.to_thread(users_written, path)
                assert 0 < written < USERS, written
                assert await asyncio.to_thread(half_written, path) == []
                await k.wait_logged("konto.busy", timeout=10)
                await asyncio.sleep(3 - (time.monotonic() - held_at))
                release.set()
            await k.wait_logged("run.finished", job=JOB, timeout=120)
            finished = k.logged("run.finished", job=JOB)
            assert finished is not None and finished["status"] == "success", k.log()
            assert finished["counts"]["users"] == USERS
            assert finished["duration_s"] >= 3
            k.proc.send_signal(signal.SIGTERM)
            assert await k.wait_exit(20) == 0, k.log()
    assert await asyncio.to_thread(users_written, path) == USERS
    assert await asyncio.to_thread(half_written, path) == []
    [run] = await pool.fetch("SELECT status, trigger FROM kontod_runs WHERE job = $1", JOB)
    assert (run["status"], run["trigger"]) == ("success", "catchup")


async def test_a_frozen_replica_writing_to_sqlite_is_taken_over_and_writes_nothing_after(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path, record_property: Any
) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    seed_konto(path)
    now = datetime.now(UTC)
    expr = recent_daily(now)
    tick = tick_of(expr, now)
    async with RateSandbox().serve() as rates_root:
        fiat, crypto = rate_urls(rates_root)
        settings = FAST | {
            "KONTOD_KONTO_URL": f"file:{path}",
            "KONTOD_SNAPSHOT_SCHEDULE": expr,
            "KONTOD_FIAT_RATES_URL": fiat,
            "KONTOD_CRYPTO_PRICES_URL": crypto,
        }
        async with kontod(dsn, tmp_path, "victim", settings) as victim:
            await until_written(path, victim)
            with write_lock(path):
                # The victim's next batch waits for the lock before its transaction begins:
                # it is frozen there, between two batches, holding no lock of the file.
                written = await asyncio.to_thread(users_written, path)
                assert 0 < written < USERS, written
                await victim.wait_logged("konto.busy", timeout=10)
                victim.proc.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            # New balances: the takeover rewrites every row, and a late write of the victim
            # would carry the old ones.
            await asyncio.to_thread(execute, path, "UPDATE bank_accounts SET balance = balance + 1")
            # Two live replicas, started while the victim is frozen.
            async with (
                kontod(dsn, tmp_path, "survivor-1", settings) as s1,
                kontod(dsn, tmp_path, "survivor-2", settings) as s2,
            ):
                everyone = [victim, s1, s2]

                async def succeeded() -> bool:
                    statuses = await pool.fetch(
                        "SELECT status FROM kontod_runs WHERE job = $1 AND scheduled_for = $2",
                        JOB,
                        tick,
                    )
                    return any(r["status"] == "success" for r in statuses)

                await wait_until(succeeded, "the takeover succeeding", everyone, LEASE_S + 120)
                done_s = time.monotonic() - stopped_at
                after_takeover = await asyncio.to_thread(snapshot_tables, path)
                victim.proc.send_signal(signal.SIGCONT)

                async def woke() -> bool:
                    return any(
                        victim.logged(e) is not None for e in ("run.record_lost", "run.claim_lost")
                    )

                await wait_until(woke, "the victim learning it lost", everyone, 30)
                await asyncio.sleep(2)  # time for any late write to show
                assert await asyncio.to_thread(snapshot_tables, path) == after_takeover
                assert victim.logged("run.finished", status="success", job=JOB) is None
                for k in (s1, s2):
                    k.proc.send_signal(signal.SIGTERM)
                for k in (s1, s2):
                    assert await k.wait_exit(20) == 0, k.log()

    first, second = await pool.fetch(
        "SELECT * FROM kontod_runs WHERE job = $1 AND scheduled_for = $2 ORDER BY attempt",
        JOB,
        tick,
    )
    assert (first["instance"], first["status"]) == ("victim", "interrupted"), dict(first)
    assert (second["trigger"], second["attempt"], second["status"]) == ("takeover", 2, "success")
    assert second["instance"] in ("survivor-1", "survivor-2")
    # Every row is the takeover's, with the new balances; the fence holds its run.
    assert await asyncio.to_thread(users_written, path) == USERS
    assert await asyncio.to_thread(half_written, path) == []
    fence = await asyncio.to_thread(
        query, path, "SELECT token FROM kontod_fence WHERE job = 'daily-snapshots'"
    )
    assert fence == [(second["id"],)]
    record_property("sqlite_takeover_done_s", round(done_s, 2))
    print(f"SQLite Konto: takeover done {done_s:.2f} s after the freeze ({written} users before)")


async def test_kontod_run_keeps_its_own_tables_in_the_embedded_postgresql_beside_a_sqlite_konto(
    tmp_path: Path,
) -> None:
    """No ``KONTOD_DATABASE_URL`` and no ``KONTOD_EMBEDDED``: with Konto's tables in a SQLite
    file, ``kontod run`` starts on the embedded PostgreSQL and stops it on its way out."""
    path = webapp_konto(tmp_path / "konto.db")
    state = Path(tempfile.mkdtemp(prefix="kontod-lite-"))  # short: the socket lives in pgdata
    port = free_port()
    env = clean_environ() | {
        "KONTOD_KONTO_URL": f"file:{path}",
        "KONTOD_STATE_DIR": str(state),
        "KONTOD_LISTEN": f"127.0.0.1:{port}",
        "KONTOD_LOG_FORMAT": "json",
        "KONTOD_SNAPSHOT_SCHEDULE": "0 12 1 1 *",
        "KONTOD_REFRESH_SCHEDULE": "0 12 1 1 *",
    }
    log_path = tmp_path / "embedded.log"
    try:
        with log_path.open("w") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kontod", "run", env=env, stdout=log_file, stderr=log_file
            )
        k = Kontod(proc, log_path, port)
        try:
            await k.wait_logged("job.registered", job=JOB, timeout=START_TIMEOUT_S)
            assert k.logged("database.embedded", data_dir=str(state / "pgdata")) is not None
            assert k.logged("konto.opened", engine="sqlite", location=f"sqlite {path}")
            proc.send_signal(signal.SIGTERM)
            assert await k.wait_exit(30) == 0, k.log()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert not (state / "pgdata" / "postmaster.pid").exists(), k.log()
        assert {"holding_snapshots", "kontod_fence"} <= {
            str(r[0]) for r in query(path, "SELECT name FROM sqlite_schema WHERE type = 'table'")
        }
    finally:
        shutil.rmtree(state, ignore_errors=True)
