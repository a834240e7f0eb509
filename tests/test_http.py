"""The HTTP surface over real loopback HTTP, with the daemon and PostgreSQL running for real."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kontod.job import RunContext
from kontod.jobs import declare_jobs
from kontod.metrics import Metrics
from tests.daemon_harness import TOKEN, running_daemon, runs_of, settings_for
from tests.helpers import add_user, spec, wait_for
from tests.programs import require_program

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
    def build(pool: asyncpg.Pool, http: aiohttp.ClientSession, _: Metrics | None) -> Any:
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
            assert names == ["daily-snapshots", "refresh-stale-connections"]
            for job in body["jobs"]:
                assert set(job) >= OLD_FIELDS | NEW_FIELDS
            snapshots, refresh = body["jobs"]
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
    async with running_daemon(settings_for(dsn, admin_token=token), lambda *_: jobs) as (_, base):
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
