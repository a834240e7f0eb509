"""A sandbox libSQL server: Hrana 3 over HTTP (JSON) in front of a local SQLite file.

kontod reaches a libSQL server (Turso, or a self-hosted ``sqld``) with Hrana over HTTP. There is
no libSQL server package to test against, so this serves the part of the protocol kontod and
other clients use, with the behaviour of ``sqld`` where the specification leaves it open:

- ``GET /v3`` answers 200: version 3 with JSON is supported.
- ``POST /v3/pipeline`` takes ``{"baton", "requests"}`` and answers ``{"baton", "base_url",
  "results"}`` (``base_url``: None, or ``HranaSandbox.base_url`` when a test sets one). A
  null baton opens a stream: one SQLite connection of its own. Requests:
  ``execute``, ``batch`` (conditions ``ok``, ``error``, ``not``, ``and``, ``or``,
  ``is_autocommit``), ``sequence``, ``store_sql``, ``close_sql``, ``get_autocommit`` and
  ``close``; ``describe`` answers an error (not served here). Every request of a pipeline is
  run, and a failed one is an ``{"type": "error"}`` result inside the 200 answer.
- Batons are signed and single-use: each answer gives the next one. An unknown, forged or
  reused baton, or a request after ``close``, is an HTTP 400 with a plain-text message, as
  ``sqld`` answers protocol errors.
- A stream idle for ``expiry`` seconds (``sqld``: 10 s) is expired: its connection is closed,
  which rolls its open transaction back, and its baton then gets an HTTP 500 whose JSON body
  is ``{"message": ..., "code": "STREAM_EXPIRED"}``.
- One writer at a time, as in ``sqld``: a stream that needs the write lock while another
  stream holds a transaction waits; once that transaction is ``txn_timeout`` seconds old
  (``sqld``: 5 s) and its stream is idle, it is rolled back for the waiter, and the next
  statements of that stream fail with ``TRANSACTION_TIMEOUT``. A lock held by a writer
  outside the sandbox (another process on the file) is waited for up to ``txn_timeout``,
  then the statement fails with ``SQLITE_BUSY``.
- With a token, every pipeline needs ``Authorization: Bearer <token>``; otherwise 401 with a
  JSON body ``{"error": ...}``.
- A statement whose rows make more than ``max_response_size`` bytes of JSON values (``sqld``:
  10 MB) fails with ``RESPONSE_TOO_LARGE``: a client reads a large table in pages.
- SQLite errors carry ``sqld``'s codes (``SQLITE_CONSTRAINT``, ``SQLITE_BUSY``...; a plain
  ``SQLITE_ERROR``, such as "no such table", is ``SQLITE_UNKNOWN``) and messages
  ``SQLite error: ...``.

Tests inject faults (an HTTP status, a dropped connection, a request that arrives late) into
the next pipelines with ``HranaSandbox.faults``. Run it alone with
``python -m kontod.demo.hrana_sandbox --db konto.db --token t``: it prints the URL to give
kontod (``KONTOD_KONTO_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import sqlite3
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import web

from kontod.demo.serving import listening

# sqld's idle-stream expiry and write-transaction timeout (libsql-server/src/hrana/http/
# stream.rs ``EXPIRATION``, libsql-server/src/connection/mod.rs ``TXN_TIMEOUT``).
SQLD_EXPIRY_S = 10.0
SQLD_TXN_TIMEOUT_S = 5.0
# sqld's default limit on one statement's result, counted as the JSON size of its values
# (``SQLD_MAX_RESPONSE_SIZE``, libsql-server/src/main.rs).
SQLD_MAX_RESPONSE_SIZE = 10_000_000
# How long one SQLite call waits for a lock before the sandbox looks again (and maybe steals).
_LOCK_POLL_S = 0.02

T = TypeVar("T")
Json = dict[str, Any]


class ProtocolError(Exception):
    """The client broke the protocol: an HTTP 400 with this plain-text message."""


class StreamExpired(Exception):
    """The baton's stream expired while idle: an HTTP 500 with a JSON error body."""


