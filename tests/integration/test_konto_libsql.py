"""Konto on a libSQL server (``LibsqlKonto`` against the Hrana sandbox): a refused token, the
failures it retries and the one it must not, a busy database, and a frozen run's transaction."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from kontod.config import load_settings
from kontod.demo.hrana_sandbox import Fault, HranaSandbox
from kontod.konto import lite_schema
from kontod.konto.engines import open_konto
from kontod.konto.libsql import LibsqlKonto
from kontod.konto.store import (
    Fence,
    Fenced,
    KontoBusy,
    KontoError,
    KontoUnavailable,
    Statement,
)
from tests.helpers import webapp_konto
from tests.konto_engines import SANDBOX_TOKEN
from tests.sandbox_helpers import Bank

JOB = "daily-snapshots"
INSERT = Statement("INSERT INTO users (email) VALUES (?)", ("a@x",))


@dataclass
class Served:
    sandbox: HranaSandbox
    url: str
    path: Path

    def client(self, token: str | None = SANDBOX_TOKEN, busy_timeout: float = 5.0) -> LibsqlKonto:
        return LibsqlKonto(self.url, token, busy_timeout)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    path = webapp_konto(tmp_path / "konto.db")
    sandbox = HranaSandbox(path, SANDBOX_TOKEN, expiry=0.5, txn_timeout=1.0)
    async with sandbox.serve() as url:
        db = LibsqlKonto(url, SANDBOX_TOKEN, 5)
        await lite_schema.create_missing(db)
        await db.close()
        sandbox.pipelines = 0
        yield Served(sandbox, url, path)


@pytest.fixture
async def konto(served: Served) -> AsyncIterator[LibsqlKonto]:
    db = served.client()
    yield db
    await db.close()


def users(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT email FROM users ORDER BY id").fetchall()
    conn.close()
    return [r[0] for r in rows]


def test_a_libsql_url_opens_the_libsql_engine_with_the_token() -> None:
    settings = load_settings(
        {"TURSO_DATABASE_URL": "libsql://k.turso.io", "TURSO_AUTH_TOKEN": "s3cret"}
    ).konto
    db = open_konto(settings)
    assert isinstance(db, LibsqlKonto)
    assert db.engine == "libsql" and db.url == "https://k.turso.io"


async def test_values_come_back_as_sqlite_gives_them(konto: LibsqlKonto) -> None:
    values = (2**63 - 1, -0.1, "été", b"\x00\xff", None)
    rows = await konto.read("SELECT ?, ?, ?, ?, ?", values)
    assert rows == [values]


@pytest.mark.parametrize("token", ["wrong-token", None])
async def test_a_refused_token_names_the_url_and_never_the_token(
    served: Served, token: str | None
) -> None:
    db = served.client(token)
    try:
        with capture_logs() as logs, pytest.raises(KontoUnavailable) as failure:
            await lite_schema.load(db)
        message = str(failure.value)
        assert f"libSQL server {served.url} refused kontod's token (HTTP 401)" in message
        assert "KONTOD_KONTO_AUTH_TOKEN" in message
        if token is not None:
            assert token not in message and token not in str(logs)
        with pytest.raises(KontoUnavailable, match="refused kontod's token"):
            await db.check()
    finally:
        await db.close()
    assert served.sandbox.pipelines == 2  # a refusal is not retried


async def test_check_names_a_server_that_is_not_a_libsql_server(bank: Bank) -> None:
    db = LibsqlKonto(bank.url, None, 1)  # any HTTP server that is not a libSQL server
    try:
        with pytest.raises(KontoUnavailable, match=r"does not speak Hrana 3 over HTTP \(GET /v3"):
            await db.check()
    finally:
        await db.close()


async def test_a_stream_goes_on_where_the_server_says(served: Served, konto: LibsqlKonto) -> None:
    """A server may name another URL for a stream's next requests (``base_url``)."""
    await konto.advance_fence(Fence(JOB, 1))
    port = served.url.rpartition(":")[2]
    served.sandbox.base_url = f"http://localhost:{port}"
    await konto.write([INSERT], Fence(JOB, 1))
    assert served.sandbox.continued_at == [f"localhost:{port}"]
    assert users(served.path) == ["a@x"]


async def test_a_503_and_a_dropped_connection_are_retried(
    served: Served, konto: LibsqlKonto
) -> None:
    served.sandbox.faults = [Fault("status", 503), Fault("drop")]
    with capture_logs() as logs:
        assert await konto.read("SELECT 1") == [(1,)]
    assert served.sandbox.pipelines == 3
    assert [e["event"] for e in logs] == ["konto.libsql.retry"] * 2
    assert SANDBOX_TOKEN not in str(logs)
    # A fenced write's first request too, and the transaction is made once.
    await konto.advance_fence(Fence(JOB, 1))
    served.sandbox.faults = [Fault("drop"), Fault("status", 502)]
    await konto.write([INSERT], Fence(JOB, 1))
    assert users(served.path) == ["a@x"]


