"""The HTTP surface: health, metrics, run history and manual triggers (aiohttp)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.registry import CollectorRegistry

from kontod import pauses, runs, status_page
from kontod.board import Board, JobView
from kontod.health import assess_job
from kontod.runner import Runner, Skipped, UnknownJob

log = structlog.get_logger("kontod.http")
RUNNER: web.AppKey[Runner] = web.AppKey("runner", Runner)
SNAPSHOT_JOB = "daily-snapshots"


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


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, {} when it has no body; 400 on anything else."""
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="the body must be a JSON object\n") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object\n")
    for key, value in data.items():
        if value is not None and not isinstance(value, str):
            raise web.HTTPBadRequest(text=f"{key} must be a string\n")
    return data


def build_app(
    runner: Runner,
    registry: CollectorRegistry,
    admin_token: str | None,
    clock: Callable[[], datetime],
    board: Board | None = None,
) -> web.Application:
    """The aiohttp application; the daemon serves it, tests too."""
    app = web.Application()
    app[RUNNER] = runner

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
            raise web.HTTPNotFound(text="no status page here\n")
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
            raise web.HTTPForbidden(
                text="manual triggers and pauses over HTTP are disabled: set KONTOD_ADMIN_TOKEN"
                " to enable them\n"
            )
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {admin_token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise web.HTTPUnauthorized(
                text="a valid 'Authorization: Bearer <token>' header is required\n",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def start_run(request: web.Request, name: str) -> web.Response:
        authorize(request)
        body = await _json_body(request)
        try:
            outcome = await runner.trigger(
                name, "manual", requested_by=f"http {request.remote}", reason=body.get("reason")
            )
        except UnknownJob:
            raise web.HTTPNotFound(text=f"no job named {name!r}\n") from None
        if isinstance(outcome, Skipped) and outcome.reason == "stopping":
            return web.json_response({"error": "kontod is stopping"}, status=503)
        if isinstance(outcome, Skipped):
            return web.json_response(
                {"error": f"{name} is already running", "reason": outcome.reason}, status=409
            )
        log.info("run.requested", job=name, run_id=outcome.run_id, remote=request.remote)
        return web.json_response({"job": name, "runId": outcome.run_id}, status=202)

    async def run_job(request: web.Request) -> web.Response:
        return await start_run(request, request.match_info["name"])

    async def dashboard_snapshot(request: web.Request) -> web.Response:
        return await start_run(request, SNAPSHOT_JOB)

    async def job_runs(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in runner.jobs:
            raise web.HTTPNotFound(text=f"no job named {name!r}\n")
        raw = request.query.get("limit", "20")
        if not (raw.isascii() and raw.isdecimal()) or not 1 <= int(raw) <= 1000:
            raise web.HTTPBadRequest(
                text=f"limit must be a whole number from 1 to 1000, not {raw!r}\n"
            )
        async with asyncio.timeout(5):
            records = await runs.recent_runs(runner.pool, name, int(raw))
        return web.json_response(
            {
                "runs": [
                    {
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
                    }
                    for r in records
                ]
            }
        )

    def known_job(request: web.Request) -> str:
        name = request.match_info["name"]
        if name not in runner.jobs:
            raise web.HTTPNotFound(text=f"no job named {name!r}\n")
        return name

    def pauser(request: web.Request, body: dict[str, Any]) -> str:
        who = body.get("by")
        return f"{who} (http {request.remote})" if who else f"http {request.remote}"

    async def pause_job(request: web.Request) -> web.Response:
        authorize(request)
        name = known_job(request)
        body = await _json_body(request)
        now = clock()
        until = None
        if body.get("until"):
            try:
                until = datetime.fromisoformat(body["until"])
            except ValueError:
                raise web.HTTPBadRequest(
                    text=f"until must be an ISO 8601 time, not {body['until']!r}\n"
                ) from None
            if until.tzinfo is None:
                until = until.replace(tzinfo=runner.tz)
        try:
            held = await pauses.pause(
                runner.pool, name, body.get("reason") or "", pauser(request, body), now, until
            )
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
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
        body = await _json_body(request)
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
    app.router.add_post("/api/dashboard/snapshot", dashboard_snapshot)
    app.router.add_get("/jobs/{name}/runs", job_runs)
    return app