class StepError(Exception):
    """One request or statement failed: an error result with ``code`` in a 200 answer."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code

    def body(self) -> Json:
        return {"message": str(self), "code": self.code}


@dataclass
class Fault:
    """What the sandbox does to one ``POST /v3/pipeline``: answer ``status`` with a JSON error
    body (``"status"``), drop the connection without an answer (``"drop"``), or wait
    ``seconds`` before serving it, as if the client had sent it that late (``"stall"``). With
    ``on_baton``, the fault waits for the next pipeline that continues a stream."""

    kind: Literal["status", "drop", "stall"] = "status"
    status: int = 503
    seconds: float = 0.0
    on_baton: bool = False


@dataclass
class _Stream:
    """A Hrana stream: its own SQLite connection, the sequence its next baton must carry."""

    id: int
    conn: sqlite3.Connection
    seq: int
    sqls: dict[int, str] = field(default_factory=dict)
    busy: bool = False  # a pipeline is using it
    txn_since: float | None = None  # when its open transaction began
    forced_rollback: bool = False  # rolled back for another writer: fail its next program
    expire: asyncio.TimerHandle | None = None


class HranaSandbox:
    """A Hrana-over-HTTP server over the SQLite file at ``path``."""

    def __init__(
        self,
        path: Path,
        token: str | None = None,
        *,
        expiry: float = SQLD_EXPIRY_S,
        txn_timeout: float = SQLD_TXN_TIMEOUT_S,
        max_response_size: int = SQLD_MAX_RESPONSE_SIZE,
    ) -> None:
        self.path = path
        self.token = token
        self.expiry = expiry
        self.txn_timeout = txn_timeout
        self.max_response_size = max_response_size
        # The ``base_url`` answers name (None: clients stay where they are), and the host each
        # pipeline continuing a stream was sent to.
        self.base_url: str | None = None
        self.continued_at: list[str] = []
        self.faults: list[Fault] = []
        self.pipelines = 0  # pipeline requests answered (faults included)
        self._key = secrets.token_bytes(32)
        self._streams: dict[int, _Stream] = {}
        self._expired: set[int] = set()
        self._work: set[asyncio.Future[web.Response]] = set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v3", self._version)
        app.router.add_post("/v3/pipeline", self._pipeline)
        return app

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Listen on ``host:port`` (0: a free port) and yield the server's base URL."""
        try:
            async with listening(self.app(), host, port) as root:
                yield root
        finally:
            await asyncio.gather(*self._work, return_exceptions=True)
            for stream_id in list(self._streams):
                self._drop(stream_id)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def _version(self, request: web.Request) -> web.Response:
        return web.Response(text="Hello, this is HTTP API v3 (Hrana over HTTP)")

    async def _pipeline(self, request: web.Request) -> web.StreamResponse:
        self.pipelines += 1
        raw = await request.read()
        fault = self._fault_for(raw)
        if fault is not None and fault.kind == "stall":
            await asyncio.sleep(fault.seconds)
        elif fault is not None and fault.kind == "drop":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never reaches the client
        elif fault is not None:
            return web.json_response(
                {"error": f"sandbox fault: HTTP {fault.status}"}, status=fault.status
            )
        denied = self._authorize(request.headers.get("Authorization"))
        if denied is not None:
            return web.json_response({"error": f"Unauthorized: `{denied}`"}, status=401)
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
                raise ProtocolError("Cannot deserialize client message from JSON: no requests")
            stream = self._acquire(body.get("baton"))
        except ValueError as exc:
            return _text(400, f"Cannot deserialize client message from JSON: {exc}")
        except ProtocolError as exc:
            return _text(400, str(exc))
        except StreamExpired as exc:
            return web.json_response({"message": str(exc), "code": "STREAM_EXPIRED"}, status=500)
        if body.get("baton") is not None:
            self.continued_at.append(request.host)
        # A client that goes away mid-pipeline does not stop it (as with sqld): the statements
        # end, the stream is released with a baton nobody holds, and expires.
        work = asyncio.ensure_future(self._run(stream, body["requests"]))
        self._work.add(work)
        work.add_done_callback(self._work.discard)
        return await asyncio.shield(work)

    async def _run(self, stream: _Stream, requests: list[Any]) -> web.Response:
        try:
            results = [await self._request(stream, r) for r in requests]
        except ProtocolError as exc:
            self._drop(stream.id)
            return _text(400, str(exc))
        except BaseException:
            self._drop(stream.id)
            raise
        return web.json_response(
            {"baton": self._release(stream), "base_url": self.base_url, "results": results}
        )

    def _fault_for(self, raw: bytes) -> Fault | None:
        """The first pending fault that applies to this pipeline (taken off the list)."""
        try:
            continues = json.loads(raw).get("baton") is not None
        except (ValueError, AttributeError):
            continues = False
        for fault in self.faults:
            if continues or not fault.on_baton:
                self.faults.remove(fault)
                return fault
        return None

    def _authorize(self, header: str | None) -> str | None:
        """Why the request is refused (sqld's wording), or None when it may go on."""
        if self.token is None:
            return None
        if header is None:
            return "The `Authorization` HTTP header is required but was not specified"
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return "The authentication scheme in the `Authorization` HTTP header is not supported"
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return "The JWT is invalid"
        return None

    # --- streams and batons -------------------------------------------------------------------

    def _acquire(self, baton: object) -> _Stream:
        if baton is None:
            conn = sqlite3.connect(
                self.path, timeout=_LOCK_POLL_S, isolation_level=None, check_same_thread=False
            )
            stream = _Stream(secrets.randbits(63), conn, secrets.randbits(63), busy=True)
            self._streams[stream.id] = stream
            return stream
        if not isinstance(baton, str):
            raise ProtocolError("Received an invalid baton")
        stream_id, seq = self._decode(baton)
        if stream_id in self._expired:
            raise StreamExpired("The stream has expired due to inactivity")
        found = self._streams.get(stream_id)
        if found is None:
            raise ProtocolError("Received an invalid baton")
        if found.busy or found.seq != seq:
            raise ProtocolError("Received a baton that has already been used")
        found.busy = True
        found.seq += 1
        if found.expire is not None:
            found.expire.cancel()
        return found

    def _release(self, stream: _Stream) -> str | None:
        """The stream's next baton (None when it was closed); its idle clock starts."""
        if stream.id not in self._streams:
            return None
        stream.busy = False
        stream.expire = asyncio.get_running_loop().call_later(self.expiry, self._expire, stream.id)
        return self._encode(stream.id, stream.seq)

    def _expire(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.busy:
            self._drop(stream_id)
            self._expired.add(stream_id)

    def _drop(self, stream_id: int) -> None:
        """Close the stream's connection: SQLite rolls back a transaction left open."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            if stream.expire is not None:
                stream.expire.cancel()
            stream.conn.close()

    def _encode(self, stream_id: int, seq: int) -> str:
        payload = struct.pack(">QQ", stream_id, seq)
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(payload + mac).decode().rstrip("=")

    def _decode(self, baton: str) -> tuple[int, int]:
        try:
            data = base64.urlsafe_b64decode(baton + "=" * (-len(baton) % 4))
        except ValueError:
            raise ProtocolError("Received an invalid baton") from None
        payload, mac = data[:16], data[16:]
        good = hmac.new(self._key, payload, hashlib.sha256).digest()
        if len(data) != 48 or not hmac.compare_digest(mac, good):
            raise ProtocolError("Received an invalid baton")
        stream_id, seq = struct.unpack(">QQ", payload)
        return int(stream_id), int(seq)

    # --- requests -------------------------------------------------------------------------------

    async def _request(self, stream: _Stream, request: object) -> Json:
        """One stream request's result: ``ok`` with its response, or ``error``."""
        if not isinstance(request, dict):
            raise ProtocolError("Cannot deserialize client message from JSON: a request")
        kind = request.get("type")
        if stream.id not in self._streams:
            raise ProtocolError("Stream for this baton was closed")
        try:
            response = await self._serve(stream, kind, request)
        except StepError as exc:
            return {"type": "error", "error": exc.body()}
        return {"type": "ok", "response": {"type": kind, **response}}

    async def _serve(self, stream: _Stream, kind: object, request: Json) -> Json:
        if kind == "close":
            self._drop(stream.id)
            return {}
        if kind == "execute":
            self._check_forced_rollback(stream)
            return {"result": await self._execute(stream, request.get("stmt"))}
        if kind == "batch":
            batch = request.get("batch")
            if not isinstance(batch, dict) or not isinstance(batch.get("steps"), list):
                raise ProtocolError("Cannot deserialize client message from JSON: a batch")
            return {"result": await self._batch(stream, batch["steps"])}
        if kind == "sequence":
            self._check_forced_rollback(stream)
            await self._sequence(stream, self._sql_of(stream, request))
            return {}
        if kind == "store_sql":
            sql_id, sql = request.get("sql_id"), request.get("sql")
            if not isinstance(sql_id, int) or not isinstance(sql, str):
                raise ProtocolError("Cannot deserialize client message from JSON: store_sql")
            if sql_id in stream.sqls:
                raise ProtocolError(f"SQL text {sql_id} already exists")
            stream.sqls[sql_id] = sql
            return {}
        if kind == "close_sql":
            sql_id = request.get("sql_id")
            if isinstance(sql_id, int):
                stream.sqls.pop(sql_id, None)
            return {}
        if kind == "get_autocommit":
            return {"is_autocommit": not stream.conn.in_transaction}
        if kind == "describe":
            raise StepError("The sandbox does not serve `describe`", "NOT_SUPPORTED")
        raise ProtocolError(f"Cannot deserialize client message from JSON: request {kind!r}")

    def _check_forced_rollback(self, stream: _Stream) -> None:
        if stream.forced_rollback:
            stream.forced_rollback = False
            raise StepError("Transaction timed out", "TRANSACTION_TIMEOUT")

    def _sql_of(self, stream: _Stream, holder: Json) -> str:
        sql, sql_id = holder.get("sql"), holder.get("sql_id")
        if (sql is None) == (sql_id is None):
            raise ProtocolError("Either `sql` or `sql_id` are required, but not both")
        if sql_id is not None:
            if sql_id not in stream.sqls:
                raise ProtocolError(f"SQL text {sql_id} not found")
            return stream.sqls[sql_id]
        if not isinstance(sql, str):
            raise ProtocolError("Cannot deserialize client message from JSON: sql")
        return sql

    async def _execute(self, stream: _Stream, stmt: object) -> Json:
        if not isinstance(stmt, dict):
            raise ProtocolError("Cannot deserialize client message from JSON: stmt")
        sql = self._sql_of(stream, stmt)
        if stmt.get("named_args"):
            raise StepError("The sandbox binds positional arguments only", "ARGS_INVALID")
        args = tuple(decode_value(v) for v in stmt.get("args") or ())
        want_rows = stmt.get("want_rows", True) is not False

        def run() -> Json:
            # sqld counts the rows a writing statement changed (sqlite3_changes), whatever its
            # form; the cursor's rowcount stays -1 for one that starts with WITH.
            before = stream.conn.total_changes
            cursor = stream.conn.execute(sql, args)
            fetched = cursor.fetchall()
            changed = stream.conn.total_changes - before
            rows = [[encode_value(v) for v in r] for r in fetched] if want_rows else []
            if _values_size(rows) > self.max_response_size:
                raise StepError("Response is too large", "RESPONSE_TOO_LARGE")
            return {
                "cols": [{"name": d[0], "decltype": None} for d in cursor.description or ()],
                "rows": rows,
                "affected_row_count": changed,
                "last_insert_rowid": None if cursor.lastrowid is None else str(cursor.lastrowid),
            }

        return await self._locked(stream, run)

    async def _batch(self, stream: _Stream, steps: list[Any]) -> Json:
        results: list[Json | None] = [None] * len(steps)
        errors: list[Json | None] = [None] * len(steps)
        timed_out = stream.forced_rollback
        stream.forced_rollback = False
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                raise ProtocolError("Cannot deserialize client message from JSON: a step")
            condition = step.get("condition")
            if condition is not None and not self._holds(stream, condition, i, results, errors):
                continue
            if timed_out:
                errors[i] = StepError("Transaction timed out", "TRANSACTION_TIMEOUT").body()
                continue
            try:
                results[i] = await self._execute(stream, step.get("stmt"))
            except StepError as exc:
                errors[i] = exc.body()
        return {"step_results": results, "step_errors": errors}

    def _holds(
        self,
        stream: _Stream,
        cond: object,
        at: int,
        results: Sequence[Json | None],
        errors: Sequence[Json | None],
    ) -> bool:
        if not isinstance(cond, dict):
            raise ProtocolError("BatchCond type not recognized")
        kind = cond.get("type")
        if kind in ("ok", "error"):
            step = cond.get("step")
            if not isinstance(step, int) or not 0 <= step < at:
                raise ProtocolError("Invalid reference to step in a batch condition")
            return (results if kind == "ok" else errors)[step] is not None
        if kind == "not":
            return not self._holds(stream, cond.get("cond"), at, results, errors)
        if kind in ("and", "or"):
            parts = [self._holds(stream, c, at, results, errors) for c in cond.get("conds", [])]
            return all(parts) if kind == "and" else any(parts)
        if kind == "is_autocommit":
            return not stream.conn.in_transaction
        raise ProtocolError("BatchCond type not recognized")

    async def _sequence(self, stream: _Stream, sql: str) -> None:
        statement = ""
        for piece in sql.split(";"):
            statement += piece + ";"
            if sqlite3.complete_statement(statement):
                text = statement
                statement = ""
                if text.strip(" \t\r\n;"):
                    await self._locked(stream, partial(_run_script_statement, stream.conn, text))

    async def _locked(self, stream: _Stream, run: Callable[[], T]) -> T:
        """Run one statement on the stream's connection in a thread; while another holds the
        write lock, wait (and take it from a stream idle past the transaction timeout)."""
        waited_since = time.monotonic()
        while True:
            try:
                return await asyncio.to_thread(run)
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise _step_error(exc) from None
                if not self._steal_for(stream) and (
                    time.monotonic() - waited_since >= self.txn_timeout
                ):
                    raise _step_error(exc) from None
            finally:
                if not stream.conn.in_transaction:
                    stream.txn_since = None
                elif stream.txn_since is None:
                    stream.txn_since = time.monotonic()
            await asyncio.sleep(_LOCK_POLL_S)

    def _steal_for(self, waiter: _Stream) -> bool:
        """Whether another stream holds a transaction (then the waiter keeps waiting); one idle
        past the transaction timeout is rolled back, as sqld does for a waiting writer."""
        holders = [s for s in self._streams.values() if s is not waiter and s.txn_since is not None]
        for holder in holders:
            assert holder.txn_since is not None
            if not holder.busy and time.monotonic() - holder.txn_since >= self.txn_timeout:
                holder.conn.rollback()
                holder.txn_since = None
                holder.forced_rollback = True
        return bool(holders)


def _values_size(rows: list[list[Json]]) -> int:
    """The size of the rows' values in compact JSON, as sqld counts it: one encoding of the
    whole, less its brackets and commas (faster than encoding each value)."""
    if not rows:
        return 0
    text = json.dumps(rows, separators=(",", ":"), ensure_ascii=False)
    per_row = len(rows[0])
    return len(text) - 2 - (len(rows) - 1) - len(rows) * (2 + max(per_row - 1, 0))


def _run_script_statement(conn: sqlite3.Connection, sql: str) -> None:
    conn.execute(sql).fetchall()


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


def _is_busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED")


def _step_error(exc: sqlite3.Error) -> StepError:
    """A SQLite error as sqld reports it: its primary code's name and the message."""
    name = getattr(exc, "sqlite_errorname", None)
    if name is None:
        # The sqlite3 module's own refusals (two statements in one text, argument count).
        text = str(exc)
        code = "SQL_MANY_STATEMENTS" if "one statement" in text else "ARGS_INVALID"
        return StepError(text, code)
    primary = "_".join(str(name).split("_")[:2])
    code = "SQLITE_UNKNOWN" if primary == "SQLITE_ERROR" else primary
    return StepError(f"SQLite error: {exc}", code)


def encode_value(value: object) -> Json:
    """A SQLite value as a Hrana value."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, int):
        return {"type": "integer", "value": str(value)}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "text", "value": value}
    if isinstance(value, bytes):
        return {"type": "blob", "base64": base64.b64encode(value).decode().rstrip("=")}
    raise TypeError(f"not a SQLite value: {type(value).__name__}")


def decode_value(value: object) -> int | float | str | bytes | None:
    """A Hrana value as a SQLite value (a malformed one is a protocol error)."""
    if not isinstance(value, dict):
        raise ProtocolError("Cannot deserialize client message from JSON: a value")
    kind = value.get("type")
    try:
        if kind == "null":
            return None
        if kind == "integer":
            return int(str(value["value"]), 10)
        if kind == "float":
            return float(value["value"])
        if kind == "text":
            return str(value["value"])
        if kind == "blob":
            text = str(value["base64"]).rstrip("=")
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (KeyError, ValueError) as exc:
        raise ProtocolError(f"Cannot deserialize client message from JSON: {exc}") from None
    raise ProtocolError(f"Cannot deserialize client message from JSON: value type {kind!r}")


async def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kontod.demo.hrana_sandbox",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--db", required=True, type=Path, help="the SQLite file to serve")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free)")
    parser.add_argument("--token", default=None, help="the bearer token clients must send")
    parser.add_argument(
        "--expiry", type=float, default=SQLD_EXPIRY_S, help="idle seconds before a stream ends"
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--listen {args.listen!r}: expected host:port such as 127.0.0.1:8080")
    if not args.db.is_file():
        parser.error(f"--db {args.db}: no such file")
    sandbox = HranaSandbox(args.db, args.token, expiry=args.expiry)
    async with sandbox.serve(host, int(port)) as url:
        print(f"hrana sandbox listening; set KONTOD_KONTO_URL={url}", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    with suppress(KeyboardInterrupt):
        asyncio.run(_main())


if __name__ == "__main__":
    main()
