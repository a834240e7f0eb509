"""The HTTP surface over real loopback HTTP, with the daemon and PostgreSQL running for real."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import structlog
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from kontod import logs
from kontod.jobs import declare_jobs
from kontod.ops.http import GUARD, GuardedSite, build_app
from kontod.providers.powens import Observer
from kontod.scheduler.contract import RunContext
from kontod.scheduler.runner import Runner, utcnow
from tests.daemon_harness import TOKEN, running_daemon, runs_of, settings_for
from tests.helpers import PARIS, add_user, free_port, quiet_schedule, spec, wait_for
from tests.programs import kontod_script, require_program

AUTH = {"Authorization": f"Bearer {TOKEN}"}
OLD_FIELDS = {
    "name",
    "schedule",
    "lastRun",
    "lastStatus",
    "runCount",
    "errorCount",
    "uptime",
    "healthy",
}
NEW_FIELDS = {"nextRun", "lastSuccess", "lastError", "lastDurationSeconds"}


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


async def post(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, headers=headers or {}) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


def real_jobs(dsn: str) -> Any:
    def build(pool: asyncpg.Pool, http: aiohttp.ClientSession, _: Observer) -> Any:
        return declare_jobs(settings_for(dsn), pool, http)

    return build


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_health_cron_has_the_old_shape_and_more(dsn: str) -> None:
    async with running_daemon(settings_for(dsn), real_jobs(dsn)) as (daemon, base):
        assert daemon.pool is not None
        # The quiet schedule: no run has started, so every job is as healthy as a fresh one.
        assert await runs_of(daemon.pool, "daily-snapshots") == []
        for path in ("/health/cron", "/api/health/cron"):
            status, body = await get(base + path)
            assert (status, body["status"]) == (200, "healthy")
            assert set(body) == {"status", "timestamp", "jobs"}
            names = [job["name"] for job in body["jobs"]]
            assert names == [
                "daily-snapshots",
                "refresh-stale-connections",
                "refresh-property-estimations",
                "prune-audit-log",
            ]
            for job in body["jobs"]:
                assert set(job) >= OLD_FIELDS | NEW_FIELDS
            snapshots, refresh, estimations, audit = body["jobs"]
            # kontod's own minimal Konto tables have neither the estimation columns nor an
            # audit log: both jobs are healthy and say why they do nothing.
            for unconfigured in (estimations, audit):
                assert (unconfigured["healthy"], unconfigured["configured"]) == (True, False)
            assert "has no column citycode" in estimations["reason"]
            assert "audit_log table does not exist" in audit["reason"]
            assert (snapshots["healthy"], snapshots["runCount"], snapshots["lastStatus"]) == (
                True,
                0,
                "never_run",
            )
            assert refresh["healthy"] is True
            assert refresh["configured"] is False
            assert "not configured" in refresh["reason"]
        status, body = await get(base + "/health")
        assert (status, body["database"]) == (200, "ok")


async def _not_running(daemon: Any) -> bool:
    return all(daemon.runner.active(name) is None for name in daemon.runner.jobs)


async def test_health_cron_is_503_when_a_job_failed(dsn: str) -> None:
    async def boom(ctx: RunContext) -> None:
        raise RuntimeError("no luck")

    jobs = [spec("daily-snapshots", boom, catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_, base):
        status, body = await post(base + "/jobs/daily-snapshots/run", AUTH)
        assert status == 202
        await wait_for(lambda: _status_is(base, 503))
        status, body = await get(base + "/health/cron")
        [job] = body["jobs"]
        assert (body["status"], job["lastStatus"], job["healthy"]) == ("unhealthy", "error", False)
        assert job["lastError"] == "RuntimeError: no luck"
        assert (job["runCount"], job["errorCount"]) == (1, 1)


async def _status_is(base: str, expected: int) -> bool:
    status, _ = await get(base + "/health/cron")
    return status == expected


async def test_health_cron_is_503_for_a_never_run_job_past_its_tick(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO kontod_jobs (name, registered_at) VALUES ('daily-snapshots', $1)",
            datetime(2026, 6, 1, tzinfo=UTC),
        )
    finally:
        await conn.close()
    jobs = [spec("daily-snapshots", catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_, base):
        status, body = await get(base + "/health/cron")
        assert status == 503
        assert body["jobs"][0]["lastStatus"] == "never_run"
        assert "no run for the tick" in body["jobs"][0]["reason"]


@pytest.mark.parametrize(
    ("token", "headers", "path", "expected"),
    [
        (None, AUTH, "/jobs/test-job/run", 403),
        (TOKEN, {}, "/jobs/test-job/run", 401),
        (TOKEN, {"Authorization": "Bearer wrong"}, "/jobs/test-job/run", 401),
        (TOKEN, {"Authorization": TOKEN}, "/jobs/test-job/run", 401),
        (TOKEN, AUTH, "/jobs/nope/run", 404),
        (TOKEN, AUTH, "/jobs/test-job/run", 202),
        (None, AUTH, "/api/dashboard/snapshot", 403),
        (TOKEN, {}, "/api/dashboard/snapshot", 401),
    ],
)
async def test_manual_trigger_answers(
    dsn: str, token: str | None, headers: dict[str, str], path: str, expected: int
) -> None:
    jobs = [spec(catchup=0), spec("daily-snapshots", catchup=0)]
    async with running_daemon(settings_for(dsn, http={"admin_token": token}), lambda *_: jobs) as (
        _,
        base,
    ):
        status, body = await post(base + path, headers)
        assert status == expected
        assert TOKEN not in str(body)


async def test_manual_trigger_409_while_running_and_runs_listing(dsn: str) -> None:
    release = asyncio.Event()

    async def held(ctx: RunContext) -> None:
        ctx.counts["items_done"] += 2
        await release.wait()

    jobs = [spec("daily-snapshots", held, catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (daemon, base):
        status, body = await post(base + "/api/dashboard/snapshot", AUTH)
        assert status == 202
        run_id = body["runId"]
        status, body = await post(base + "/jobs/daily-snapshots/run", AUTH)
        assert status == 409
        release.set()
        await wait_for(lambda: _not_running(daemon))
        status, body = await get(base + "/jobs/daily-snapshots/runs?limit=5")
        assert status == 200
        [run] = body["runs"]
        assert run["id"] == run_id
        assert (run["job"], run["trigger"], run["status"]) == (
            "daily-snapshots",
            "manual",
            "success",
        )
        assert run["scheduledFor"] is None
        assert (run["attempt"], run["instance"]) == (1, daemon.instance)
        assert run["startedAt"].endswith("Z") and run["finishedAt"].endswith("Z")
        assert run["counts"] == {"items_done": 2}
        assert (await get(base + "/jobs/daily-snapshots/runs?limit=zero"))[0] == 400
        assert (await get(base + "/jobs/daily-snapshots/runs?limit=%C2%B2"))[0] == 400
        assert (await get(base + "/jobs/nope/runs"))[0] == 404


async def test_health_is_503_when_the_database_is_gone(dsn: str, admin_dsn: str) -> None:
    jobs = [spec(catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_, base):
        assert (await get(base + "/health"))[0] == 200
        dbname = urlsplit(dsn).path.lstrip("/")
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", dbname
            )
            status, body = await get(base + "/health")
            assert (status, body["database"]) == (503, "unreachable")
            # The endpoints that read or write the database say so too, in JSON, never a 500.
            for method, path in (
                ("GET", "/jobs/test-job/runs"),
                ("POST", "/jobs/test-job/pause"),
                ("POST", "/jobs/test-job/resume"),
            ):
                status, body, _ = await send(
                    method, base + path, data=json.dumps({"reason": "db move"}), headers=AUTH
                )
                assert (status, body["error"]) == (503, "the database did not answer; try again"), (
                    path,
                    body,
                )
            await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
            await wait_for(lambda: _health_ok(base))
        finally:
            await admin.close()


async def _health_ok(base: str) -> bool:
    return (await get(base + "/health"))[0] == 200


async def test_metrics_names_and_values_come_from_the_run_table(dsn: str) -> None:
    async def flaky(ctx: RunContext) -> None:
        ctx.counts["items_users"] += 3
        ctx.counts["rows_written"] += 7
        if ctx.trigger == "manual" and flaky.calls == 1:  # type: ignore[attr-defined]
            raise RuntimeError("second run fails")
        flaky.calls += 1  # type: ignore[attr-defined]

    flaky.calls = 0  # type: ignore[attr-defined]
    jobs = [spec("daily-snapshots", flaky, catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (daemon, base):
        for _ in range(2):
            status, _ = await post(base + "/jobs/daily-snapshots/run", AUTH)
            assert status == 202
            await wait_for(lambda: _not_running(daemon))
        _, text = await get(base + "/metrics")
    m = samples(text)
    job = (("job_name", "daily-snapshots"),)
    assert m[("kontod_job_runs_total", job)] == 2
    assert m[("kontod_job_errors_total", job)] == 1
    assert m[("kontod_job_last_run_success", job)] == 0
    assert m[("kontod_job_running", job)] == 0
    assert m[("kontod_job_healthy", job)] == 0
    assert m[("kontod_job_duration_seconds_count", job)] == 2
    assert (
        m[("kontod_job_items_total", (("job_name", "daily-snapshots"), ("outcome", "users")))] == 6
    )
    assert (
        m[
            (
                "kontod_job_last_run_counts",
                (("count", "rows_written"), ("job_name", "daily-snapshots")),
            )
        ]
        == 7
    )
    assert m[("kontod_job_grace_seconds", job)] == 3600
    assert ("kontod_job_last_success_timestamp_seconds", job) in m
    assert (
        m[("kontod_job_next_scheduled_timestamp_seconds", job)]
        > m[("kontod_job_last_scheduled_timestamp_seconds", job)]
    )
    assert any(name == "kontod_build_info" for name, _ in m)
    assert any(name == "process_resident_memory_bytes" for name, _ in m)

    # A new process on the same database reports the same history.
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_, base):
        _, text = await get(base + "/metrics")
    m = samples(text)
    assert m[("kontod_job_runs_total", job)] == 2
    assert m[("kontod_job_errors_total", job)] == 1
    assert ("kontod_job_last_success_timestamp_seconds", job) in m
    assert ("kontod_job_duration_seconds_count", job) in m


async def test_the_newest_snapshot_date_reaches_metrics_with_the_run(dsn: str) -> None:
    async with running_daemon(settings_for(dsn), real_jobs(dsn)) as (daemon, base):
        await add_user(daemon.pool, accounts=[("checking", "12.5", False)])  # type: ignore[arg-type]
        latest = ("kontod_snapshot_latest_date_timestamp_seconds", ())
        _, text = await get(base + "/metrics")
        assert latest not in samples(text)
        status, body = await post(base + "/api/dashboard/snapshot", AUTH)
        assert status == 202, body
        await wait_for(lambda: _not_running(daemon))
        # No housekeeping round waited for: /metrics reads the history the run's end reloaded,
        # so the newest date comes with the run's success, not up to lease/3 later.
        _, text = await get(base + "/metrics")
        newest = await daemon.pool.fetchval(  # type: ignore[union-attr]
            "SELECT max(date::date) FROM patrimoine_snapshots"
        )
    m = samples(text)
    assert ("kontod_job_last_success_timestamp_seconds", (("job_name", "daily-snapshots"),)) in m
    assert m[latest] == datetime.combine(newest, time(), PARIS).timestamp()


async def test_metrics_pass_promtool_check(dsn: str) -> None:
    promtool = require_program("promtool", "prometheus")
    async with running_daemon(settings_for(dsn), real_jobs(dsn)) as (daemon, base):
        await add_user(daemon.pool, accounts=[("checking", "12.5", False)])  # type: ignore[arg-type]

        # The quiet schedule: no run of the day's tick holds the job, the first ask starts one.
        assert await runs_of(daemon.pool, "daily-snapshots") == []  # type: ignore[arg-type]
        status, body = await post(base + "/api/dashboard/snapshot", AUTH)
        assert status == 202, body
        await wait_for(lambda: _not_running(daemon))
        await daemon._refresh_stats()
        _, text = await get(base + "/metrics")
    assert "kontod_snapshot_latest_date_timestamp_seconds " in text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", (
        result.stdout + result.stderr
    )


async def raw_request(base: str, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``request`` as bytes (headers a client library would refuse to send); the status
    and the JSON body of the answer."""
    url = urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        body = await reader.readexactly(length)
    finally:
        writer.close()
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head.lower(), head
    return status, json.loads(body)


