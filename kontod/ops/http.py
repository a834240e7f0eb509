"""The HTTP surface: health, metrics, run history and manual triggers (aiohttp)."""

from __future__ import annotations

import asyncio
import hmac
import json
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.registry import CollectorRegistry

from kontod.ops import run_page, status_page
from kontod.ops.board import Board, JobView
from kontod.ops.health import assess_job
from kontod.scheduler import instants, pauses, runlist, runs
from kontod.scheduler.contract import SkipReason, Trigger
from kontod.scheduler.runner import Runner, Skipped, UnknownJob

log = structlog.get_logger("kontod.http")
RUNNER: web.AppKey[Runner] = web.AppKey("runner", Runner)
MAX_BODY = 64 * 1024  # bytes: the largest body an endpoint needs is a pause of a few fields
MAX_TEXT = 1000  # characters in a string field (a reason, a name)
CAP_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class HttpLimits:
    """How long a client may take to send its request headers (and its body), and how many
    connections may be open at once."""

    header_timeout: timedelta = timedelta(seconds=10)
    max_connections: int = 256

    @property
    def header_timeout_s(self) -> float:
        return self.header_timeout.total_seconds()


def fail(
    cls: type[web.HTTPException], message: str, field: str | None = None, **headers: str
) -> web.HTTPException:
    """An HTTP error whose body is JSON: ``error`` says what was wrong, ``field`` names the
    input at fault."""
    body: dict[str, str] = {"error": message}
    if field is not None:
        body["field"] = field
    text, extra = json.dumps(body), headers or None
    if cls is web.HTTPRequestEntityTooLarge:
        return web.HTTPRequestEntityTooLarge(
            MAX_BODY, text=text, content_type="application/json", headers=extra
        )
    return cls(text=text, content_type="application/json", headers=extra)


