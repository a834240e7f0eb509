"""Faults with real ``kontod run`` processes on a Konto kept in SQLite (a file, or a libSQL
server): a Konto kontod cannot use stops the start with exit 2 and says why; a replica frozen
between two batches is taken over and writes nothing after; a writer holding the file's lock
delays a run, never breaks it.

How the frozen replica is stopped between two batches. SQLite cannot sleep inside a statement,
so the PostgreSQL tests' slow trigger has no equivalent here. The test holds the file's write
lock itself instead (``BEGIN IMMEDIATE`` in a thread of its own) once the victim has written
some batches: the victim's next write waits for the lock *before* its transaction begins
(kontod logs ``konto.busy`` while it waits), the test freezes it there and lets the lock go.
The victim is then frozen holding no lock of the file, between two of its write transactions.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from kontod.demo.hrana_sandbox import HranaSandbox
from kontod.konto import lite_schema
from kontod.konto.fenced import FencedWriter
from kontod.konto.sqlite import open_sqlite
from kontod.konto.store import Statement
from kontod.scheduler.contract import RunContext
from kontod.scheduler.runner import Started
from tests.helpers import close, runner_on, spec, webapp_konto
from tests.integration.test_signals import START_TIMEOUT_S, Kontod, kontod

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