async def send(
    method: str, url: str, *, data: bytes | str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, data=data, headers=headers or {}) as resp,
    ):
        return resp.status, await resp.json(), resp.content_type


async def test_bad_input_gets_a_json_4xx_naming_the_field(dsn: str) -> None:
    jobs = [spec(catchup=0)]
    json_auth = {**AUTH, "Content-Type": "application/json"}
    pause, run = "/jobs/test-job/pause", "/jobs/test-job/run"
    cases: list[tuple[str, str, bytes | str | None, dict[str, str], int, str | None]] = [
        ("GET", "/jobs/test-job/runs?limit=" + "9" * 5000, None, {}, 400, "limit"),
        ("GET", "/jobs/test-job/runs?limit=" + "0" * 4999 + "5", None, {}, 400, "limit"),
        ("POST", pause, "[" * 60_000, json_auth, 400, "body"),
        ("POST", pause, "[" * 100_000, json_auth, 413, "body"),
        ("POST", run, b"x" * 2_000_000, json_auth, 413, "body"),
        ("POST", pause, b"\xff\xfe", json_auth, 400, "body"),
        ("POST", pause, '{"reason": 5}', json_auth, 400, "reason"),
        (
            "POST",
            pause,
            json.dumps({"reason": "db upgrade", "until": "9999-12-31T23:59:59-01:00"}),
            json_auth,
            400,
            "until",
        ),
        (
            "POST",
            pause,
            json.dumps({"reason": "db upgrade", "until": "9999-12-31T23:30:00Z"}),
            json_auth,
            400,
            "until",
        ),
        ("POST", pause, json.dumps({"reason": "db\x00upgrade"}), json_auth, 400, "reason"),
        ("POST", pause, json.dumps({"reason": "ok", "by": "a\x00b"}), json_auth, 400, "by"),
        ("POST", run, json.dumps({"reason": "after\x00the upgrade"}), json_auth, 400, "reason"),
        ("POST", pause, json.dumps({"reason": "x" * 1001}), json_auth, 400, "reason"),
        ("POST", pause, json.dumps({"reason": "  "}), json_auth, 400, "reason"),
        ("GET", "/jobs/%00/runs", None, {}, 404, "name"),
        ("DELETE", "/health", None, {}, 405, None),
        ("GET", "/nowhere", None, {}, 404, None),
    ]
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_, base):
            for method, path, data, headers, expected, field in cases:
                status, body, kind = await send(method, base + path, data=data, headers=headers)
                assert (status, body.get("field")) == (expected, field), (path, data, body)
                assert kind == "application/json" and body["error"], body
            # A header that is not UTF-8, with no valid token: unauthenticated, not a crash.
            status, body = await raw_request(
                base,
                b"POST /jobs/test-job/run HTTP/1.1\r\nHost: kontod\r\n"
                b"Authorization: Bearer \xff\xfe\xc3\r\nContent-Length: 0\r\n\r\n",
            )
            assert (status, body["field"]) == (401, "Authorization"), body
            # None of the above paused or ran anything (a tick of the schedule may have).
            status, body, _ = await send("GET", base + "/jobs/test-job/runs")
            assert status == 200 and [r for r in body["runs"] if r["trigger"] == "manual"] == []
            assert (await get(base + "/health/cron"))[1]["jobs"][0]["paused"] is False
    assert "http.unhandled_error" not in [e["event"] for e in logs]