def shown(value: str, limit: int = 40) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters."""
    return repr(value[:limit] + "..." if len(value) > limit else value)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with milliseconds and a Z, as the old endpoint wrote it."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cron_report(
    runner: Runner, stats: dict[str, runs.JobStats], now: datetime, board: Board | None = None
) -> dict[str, Any]:
    """The /health/cron document: the old endpoint's shape plus kontod's fields."""
    jobs = []
    views = {v.spec.name: v for v in board.views(stats, now)} if board is not None else {}
    for spec in runner.jobs.values():
        st = stats.get(spec.name, runs.JobStats())
        view = views.get(spec.name)
        verdict = view.verdict if view is not None else assess_job(spec, runner.tz, st, now)
        next_retry = runner.next_retry(spec.name, st, now)
        reason = verdict.reason
        if reason is not None and next_retry is not None and not verdict.healthy:
            reason = f"{reason}; retry due at {iso(next_retry)}"
        uptime = None
        if st.last_started_at is not None:
            uptime = int((now - st.last_started_at).total_seconds() * 1000)
        jobs.append(
            {
                "name": spec.name,
                "schedule": spec.schedule,
                "timezone": runner.tz.key,
                "lastRun": iso(st.last_started_at),
                "lastStatus": st.last_status or "never_run",
                "runCount": st.runs,
                "errorCount": st.errors,
                "uptime": uptime,
                "healthy": verdict.healthy,
                "reason": reason,
                "configured": spec.not_configured is None,
                "nextRun": None if spec.not_configured else iso(verdict.next_tick),
                "lastSuccess": iso(st.last_success_at),
                "lastError": st.last_error,
                "lastDurationSeconds": st.last_duration_s,
                "instance": st.running_instance,
                "nextRetry": iso(next_retry),
                **(operator_fields(view) if view is not None else {}),
            }
        )
    healthy = all(job["healthy"] for job in jobs)
    return {
        "status": "healthy" if healthy else "unhealthy",
        "timestamp": iso(now),
        "jobs": jobs,
    }


def operator_fields(view: JobView) -> dict[str, Any]:
    """Pause, suspicious success and progress of one job, for /health/cron."""
    p, s, prog = view.pause, view.suspicion, view.progress
    return {
        "paused": p is not None,
        "pausedReason": p.reason if p else None,
        "pausedBy": p.by if p else None,
        "pausedSince": iso(p.since) if p else None,
        "pausedUntil": iso(p.until) if p else None,
        "suspicious": s.suspicious,
        "suspiciousReason": s.reason,
        "progress": None
        if prog is None
        else {
            "done": prog.done,
            "expected": prog.expected,
            "ratio": prog.ratio,
            "ratePerSecond": prog.rate_per_s,
            "estimatedEnd": iso(prog.eta),
            "startedAt": iso(prog.started_at),
        },
    }


def run_json(r: runlist.Run) -> dict[str, Any]:
    """One run as ``/jobs/{name}/runs`` lists it; ``/runs/{id}`` adds the lease and the
    duration of a ``RunDetail``."""
    out: dict[str, Any] = {
        "id": r.id,
        "job": r.job,
        "trigger": r.trigger,
        "scheduledFor": iso(r.scheduled_for),
        "attempt": r.attempt,
        "startedAt": iso(r.started_at),
        "finishedAt": iso(r.finished_at),
        "status": r.status,
        "error": r.error,
        "counts": dict(r.counts),
        "instance": r.instance,
        "requestedBy": r.requested_by,
        "reason": r.reason,
    }
    if isinstance(r, runlist.RunDetail):
        out["durationSeconds"] = (
            None if r.finished_at is None else (r.finished_at - r.started_at).total_seconds()
        )
        out["heartbeatAt"] = iso(r.heartbeat_at)
        out["leaseUntil"] = iso(r.lease_until)
    return out


def prefers_html(accept: str) -> bool:
    """Whether an Accept header ranks text/html above application/json: a browser's does
    (``text/html,…,*/*;q=0.8``); curl's ``*/*``, a client asking for JSON and no header at
    all do not, and get JSON."""
    ranges: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranges[media.lower()] = max(q, ranges.get(media.lower(), 0.0))

    def quality(media: str) -> float:
        kind = media.split("/")[0]
        # The most specific range that names the type decides its quality.
        for candidate in (media, f"{kind}/*", "*/*"):
            if candidate in ranges:
                return ranges[candidate]
        return 0.0

    return quality("text/html") > quality("application/json")


def run_id_of(raw: str) -> int:
    """The ``{id}`` of ``/runs/{id}``; 400 naming it when it is not a run id."""
    try:
        return runlist.parse_run_id(raw)
    except ValueError as exc:
        raise fail(web.HTTPBadRequest, str(exc), "id") from None


async def _json_body(request: web.Request, timeout_s: float) -> dict[str, Any]:
    """The request's JSON object of string fields, {} when it has no body; 400, 408 or 413
    naming what is wrong on anything else."""
    if not request.can_read_body:
        return {}
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise fail(
            web.HTTPRequestEntityTooLarge, f"the body is larger than {MAX_BODY} bytes", "body"
        ) from None
    except TimeoutError:
        raise fail(
            web.HTTPRequestTimeout, f"the body did not arrive within {timeout_s:g} s", "body"
        ) from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: a body of nested brackets
        raise fail(web.HTTPBadRequest, "the body must be a JSON object", "body") from None
    if not isinstance(data, dict):
        raise fail(web.HTTPBadRequest, "the body must be a JSON object", "body")
    for key, value in data.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise fail(web.HTTPBadRequest, f"{key} must be a string", key)
        # PostgreSQL's text cannot hold NUL, and a reason is shown to people: refuse both here.
        if "\x00" in value:
            raise fail(web.HTTPBadRequest, f"{key} must not contain a NUL character", key)
        if len(value) > MAX_TEXT:
            raise fail(web.HTTPBadRequest, f"{key} must be at most {MAX_TEXT} characters", key)
    return data


def build_app(
    runner: Runner,
    registry: CollectorRegistry,
    admin_token: str | None,
    clock: Callable[[], datetime],
    board: Board | None = None,
    limits: HttpLimits | None = None,
) -> web.Application:
    """The aiohttp application; the daemon serves it (through ``GuardedSite``), tests too."""
    limits = limits or HttpLimits()
    guard = ConnectionGuard(limits)
    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors, guard.middleware])
    app[RUNNER] = runner
    app[GUARD] = guard

    async def health(_: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(5):
                await runner.pool.fetchval("SELECT 1")
        except Exception as exc:  # whatever the driver raises, the answer is "unreachable"
            log.warning("health.database_unreachable", error=f"{type(exc).__name__}: {exc}")
            return web.json_response(
                {"status": "unhealthy", "database": "unreachable", "error": type(exc).__name__},
                status=503,
            )
        return web.json_response({"status": "healthy", "database": "ok"})

    async def health_cron(_: web.Request) -> web.Response:
        # Only the cache kept by the history: a request never queries or writes run state.
        report = cron_report(runner, runner.stats, clock(), board)
        return web.json_response(report, status=200 if report["status"] == "healthy" else 503)

    rendered: dict[str, object] = {}

    async def status(_: web.Request) -> web.Response:
        if board is None:
            raise fail(web.HTTPNotFound, "no status page here")
        # The same caches as /health/cron: a page view queries nothing, and a page rendered
        # from the same state in the same second is served again.
        now = clock()
        stats = runner.stats
        key = board.state_key(stats, now)
        if rendered.get("key") != key:
            rendered["key"] = key
            rendered["page"] = status_page.render(board.views(stats, now), runner.tz, now)
        page = str(rendered["page"])
        return web.Response(
            text=page,
            content_type="text/html",
            headers={
                "Content-Security-Policy": status_page.CONTENT_SECURITY_POLICY,
                "Cache-Control": "no-store",
            },
        )

    def authorize(request: web.Request) -> None:
        if admin_token is None:
            raise fail(
                web.HTTPForbidden,
                "manual triggers and pauses over HTTP are disabled: set KONTOD_ADMIN_TOKEN"
                " to enable them",
            )
        # aiohttp keeps bytes that are not UTF-8 as surrogates: give them back as they came,
        # so that any header compares (and fails) rather than raising.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        expected = f"Bearer {admin_token}".encode()
        if not hmac.compare_digest(given, expected):
            raise fail(
                web.HTTPUnauthorized,
                "a valid 'Authorization: Bearer <token>' header is required",
                "Authorization",
                **{"WWW-Authenticate": "Bearer"},
            )

    async def start_run(request: web.Request, name: str) -> web.Response:
        authorize(request)
        body = await _json_body(request, limits.header_timeout_s)
        try:
            outcome = await runner.trigger(
                name,
                Trigger.MANUAL,
                requested_by=f"http {request.remote}",
                reason=body.get("reason"),
            )
        except UnknownJob:
            raise fail(web.HTTPNotFound, f"no job named {shown(name)}", "name") from None
        if isinstance(outcome, Skipped) and outcome.reason == SkipReason.STOPPING:
            return web.json_response({"error": "kontod is stopping"}, status=503)
        if isinstance(outcome, Skipped):
            return web.json_response(
                {"error": f"{name} is already running", "reason": outcome.reason}, status=409
            )
        log.info("run.requested", job=name, run_id=outcome.run_id, remote=request.remote)
        return web.json_response({"job": name, "runId": outcome.run_id}, status=202)

    async def run_job(request: web.Request) -> web.Response:
        return await start_run(request, request.match_info["name"])

    def run_of(name: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            return await start_run(request, name)

        return handler

    async def job_runs(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in runner.jobs:
            raise fail(web.HTTPNotFound, f"no job named {shown(name)}", "name")
        raw = request.query.get("limit", "20")
        # The length first: int() refuses numbers of more than 4 300 digits with a ValueError.
        if not (raw.isascii() and raw.isdecimal() and len(raw) <= 4) or not 1 <= int(raw) <= 1000:
            raise fail(
                web.HTTPBadRequest,
                f"limit must be a whole number from 1 to 1000, not {shown(raw)}",
                "limit",
            )
        async with asyncio.timeout(5):
            found = await runlist.runs_of(runner.pool, name, int(raw))
        return web.json_response({"runs": [run_json(r) for r in found]})

    async def run_detail(request: web.Request) -> web.Response:
        run_id = run_id_of(request.match_info["id"])
        async with asyncio.timeout(5):
            found = await runlist.run_detail(runner.pool, run_id)
        if found is None:
            raise fail(web.HTTPNotFound, f"no run with id {run_id}", "id")
        # One address for people and programs: a browser asks for HTML and gets the run's page,
        # anything else gets JSON. Caches must keep the two apart.
        headers = {"Vary": "Accept", "Cache-Control": "no-store"}
        if not prefers_html(request.headers.get("Accept", "")):
            return web.json_response(run_json(found), headers=headers)
        verdict = board.suspicions.get(found.job) if board is not None else None
        if verdict is not None and verdict.run_id != found.id:
            verdict = None
        page = run_page.render(found, verdict, runner.tz, clock())
        headers["Content-Security-Policy"] = status_page.CONTENT_SECURITY_POLICY
        return web.Response(text=page, content_type="text/html", headers=headers)

    def known_job(request: web.Request) -> str:
        name = request.match_info["name"]
        if name not in runner.jobs:
            raise fail(web.HTTPNotFound, f"no job named {shown(name)}", "name")
        return name

    def pauser(request: web.Request, body: dict[str, Any]) -> str:
        who = body.get("by")
        return f"{who} (http {request.remote})" if who else f"http {request.remote}"

    async def pause_job(request: web.Request) -> web.Response:
        authorize(request)
        name = known_job(request)
        body = await _json_body(request, limits.header_timeout_s)
        now = clock()
        until = None
        if body.get("until"):
            try:
                until = instants.parse_until(body["until"], runner.tz, now)
            except ValueError as exc:
                raise fail(web.HTTPBadRequest, f"until {exc}", "until") from None
        try:
            held = await pauses.pause(
                runner.pool, name, body.get("reason") or "", pauser(request, body), now, until
            )
        except ValueError as exc:
            raise fail(web.HTTPBadRequest, str(exc), "reason") from None
        except pauses.AlreadyPaused as exc:
            return web.json_response({"error": str(exc)}, status=409)
        if board is not None:
            board.paused(held)
        log.info("job.paused", job=name, by=held.by, reason=held.reason, until=iso(held.until))
        return web.json_response(
            {
                "job": name,
                "paused": True,
                "reason": held.reason,
                "by": held.by,
                "since": iso(held.since),
                "until": iso(held.until),
            }
        )

    async def resume_job(request: web.Request) -> web.Response:
        authorize(request)
        name = known_job(request)
        body = await _json_body(request, limits.header_timeout_s)
        ended = await pauses.resume(runner.pool, name, pauser(request, body), clock())
        if board is not None:
            board.resumed(name, clock())
        if ended is None:
            return web.json_response({"job": name, "paused": False, "wasPaused": False})
        log.info("job.resumed", job=name, by=pauser(request, body))
        return web.json_response({"job": name, "paused": False, "wasPaused": True})

    app.router.add_get("/", status)
    app.router.add_post("/jobs/{name}/pause", pause_job)
    app.router.add_post("/jobs/{name}/resume", resume_job)
    app.router.add_get("/health", health)
    app.router.add_get("/health/cron", health_cron)
    app.router.add_get("/api/health/cron", health_cron)
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_post("/jobs/{name}/run", run_job)
    # The further trigger routes jobs declare (an older client's own), after the generic one.
    for spec in runner.jobs.values():
        for path in spec.exports.trigger_paths:
            app.router.add_post(path, run_of(spec.name))
    app.router.add_get("/jobs/{name}/runs", job_runs)
    app.router.add_get("/runs/{id}", run_detail)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What a handler meets when the database is down, restarting, full or refusing connections:
# the request was fine, the answer is "try again", not an internal error.
DATABASE_UNAVAILABLE = (
    TimeoutError,
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError,
)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer in JSON, and an unexpected exception logged once (with its
    traceback in one field) and answered 500 instead of aiohttp's text page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        # aiohttp's own refusals (no such route, method not allowed): same shape as ours.
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        message = (exc.text or exc.reason).strip()
        return web.json_response({"error": message}, status=exc.status, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client went away: nothing to answer
    except DATABASE_UNAVAILABLE as exc:
        log.warning(
            "http.database_unavailable",
            method=request.method,
            path=request.path,
            error=f"{type(exc).__name__}: {exc}",
        )
        return web.json_response(
            {"error": "the database did not answer; try again"},
            status=503,
            headers={"Retry-After": "10"},
        )
    except Exception:
        log.exception("http.unhandled_error", method=request.method, path=request.path)
        return web.json_response(
            {"error": "internal error; kontod's log has the details"}, status=500
        )


def fitting_cap(wanted: int) -> int:
    """``wanted``, lowered to half the process's file limit so that the database, the bank and
    the logs keep descriptors to work with when every connection is taken."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or wanted <= soft // 2:
        return wanted
    fitted = max(1, soft // 2)
    log.warning("http.connection_cap_lowered", wanted=wanted, cap=fitted, file_limit=soft)
    return fitted


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, a deadline for the request headers around it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.waiting = True  # for the headers of a request (the first, or the next one)
        self.timer: asyncio.TimerHandle | None = None
        self.admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.guard.admit(self):
            return
        self.admitted = True
        self.inner.connection_made(transport)
        self.arm()

    def arm(self) -> None:
        """Start waiting for a request's headers: the connection closes if they do not come."""
        self.waiting = True
        self.disarm()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.guard.limits.header_timeout_s, self.expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def expire(self) -> None:
        self.timer = None
        if self.waiting and self.transport is not None:
            self.guard.expired += 1
            log.debug("http.header_timeout", timeout_s=self.guard.limits.header_timeout_s)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self.transport = None
        self.guard.forget(self)
        if self.admitted:
            self.inner.connection_lost(exc)


_REFUSED_BODY = b'{"error": "too many open connections to kontod"}'
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY)
)


