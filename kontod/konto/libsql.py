"""Konto's tables on a libSQL server (Turso, or a self-hosted ``sqld``): ``KontoSql`` spoken as
Hrana 3 over HTTP, with JSON bodies, on aiohttp.

Why this client. The libSQL packages on PyPI were weighed: ``libsql`` (formerly
``libsql-experimental``) is a synchronous DB-API binding over the Rust crate that blocks on its
own runtime while holding the GIL, so a network round trip would stall kontod's event loop (a
thread does not help), and it offers no request timeout or retry of its own; ``libsql-client``
is archived, reaches a server's HTTP side only through the old ``v1`` endpoints and refuses
interactive transactions there (they need its WebSocket transport); wrappers by third parties
are young single-author projects. Hrana over HTTP is a small, documented protocol (the
``docs/HRANA_3_SPEC.md`` of the libSQL repository), and aiohttp is already kontod's HTTP client,
so kontod speaks it itself: ``GET /v3`` tells that the server supports it, and every call is
``POST /v3/pipeline``.

How a write is made. An interactive transaction is a Hrana *stream*: one server connection,
tied together by the *baton* each answer returns for the next request. A fenced write needs the
fence's value before any step runs, and Hrana's batch conditions test only whether an earlier
step succeeded, not what it read (SQLite's ``RAISE()`` exists only inside triggers), so it takes
two requests on one stream:

1. ``PRAGMA foreign_keys = ON`` (the server leaves it off, as SQLite does; kontod's writes check
   the web app's declared keys on both engines), ``BEGIN IMMEDIATE`` and the fence read;
2. one ``batch``: the steps, each run only while the transaction is open and every step before
   it succeeded, ``COMMIT`` only when all did, ``ROLLBACK`` otherwise; then ``close``.

A write without a fence (creating kontod's tables, raising a fence) is the same batch in one
request. The write lock is held from the first request's answer to the second's arrival: one
network round trip.

Failures. Each request has a timeout. Retried, with growing pauses, until ``busy_timeout`` has
passed in all (then ``KontoBusy`` or ``KontoUnavailable``): a connection error or timeout, an
HTTP 5xx or 429, and the answers that mean another writer had the database (``SQLITE_BUSY``,
``SQLITE_LOCKED``, ``TRANSACTION_TIMEOUT``: the server rolled this transaction back for a
writer that waited, ``TRANSACTION_BUSY``) or that the stream expired (``STREAM_EXPIRED``); in
all of these nothing was committed, and the whole transaction starts over on a new stream.
One failure is not retried: the request holding ``COMMIT`` lost on the way (a lost connection,
a timeout, a 5xx other than 503 such as a proxy's 502 or 504), because the commit may have
happened (``KontoUnavailable`` says the outcome is unknown; the run fails, and its retry starts
from the data as it is). A 401 or 403 is ``KontoUnavailable`` naming the URL and the server's
message; any other 4xx, and a statement's error, is ``KontoError`` with the server's code and
message. The token is sent in the ``Authorization`` header only: never logged, and removed
from any message that echoes it. One statement's result may not exceed the server's response
limit (``sqld``: 10 MB of JSON values, then ``RESPONSE_TOO_LARGE``): read large tables in pages.

The server ends an abandoned stream itself: ``sqld`` expires a stream idle for 10 s and rolls
its transaction back (``EXPIRATION`` in libsql-server/src/hrana/http/stream.rs), and rolls back
a transaction older than 5 s when another writer waits for the lock (``TXN_TIMEOUT`` in
libsql-server/src/connection/mod.rs). A kontod frozen between its two requests therefore holds
the lock no longer than that, and finds its transaction gone when it resumes.

One aiohttp session, made at the first call and closed by ``close()``, carries every request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import structlog

from kontod.config import KontoLocation
from kontod.konto.store import (
    READ_FENCE_SQL,
    Engine,
    Fence,
    KontoBusy,
    KontoError,
    KontoUnavailable,
    Result,
    Row,
    Statement,
    Value,
    check_fence,
    fence_steps,
)

log = structlog.get_logger("kontod.konto.libsql")

# Longest one HTTP request may take. sqld makes a writer wait up to 5 s for the lock, so a
# request must be allowed longer than that.
REQUEST_TIMEOUT_S = 15.0
# Pauses between attempts: doubling from the first, never longer than the last.
FIRST_PAUSE_S = 0.05
LONGEST_PAUSE_S = 1.0
# Error codes meaning another writer had the database, or the server ended the stream; in all
# of them nothing of the transaction was committed.
BUSY_CODES = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED", "TRANSACTION_TIMEOUT", "TRANSACTION_BUSY"})
GONE_CODES = frozenset({"STREAM_EXPIRED"})

Json = dict[str, Any]
T = TypeVar("T")


class _Transient(Exception):
    """A failure after which the whole call may start over: nothing was committed."""

    def __init__(self, reason: str, *, busy: bool) -> None:
        super().__init__(reason)
        self.busy = busy


class _Unknown(Exception):
    """The request holding ``COMMIT`` failed in a way that leaves the commit's fate unknown."""