async def test_a_pause_until_year_8999_is_accepted_and_shown(dsn: str) -> None:
    jobs = [spec(catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_, base):
        status, body, _ = await send(
            "POST",
            base + "/jobs/test-job/pause",
            data=json.dumps({"reason": "retired", "until": "8999-12-31T23:30:00+14:00"}),
            headers=AUTH,
        )
        assert (status, body["until"]) == (200, "8999-12-31T09:30:00.000Z"), body
        status, html = await get(base + "/")
        assert status == 200 and "8999-12-31 10:30 CET" in html


async def test_an_unexpected_error_is_one_json_log_line_and_a_json_500(
    pool: asyncpg.Pool, capfd: pytest.CaptureFixture[str]
) -> None:
    runner = Runner(pool, [spec(catchup=0)], PARIS, "kontod-test")
    app = build_app(runner, CollectorRegistry(), None, utcnow)
    site_runner = web.AppRunner(app, access_log=None)
    await site_runner.setup()
    site = GuardedSite(site_runner, "127.0.0.1", 0, app[GUARD])
    await site.start()
    base = f"http://127.0.0.1:{site.port}"
    try:
        with json_logs():
            capfd.readouterr()
            # The pool goes away under the endpoint: the driver raises what no handler expects.
            await pool.close()
            status, body, _ = await send("GET", base + "/jobs/test-job/runs")
            # What the libraries log through the standard logging module takes the same road.
            logging.getLogger("aiohttp.server").error("Error handling request", exc_info=True)
            try:
                raise ValueError("from a library")
            except ValueError:
                logging.getLogger("aiohttp.server").exception("Error handling request")
            err = capfd.readouterr().err
    finally:
        await site_runner.cleanup()
    assert status == 500 and "internal error" in body["error"], body
    lines = err.splitlines()
    assert len(lines) == 3, err
    events = [json.loads(line) for line in lines]
    assert events[0]["event"] == "http.unhandled_error"
    assert events[0]["path"] == "/jobs/test-job/runs"
    assert "Traceback" in events[0]["exception"] and "InterfaceError" in events[0]["exception"]
    assert events[2]["logger"] == "aiohttp.server" and events[2]["level"] == "error"
    assert "ValueError: from a library" in events[2]["exception"]


async def test_loop_errors_are_json_and_accept_failures_one_line_a_minute(
    capfd: pytest.CaptureFixture[str],
) -> None:
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    now = [0.0]
    with json_logs():
        logs.watch_loop(loop, clock=lambda: now[0])
        try:
            capfd.readouterr()
            for second in range(1000):  # asyncio retries accept() about once a second
                now[0] = float(second)
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    }
                )
            try:
                raise RuntimeError("nobody awaited me")
            except RuntimeError as exc:
                loop.call_exception_handler({"message": "Task exception", "exception": exc})
            err = capfd.readouterr().err
        finally:
            loop.set_exception_handler(previous)
    events = [json.loads(line) for line in err.splitlines()]
    accepts = [e for e in events if e["event"] == "http.accept_failed"]
    assert len(accepts) == 17  # seconds 0, 60, ..., 960
    assert accepts[0]["repeated_since_last"] == 0 and accepts[1]["repeated_since_last"] == 59
    assert "Too many open files" in accepts[0]["error"]
    [other] = [e for e in events if e["event"] == "asyncio.error"]
    assert "RuntimeError: nobody awaited me" in other["exception"]
    assert len(events) == 18