class ConnectionGuard:
    """The header read timeout and the cap on open connections, around aiohttp's server.

    A connection has ``header_timeout`` to send the headers of each request (idle keep-alive
    included); a body gets as long again inside the handler. At the cap, the oldest connection
    still waiting for headers makes room for the new one, so that slow or idle clients cannot
    keep a health check out; when every connection is busy with a request, the new one is
    answered 503 and closed.
    """

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.cap = limits.max_connections
        self.open: dict[_Guarded, None] = {}  # oldest first
        self.by_handler: dict[object, _Guarded] = {}
        self.expired = 0
        self.evicted = 0
        self.refused = 0
        self._last_cap_log = float("-inf")

    def protocol(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` wrapping aiohttp's ``factory``."""

        def make() -> asyncio.Protocol:
            inner = factory()
            conn = _Guarded(self, inner)
            self.by_handler[inner] = conn
            return conn

        return make

    def admit(self, conn: _Guarded) -> bool:
        if len(self.open) >= self.cap:
            oldest = next((c for c in self.open if c.waiting), None)
            if oldest is None:
                self.refused += 1
                self._at_cap()
                if conn.transport is not None:
                    conn.transport.write(_REFUSED)
                    conn.transport.close()
                return False
            self.evicted += 1
            self._at_cap()
            self.forget(oldest)
            if oldest.transport is not None:
                oldest.transport.abort()
        self.open[conn] = None
        return True

    def forget(self, conn: _Guarded) -> None:
        self.open.pop(conn, None)
        if conn.transport is None:
            self.by_handler.pop(conn.inner, None)

    def _at_cap(self) -> None:
        # Under a flood this happens for every connection: one line a minute says enough.
        now = time.monotonic()
        if now - self._last_cap_log >= CAP_LOG_EVERY_S:
            self._last_cap_log = now
            log.warning(
                "http.connection_cap_reached",
                cap=self.cap,
                evicted_total=self.evicted,
                refused_total=self.refused,
            )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The headers are in: stop the connection's header clock until the answer is made."""
        conn = self.by_handler.get(request.protocol)
        if conn is not None:
            conn.waiting = False
            conn.disarm()
        try:
            return await handler(request)
        finally:
            if conn is not None and conn.transport is not None:
                conn.arm()


GUARD: web.AppKey[ConnectionGuard] = web.AppKey("guard", ConnectionGuard)


class GuardedSite(web.TCPSite):
    """aiohttp's TCP site with the ``ConnectionGuard`` of its application around each
    connection."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard) -> None:
        super().__init__(runner, host, port)
        self.guard = guard

    async def start(self) -> None:
        # What TCPSite.start does, with the protocol factory wrapped.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        self.guard.cap = fitting_cap(self.guard.limits.max_connections)
        # asyncio accepts up to ``backlog`` connections in one go, each holding a descriptor
        # before the guard can close the oldest: a quarter of the cap keeps a flood of new
        # connections within the file limit (the cap is at most half of it), so accept()
        # never fails for want of descriptors.
        backlog = min(self._backlog, max(1, self.guard.cap // 4))
        self._server = await loop.create_server(
            self.guard.protocol(server), self._host, self._port, backlog=backlog
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
