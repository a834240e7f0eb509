"""The Hrana sandbox speaks Hrana 3 over HTTP as a libSQL server does, checked with raw HTTP:
typed values, single-use batons, errors inside a 200, a 401 body, expiry that rolls back, batch
conditions, and one writer at a time."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kontod.demo.hrana_sandbox import HranaSandbox

TOKEN = "hrana-test-token"  # a made-up token, not a secret

Json = dict[str, Any]


@dataclass
class Server:
    sandbox: HranaSandbox
    url: str
    path: Path
    http: aiohttp.ClientSession

    async def post(self, body: Json, token: str | None = TOKEN) -> tuple[int, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        async with self.http.post(f"{self.url}/v3/pipeline", json=body, headers=headers) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()

    async def pipeline(self, baton: str | None, *requests: Json) -> tuple[str | None, list[Json]]:
        status, body = await self.post({"baton": baton, "requests": list(requests)})
        assert status == 200, body
        return body["baton"], body["results"]


@pytest.fixture
async def server(tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[Server]:
    path = tmp_path / "konto.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, i INTEGER, f REAL, s TEXT, b BLOB)")
    conn.close()
    sandbox = HranaSandbox(path, TOKEN, expiry=0.5, txn_timeout=0.5)
    async with sandbox.serve() as url:
        yield Server(sandbox, url, path, http)


def execute(sql: str, *args: Json) -> Json:
    return {"type": "execute", "stmt": {"sql": sql, "args": list(args)}}


def integer(n: int) -> Json:
    return {"type": "integer", "value": str(n)}


def rows_in(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT i FROM t ORDER BY i").fetchall()
    conn.close()
    return rows


async def test_version_3_is_announced(server: Server) -> None:
    async with server.http.get(f"{server.url}/v3") as answer:
        assert answer.status == 200
    async with server.http.get(f"{server.url}/v4") as answer:
        assert answer.status == 404


async def test_values_travel_typed_and_results_carry_counts(server: Server) -> None:
    values = [
        integer(2**62 + 1),
        {"type": "float", "value": 0.1},
        {"type": "text", "value": "été"},
        {"type": "blob", "base64": "AAEC"},
    ]
    baton, results = await server.pipeline(
        None,
        execute("INSERT INTO t (i, f, s, b) VALUES (?, ?, ?, ?)", *values),
        execute("SELECT i, f, s, b, NULL AS n FROM t"),
        {"type": "close"},
    )
    assert baton is None
    inserted = results[0]["response"]["result"]
    assert inserted["affected_row_count"] == 1 and inserted["last_insert_rowid"] == "1"
    selected = results[1]["response"]["result"]
    assert [c["name"] for c in selected["cols"]] == ["i", "f", "s", "b", "n"]
    assert selected["rows"] == [[*values, {"type": "null"}]]


async def test_a_baton_serves_once(server: Server) -> None:
    first, _ = await server.pipeline(None, execute("SELECT 1"))
    assert first is not None
    second, _ = await server.pipeline(first, execute("SELECT 2"))
    assert second not in (None, first)
    status, body = await server.post({"baton": first, "requests": [execute("SELECT 3")]})
    assert (status, body) == (400, "Received a baton that has already been used")
    status, body = await server.post({"baton": "bm90IGEgYmF0b24", "requests": []})
    assert (status, body) == (400, "Received an invalid baton")


async def test_a_closed_stream_takes_no_more_requests(server: Server) -> None:
    status, body = await server.post(
        {"baton": None, "requests": [{"type": "close"}, execute("SELECT 1")]}
    )
    assert (status, body) == (400, "Stream for this baton was closed")
    assert server.sandbox.open_streams == 0


async def test_a_failed_statement_is_an_error_result_and_the_rest_still_runs(
    server: Server,
) -> None:
    _, results = await server.pipeline(
        None,
        execute("SELECT * FROM no_such_table"),
        execute("INSERT INTO t (id, i) VALUES (1, 1)"),
        execute("INSERT INTO t (id, i) VALUES (1, 2)"),
        {"type": "close"},
    )
    assert results[0] == {
        "type": "error",
        "error": {
            "message": "SQLite error: no such table: no_such_table",
            "code": "SQLITE_UNKNOWN",
        },
    }
    assert results[1]["type"] == "ok"
    assert results[2]["error"]["code"] == "SQLITE_CONSTRAINT"
    assert rows_in(server.path) == [(1,)]


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "The `Authorization` HTTP header is required but was not specified"),
        ("wrong", "The JWT is invalid"),
    ],
)
async def test_a_missing_or_wrong_token_is_a_401_with_a_json_body(
    server: Server, token: str | None, message: str
) -> None:
    status, body = await server.post({"baton": None, "requests": []}, token=token)
    assert (status, body) == (401, {"error": f"Unauthorized: `{message}`"})


async def test_an_idle_stream_expires_and_its_transaction_is_rolled_back(server: Server) -> None:
    baton, _ = await server.pipeline(
        None, execute("BEGIN IMMEDIATE"), execute("INSERT INTO t (i) VALUES (1)")
    )
    await asyncio.sleep(0.8)  # expiry is 0.5 s
    status, body = await server.post({"baton": baton, "requests": [execute("COMMIT")]})
    assert status == 500
    assert body == {"message": "The stream has expired due to inactivity", "code": "STREAM_EXPIRED"}
    assert rows_in(server.path) == []
    # The lock went with it: another stream writes at once.
    _, results = await server.pipeline(None, execute("INSERT INTO t (i) VALUES (2)"))
    assert results[0]["type"] == "ok"


async def test_batch_conditions_decide_which_steps_run(server: Server) -> None:
    steps: list[Json] = [
        {"stmt": {"sql": "BEGIN"}},
        {"condition": {"type": "ok", "step": 0}, "stmt": {"sql": "INSERT INTO t (id) VALUES (1)"}},
        {"condition": {"type": "ok", "step": 1}, "stmt": {"sql": "INSERT INTO t (id) VALUES (1)"}},
        {
            "condition": {"type": "and", "conds": [{"type": "ok", "step": 2}]},
            "stmt": {"sql": "COMMIT"},
        },
        {
            "condition": {
                "type": "or",
                "conds": [
                    {"type": "error", "step": 2},
                    {"type": "not", "cond": {"type": "ok", "step": 3}},
                ],
            },
            "stmt": {"sql": "ROLLBACK"},
        },
        {"condition": {"type": "is_autocommit"}, "stmt": {"sql": "SELECT count(*) FROM t"}},
    ]
    _, results = await server.pipeline(None, {"type": "batch", "batch": {"steps": steps}})
    outcome = results[0]["response"]["result"]
    ran = [r is not None for r in outcome["step_results"]]
    failed = [e is not None for e in outcome["step_errors"]]
    assert ran == [True, True, False, False, True, True]
    assert failed == [False, False, True, False, False, False]
    assert outcome["step_results"][5]["rows"] == [[integer(0)]]


async def test_sequence_stored_sql_and_autocommit(server: Server) -> None:
    _, results = await server.pipeline(
        None,
        {
            "type": "sequence",
            "sql": "BEGIN; INSERT INTO t (i) VALUES (5); INSERT INTO t (s) VALUES ('a;b');",
        },
        {"type": "get_autocommit"},
        {"type": "store_sql", "sql_id": 1, "sql": "SELECT count(*) FROM t"},
        {"type": "execute", "stmt": {"sql_id": 1}},
        execute("COMMIT"),
        {"type": "get_autocommit"},
    )
    assert [r["type"] for r in results] == ["ok"] * 6
    assert results[1]["response"] == {"type": "get_autocommit", "is_autocommit": False}
    assert results[3]["response"]["result"]["rows"] == [[integer(2)]]
    assert results[5]["response"]["is_autocommit"] is True


async def test_a_waiting_writer_takes_the_lock_from_a_transaction_past_its_timeout(
    server: Server,
) -> None:
    server.sandbox.expiry = 10.0  # sqld's: the holder's stream outlives its transaction
    holder, _ = await server.pipeline(
        None, execute("BEGIN IMMEDIATE"), execute("INSERT INTO t (i) VALUES (1)")
    )
    started = time.monotonic()
    _, results = await server.pipeline(
        None, execute("BEGIN IMMEDIATE"), execute("INSERT INTO t (i) VALUES (2)"), execute("COMMIT")
    )
    assert [r["type"] for r in results] == ["ok"] * 3
    assert 0.4 <= time.monotonic() - started < 2.0  # the transaction timeout is 0.5 s
    _, results = await server.pipeline(holder, execute("COMMIT"))
    assert results[0]["error"] == {
        "message": "Transaction timed out",
        "code": "TRANSACTION_TIMEOUT",
    }
    assert rows_in(server.path) == [(2,)]


async def test_a_lock_held_outside_the_server_is_sqlite_busy(server: Server) -> None:
    other = sqlite3.connect(server.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        _, results = await server.pipeline(None, execute("BEGIN IMMEDIATE"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert results[0]["error"]["code"] == "SQLITE_BUSY"


async def test_a_result_past_the_response_limit_is_refused(server: Server) -> None:
    server.sandbox.max_response_size = 100
    _, results = await server.pipeline(
        None,
        execute("SELECT 1"),
        execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 50) SELECT i FROM n"
        ),
    )
    assert results[0]["type"] == "ok"
    assert results[1]["error"] == {"message": "Response is too large", "code": "RESPONSE_TOO_LARGE"}


async def test_it_runs_alone_as_a_program(server: Server) -> None:
    """``python -m kontod.demo.hrana_sandbox`` prints the URL to use, and serves it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod.demo.hrana_sandbox",
        "--db",
        str(server.path),
        "--token",
        TOKEN,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        url = line.strip().rpartition("KONTOD_KONTO_URL=")[2]
        assert url.startswith("http://127.0.0.1:"), line
        alone = Server(server.sandbox, url, server.path, server.http)
        _, results = await alone.pipeline(None, execute("SELECT count(*) FROM t"))
        assert results[0]["response"]["result"]["rows"] == [[integer(0)]]
    finally:
        process.terminate()
        await process.wait()