async def test_a_client_error_is_not_retried(served: Served, konto: LibsqlKonto) -> None:
    served.sandbox.faults = [Fault("status", 400)]
    with pytest.raises(KontoError, match=r"refused a request \(HTTP 400"):
        await konto.read("SELECT 1")
    assert served.sandbox.pipelines == 1


async def test_a_statement_error_carries_the_servers_code(konto: LibsqlKonto) -> None:
    with pytest.raises(KontoError, match=r"no such table: nope \(SQLITE_UNKNOWN\)"):
        await konto.read("SELECT * FROM nope")


@pytest.mark.parametrize(
    "fault",
    [Fault("drop", on_baton=True), Fault("status", 502, on_baton=True)],
    ids=["drop", "502"],
)
async def test_a_commit_whose_fate_is_unknown_is_not_retried(
    served: Served, konto: LibsqlKonto, fault: Fault
) -> None:
    await konto.advance_fence(Fence(JOB, 1))
    served.sandbox.faults = [fault]
    with pytest.raises(KontoUnavailable, match="whether the transaction was committed is unknown"):
        await konto.write([INSERT], Fence(JOB, 1))
    # Here the commit never reached the server: the stream was rolled back and closed.
    assert users(served.path) == []
    assert served.sandbox.open_streams == 0


async def test_a_503_to_the_commit_is_retried_and_writes_once(
    served: Served, konto: LibsqlKonto
) -> None:
    await konto.advance_fence(Fence(JOB, 1))
    served.sandbox.faults = [Fault("status", 503, on_baton=True)]
    await konto.write([INSERT], Fence(JOB, 1))
    assert users(served.path) == ["a@x"]
    assert served.sandbox.open_streams == 0


async def test_an_unreachable_server_fails_after_the_busy_timeout(tmp_path: Path) -> None:
    db = LibsqlKonto("http://127.0.0.1:9", SANDBOX_TOKEN, 0.3)
    started = time.monotonic()
    try:
        with pytest.raises(
            KontoUnavailable, match=r"http://127\.0\.0\.1:9: read failed for 0\.3 s"
        ):
            await db.read("SELECT 1")
    finally:
        await db.close()
    assert 0.3 <= time.monotonic() - started < 3


async def test_a_writer_holding_the_file_is_waited_for(served: Served, konto: LibsqlKonto) -> None:
    release = _hold_write_lock(served.path, seconds=1.5)
    with capture_logs() as logs:
        await konto.write([INSERT], None)
    release.join()
    assert users(served.path) == ["a@x"]
    assert any(e["event"] == "konto.libsql.retry" and "SQLITE_BUSY" in e["reason"] for e in logs)


async def test_a_writer_holding_the_file_too_long_is_konto_busy(served: Served) -> None:
    db = served.client(busy_timeout=0.5)
    release = _hold_write_lock(served.path, seconds=2.5)
    try:
        with pytest.raises(KontoBusy, match=r"write failed for 0\.5 s"):
            await db.write([INSERT], None)
    finally:
        await db.close()
        release.join()
    assert users(served.path) == []


async def test_a_frozen_run_finds_its_transaction_gone_and_writes_nothing(
    served: Served, konto: LibsqlKonto
) -> None:
    """Run 7 takes the lock and reads its fence, then freezes for longer than the server's
    stream expiry (its next request arrives 1.5 s late; expiry 0.5 s). Meanwhile run 8 takes
    the job over. When run 7 goes on, its transaction was rolled back; its retry finds the
    fence moved on, and it writes nothing."""
    await konto.advance_fence(Fence(JOB, 7))
    served.sandbox.faults = [Fault("stall", seconds=1.5, on_baton=True)]
    frozen = asyncio.create_task(konto.write([INSERT], Fence(JOB, 7)))
    while served.sandbox.faults:  # run 7's second request has arrived, and waits
        await asyncio.sleep(0.01)
    newer = served.client()
    try:
        await newer.advance_fence(Fence(JOB, 8))  # waits for the expiry to free the lock
        with pytest.raises(Fenced, match="holds run 8, not run 7"):
            await frozen
        await newer.write([Statement("INSERT INTO users (email) VALUES ('b@x')")], Fence(JOB, 8))
    finally:
        await newer.close()
    assert users(served.path) == ["b@x"]


async def test_a_frozen_run_that_was_not_taken_over_writes_once(
    served: Served, konto: LibsqlKonto
) -> None:
    await konto.advance_fence(Fence(JOB, 7))
    served.sandbox.faults = [Fault("stall", seconds=1.0, on_baton=True)]
    await konto.write([INSERT], Fence(JOB, 7))
    assert users(served.path) == ["a@x"]


def _hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Another process's writer (here a thread with its own connection) holding the file's
    write lock for ``seconds``, from before this returns."""
    locked = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    locked.wait()
    return thread