@dataclass(frozen=True)
class _Stream:
    """An open Hrana stream: the baton of its next request, and where that request goes (the
    server may name another URL for it, ``base_url``, to keep the stream on one machine)."""

    baton: str
    url: str


class LibsqlKonto:
    """Konto's database on a libSQL server at ``url``, reached with Hrana 3 over HTTP."""

    def __init__(
        self,
        url: str,
        token: str | None,
        busy_timeout: float,
        *,
        request_timeout: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.url = url.rstrip("/")
        self.busy_timeout = busy_timeout
        self.request_timeout = request_timeout
        self._token = token or None
        self._session: aiohttp.ClientSession | None = None

    @property
    def engine(self) -> Engine:
        return "libsql"

    @property
    def location(self) -> KontoLocation:
        return KontoLocation("libsql", self.url)

    async def check(self) -> None:
        """Prove at start that the server speaks Hrana 3 over HTTP and takes kontod's token
        (``KontoUnavailable`` naming the URL when not)."""
        try:
            async with self._http().get(
                f"{self.url}/v3", headers=self._headers(), timeout=self._timeout()
            ) as answer:
                status = answer.status
                text = await answer.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KontoUnavailable(
                f"libSQL server {self.url} cannot be reached: {self._clean(exc)}"
            ) from exc
        if status in (401, 403):
            self._refuse(status, text, commits=False)
        if status != 200:
            raise KontoUnavailable(
                f"libSQL server {self.url} does not speak Hrana 3 over HTTP"
                f" (GET /v3 answered HTTP {status})"
            )
        await self.read("SELECT 1")

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        requests = [_execute(Statement(sql, params)), _CLOSE]

        async def attempt() -> list[Row]:
            results = await self._once(requests, commits=False)
            return _rows(_ok(results[0], self.url)["result"])

        return await self._retrying("read", attempt)

    async def write(self, steps: Sequence[Statement], fence: Fence | None) -> list[Result]:
        return await self._retrying("write", lambda: self._transaction(steps, fence))

    async def advance_fence(self, fence: Fence) -> None:
        results = await self.write(fence_steps(fence), None)
        check_fence(fence, results[-1].rows)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- one attempt -----------------------------------------------------------------------------

    async def _transaction(self, steps: Sequence[Statement], fence: Fence | None) -> list[Result]:
        """One attempt at the write transaction (``_Transient`` when it may start over)."""
        if fence is None:
            requests = [_FOREIGN_KEYS, _batch(steps, begin=True), _CLOSE]
            results = await self._once(requests, commits=True)
            _ok(results[0], self.url)
            return _batch_results(_ok(results[1], self.url)["result"], 1, len(steps), self.url)
        opening = [_FOREIGN_KEYS, _execute(Statement("BEGIN IMMEDIATE")), _fence_read(fence)]
        stream, results = await self._pipeline(None, opening, commits=False)
        committed = False
        try:
            for result in results:
                _ok(result, self.url)
            check_fence(fence, _rows(_ok(results[2], self.url)["result"]))
            _, results = await self._pipeline(
                stream, [_batch(steps, begin=False), _CLOSE], commits=True
            )
            committed = True
            return _batch_results(_ok(results[0], self.url)["result"], 0, len(steps), self.url)
        finally:
            if not committed and stream is not None:
                await self._abandon(stream)

    async def _once(self, requests: list[Json], *, commits: bool) -> list[Json]:
        """A pipeline on a new stream that the requests themselves close."""
        _, results = await self._pipeline(None, requests, commits=commits)
        return results

    async def _abandon(self, stream: _Stream) -> None:
        """Roll back and close a stream left in a transaction. When that fails too, the server
        rolls it back itself when the stream expires."""
        try:
            await self._pipeline(stream, [_execute(Statement("ROLLBACK")), _CLOSE], commits=False)
        except (KontoError, _Transient, _Unknown) as exc:
            log.warning("konto.libsql.abandon_failed", url=self.url, error=self._clean(exc))

    async def _pipeline(
        self, stream: _Stream | None, requests: list[Json], *, commits: bool
    ) -> tuple[_Stream | None, list[Json]]:
        """One ``POST /v3/pipeline`` on ``stream`` (None: a new one): where the stream goes on
        (None: it was closed) and one result per request."""
        base = self.url if stream is None else stream.url
        body = {"baton": None if stream is None else stream.baton, "requests": requests}
        try:
            async with self._http().post(
                f"{base}/v3/pipeline",
                json=body,
                headers=self._headers(),
                timeout=self._timeout(),
            ) as answer:
                status = answer.status
                text = await answer.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = self._clean(exc)
            if commits:
                raise _Unknown(reason) from exc
            raise _Transient(f"connection: {reason}", busy=False) from exc
        if status != 200:
            self._refuse(status, text, commits=commits)
        try:
            answer_body = _json_object(text)
            results = answer_body["results"]
            next_baton = answer_body.get("baton")
            next_url = answer_body.get("base_url") or base
        except (ValueError, KeyError, TypeError) as exc:
            raise KontoError(
                f"libSQL server {self.url} answered a pipeline with a body that is not Hrana"
                f" ({exc})"
            ) from None
        if not isinstance(results, list) or len(results) != len(requests):
            raise KontoError(f"libSQL server {self.url} answered a pipeline without its results")
        if next_baton is not None and not isinstance(next_baton, str):
            raise KontoError(f"libSQL server {self.url} answered a baton that is not a string")
        if not isinstance(next_url, str) or not next_url.startswith(("http://", "https://")):
            raise KontoError(f"libSQL server {self.url} answered a base_url that is not a URL")
        if next_baton is None:
            return None, results
        return _Stream(next_baton, next_url.rstrip("/")), results

    def _refuse(self, status: int, text: str, *, commits: bool) -> None:
        """Raise what an HTTP error status means. A 503 or 429 is the server declining to take
        the request, and an expired stream ran nothing: those start over. Another 5xx (a proxy's
        502 or 504 among them) to the request holding ``COMMIT`` leaves its outcome unknown."""
        message, code = _error_of(text)
        message = self._clean(message)
        where = f"libSQL server {self.url}"
        if status in (401, 403):
            raise KontoUnavailable(
                f"{where} refused kontod's token (HTTP {status}): {message}; check"
                " KONTOD_KONTO_AUTH_TOKEN (or TURSO_AUTH_TOKEN)"
            )
        reason = f"HTTP {status} {code or ''} {message}".replace("  ", " ")
        if status in (429, 503) or code in GONE_CODES or (status >= 500 and not commits):
            raise _Transient(reason, busy=False)
        if status >= 500:
            raise _Unknown(reason)
        raise KontoError(f"{where} refused a request (HTTP {status} {code or ''}): {message}")

    # --- retries ---------------------------------------------------------------------------------

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt()`` until it succeeds, fails for good, or ``busy_timeout`` passes."""
        deadline = time.monotonic() + self.busy_timeout
        pause = FIRST_PAUSE_S
        tries = 0
        while True:
            tries += 1
            try:
                return await attempt()
            except _Unknown as exc:
                raise KontoUnavailable(
                    f"libSQL server {self.url}: the request holding the commit failed ({exc});"
                    " whether the transaction was committed is unknown"
                ) from None
            except _Transient as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    kind = KontoBusy if exc.busy else KontoUnavailable
                    raise kind(
                        f"libSQL server {self.url}: {what} failed for {self.busy_timeout:g} s"
                        f" (busy timeout), after {tries} attempts; last: {exc}"
                    ) from None
                log.info(
                    "konto.libsql.retry", url=self.url, what=what, attempt=tries, reason=str(exc)
                )
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, LONGEST_PAUSE_S)

    def _headers(self) -> dict[str, str]:
        return {} if self._token is None else {"Authorization": f"Bearer {self._token}"}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.request_timeout)

    def _clean(self, text: object) -> str:
        """``text`` without the token, should a server or library echo it."""
        shown = str(text)
        return shown if self._token is None else shown.replace(self._token, "<token>")


_FOREIGN_KEYS = {"type": "execute", "stmt": {"sql": "PRAGMA foreign_keys = ON", "want_rows": False}}
_CLOSE = {"type": "close"}


def _execute(statement: Statement) -> Json:
    return {"type": "execute", "stmt": _stmt(statement)}


def _fence_read(fence: Fence) -> Json:
    return _execute(Statement(READ_FENCE_SQL, (fence.job,)))


def _stmt(statement: Statement) -> Json:
    return {"sql": statement.sql, "args": [encode_value(v) for v in statement.params]}


def _batch(statements: Sequence[Statement], *, begin: bool) -> Json:
    """A batch running ``statements`` in one transaction, each only when the step before it
    succeeded, then ``COMMIT`` when all did and ``ROLLBACK`` when anything failed. With
    ``begin`` its first step is ``BEGIN IMMEDIATE``; without, the stream's transaction must
    still be open (the server may have rolled it back: then nothing runs)."""
    steps: list[Json] = []
    if begin:
        steps.append({"stmt": {"sql": "BEGIN IMMEDIATE"}})
    for statement in statements:
        steps.append({"condition": _after(len(steps)), "stmt": _stmt(statement)})
    steps.append({"condition": _after(len(steps)), "stmt": {"sql": "COMMIT"}})
    committed: Json = {"type": "ok", "step": len(steps) - 1}
    steps.append({"condition": {"type": "not", "cond": committed}, "stmt": {"sql": "ROLLBACK"}})
    return {"type": "batch", "batch": {"steps": steps}}


def _after(index: int) -> Json:
    """The condition of step ``index``: the step before it succeeded (the first: a transaction
    is open)."""
    if index:
        return {"type": "ok", "step": index - 1}
    return {"type": "not", "cond": {"type": "is_autocommit"}}


def _batch_results(result: Json, skip: int, count: int, url: str) -> list[Result]:
    """The ``Result`` of each of the ``count`` steps after the first ``skip``; the first error
    of the batch raised (``_Transient`` when it means busy), or ``KontoError`` when the commit
    did not happen."""
    outcomes = result.get("step_results") or []
    errors = result.get("step_errors") or []
    for error in errors:
        if error is not None:
            _raise(error, url)
    commit = skip + count
    if len(outcomes) < commit + 1 or outcomes[commit] is None:
        raise KontoError(f"libSQL server {url}: the transaction was not committed")
    return [
        Result(_rows(r), int(r.get("affected_row_count") or 0))
        for r in outcomes[skip : skip + count]
    ]


def _ok(result: Json, url: str) -> Json:
    """The response of an ``ok`` result; an ``error`` result raised."""
    if result.get("type") == "ok" and isinstance(result.get("response"), dict):
        response: Json = result["response"]
        return response
    _raise(result.get("error") or {}, url)
    raise AssertionError("unreachable")


def _raise(error: Json, url: str) -> None:
    code = str(error.get("code") or "")
    message = str(error.get("message") or "no message")
    if code in BUSY_CODES or code in GONE_CODES:
        raise _Transient(f"{code}: {message}", busy=code in BUSY_CODES)
    raise KontoError(f"libSQL server {url}: {message} ({code or 'no code'})")


def _rows(result: Json) -> list[Row]:
    return [tuple(decode_value(v) for v in row) for row in result.get("rows") or []]


def _json_object(text: str) -> Json:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _error_of(text: str) -> tuple[str, str | None]:
    """The message and code of an HTTP error body: Hrana's ``{"message", "code"}``, sqld's
    ``{"error"}``, or plain text."""
    try:
        body = _json_object(text)
    except ValueError:
        return text.strip()[:500] or "no message", None
    if "message" in body:
        code = body.get("code")
        return str(body["message"]), None if code is None else str(code)
    if "error" in body:
        return str(body["error"]), None
    return text.strip()[:500], None


def encode_value(value: Value) -> Json:
    """A value kontod binds, as a Hrana value (integers as decimal text, blobs in base64)."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, int):
        return {"type": "integer", "value": str(int(value))}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise KontoError(f"cannot send {value} to Konto's database: not a finite number")
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "text", "value": value}
    return {"type": "blob", "base64": base64.b64encode(value).decode().rstrip("=")}


def decode_value(value: object) -> Value:
    """A Hrana value as the Python value SQLite's own module would give."""
    if not isinstance(value, dict):
        raise KontoError(f"libSQL server answered a value that is not Hrana: {value!r}")
    kind = value.get("type")
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
        return base64.b64decode(text + "=" * (-len(text) % 4))
    raise KontoError(f"libSQL server answered a value of unknown type {kind!r}")


def open_libsql(url: str, token: str | None, busy_timeout: float) -> LibsqlKonto:
    """Konto on the libSQL server at ``url`` (nothing is sent until the first call)."""
    return LibsqlKonto(url, token, busy_timeout)