@contextmanager
def json_logs() -> Iterator[None]:
    """kontod's JSON logging for the length of a test, then the test suite's own again."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.configure("json", "info")
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers, root.level = handlers, level


async def test_slow_clients_cannot_hold_kontod(dsn: str, tmp_path: Path) -> None:
    """A real kontod: many connections that never finish their headers are closed after the
    header timeout, and /health answers while they are held."""
    port = free_port()
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("KONTOD_") or k == "KONTOD_DVF_URL"
        },
        "KONTOD_DATABASE_URL": dsn,
        "KONTOD_LISTEN": f"127.0.0.1:{port}",
        "KONTOD_STATE_DIR": str(tmp_path),
        "KONTOD_LOG_FORMAT": "json",
        # Long enough for the connections below to be open at once on a busy machine.
        "KONTOD_HTTP_HEADER_TIMEOUT": "10",
        # No run starts by itself: a catch-up run's connections would share the file limit.
        "KONTOD_SNAPSHOT_SCHEDULE": quiet_schedule(),
        "KONTOD_REFRESH_SCHEDULE": quiet_schedule(),
    }

    def few_files() -> None:
        # 128 descriptors: the default cap of 256 connections must come down to 64 by itself.
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    log_path = tmp_path / "kontod.log"
    with log_path.open("w") as log_file:
        proc = await asyncio.create_subprocess_exec(
            kontod_script(),
            "run",
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=few_files,
        )
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        async with asyncio.timeout(60):
            while "http.listening" not in log_path.read_text():
                assert proc.returncode is None, log_path.read_text()
                await asyncio.sleep(0.1)
        for _ in range(200):  # more than the cap, and more than the file limit
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: kontod\r\nX-Slow: ")
            await writer.drain()
            held.append((reader, writer))
        # The newest connections are still open, and a health check gets through them.
        async with asyncio.timeout(30):
            status, body = await get(f"http://127.0.0.1:{port}/health")
        assert (status, body["status"]) == (200, "healthy")
        # Every held connection is closed by kontod without an answer: the oldest made room,
        # the rest ran out of time.
        async with asyncio.timeout(30):
            for reader, _ in held:
                with suppress(ConnectionResetError):
                    assert await reader.read() == b""
        assert (await get(f"http://127.0.0.1:{port}/health"))[0] == 200
    finally:
        for _, writer in held:
            writer.close()
        if proc.returncode is None:
            proc.terminate()
        code = await asyncio.wait_for(proc.wait(), timeout=40)
    text = log_path.read_text()
    assert code == 0, text
    events = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    names = [e["event"] for e in events]
    assert "http.connection_cap_reached" in names and "http.accept_failed" not in names
    [lowered] = [e for e in events if e["event"] == "http.connection_cap_lowered"]
    assert (lowered["wanted"], lowered["cap"], lowered["file_limit"]) == (256, 64, 128)
