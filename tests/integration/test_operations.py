"""Pauses, suspicious success, progress and who asked for a run: database, runner and HTTP."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from kontod.jobs import snapshots
from kontod.ops import suspicion
from kontod.ops.board import progress_of
from kontod.ops.suspicion import Sample, Thresholds
from kontod.scheduler import pauses, runlist
from kontod.scheduler.contract import JobSpec, RunContext, SkipReason
from kontod.scheduler.runner import Skipped, Started
from tests.daemon_harness import running_daemon, settings_for
from tests.helpers import PARIS, add_user, close, runner_on, spec, wait_for
from tests.integration.test_http import AUTH, get, post, samples

TICK = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # 02:00 in Paris


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_a_pause_on_one_replica_makes_the_other_skip_ticks_until_resumed(dsn: str) -> None:
    clock = Clock(TICK)
    a, _ = await runner_on(dsn, [spec(catchup=0)], clock=clock)
    b, b_events = await runner_on(dsn, [spec(catchup=0)], clock=clock)
    try:
        await a.prepare()
        await b.prepare()
        await pauses.pause(a.pool, "test-job", "database upgrade", "cli:ops@a", TICK)
        outcome = await b.trigger("test-job", "schedule", TICK)
        assert outcome == Skipped(SkipReason.PAUSED)
        assert b_events.skipped[("test-job", "paused")] == 1
        # A manual run of a paused job is still allowed, and says who asked and why.
        manual = await b.trigger("test-job", "manual", requested_by="cli:ops@b", reason="check")
        assert isinstance(manual, Started)
        assert await manual.task == "success"
        [run] = await runlist.runs_of(b.pool, "test-job", 5)
        assert (run.trigger, run.requested_by, run.reason) == ("manual", "cli:ops@b", "check")
        ended = await pauses.resume(b.pool, "test-job", "cli:ops@b", TICK)
        assert ended is not None and ended.reason == "database upgrade"
        outcome = await a.trigger("test-job", "schedule", TICK + timedelta(days=1))
        assert isinstance(outcome, Started)
        assert await outcome.task == "success"
    finally:
        await close(a)
        await close(b)


async def test_a_paused_tick_is_skipped_once_not_at_every_wake(dsn: str) -> None:
    # Started 10 minutes after the 02:00 tick, within its catch-up window: the tick is due,
    # the job is paused. It is skipped once; the wakes of the history's rounds that follow
    # do not try it again (and resuming does not make it up).
    clock = Clock(TICK + timedelta(minutes=10))
    runner, events = await runner_on(dsn, [spec()], clock=clock)
    try:
        await runner.prepare()
        await pauses.pause(runner.pool, "test-job", "restore", "cli:ops@a", TICK)
        await runner.start()
        await wait_for(lambda: _skipped(events, 1))
        for _ in range(3):
            await runner.history.housekeeping()  # wakes every schedule loop
            await asyncio.sleep(0.1)
        await pauses.resume(runner.pool, "test-job", "cli:ops@a", clock.now)
        await runner.history.housekeeping()
        await asyncio.sleep(0.1)
        assert events.skipped[("test-job", "paused")] == 1
        assert await runlist.runs_of(runner.pool, "test-job", 5) == []
    finally:
        await close(runner)


async def _skipped(events: Any, n: int) -> bool:
    return bool(events.skipped[("test-job", "paused")] >= n)


async def test_a_pause_with_until_ends_by_itself(pool: asyncpg.Pool) -> None:
    until = TICK + timedelta(hours=2)
    held = await pauses.pause(pool, "job", "maintenance", "http 10.0.0.1", TICK, until)
    assert held.until == until
    assert await pauses.current(pool, "job", until - timedelta(seconds=1)) == held
    assert await pauses.current(pool, "job", until) is None
    state = (await pauses.states(pool, ["job"], until + timedelta(minutes=1)))["job"]
    assert (state.pause, state.last_ended_at) == (None, until)
    # An expired pause does not stand in the way of the next one.
    again = await pauses.pause(pool, "job", "again", "cli:x@y", until + timedelta(hours=1))
    assert again.until is None
    with pytest.raises(pauses.AlreadyPaused, match="already paused by cli:x@y"):
        await pauses.pause(pool, "job", "twice", "cli:z@y", until + timedelta(hours=2))
    with pytest.raises(ValueError, match="reason"):
        await pauses.pause(pool, "other", "  ", "cli:x@y", TICK)
    with pytest.raises(ValueError, match="future"):
        await pauses.pause(pool, "other", "late", "cli:x@y", TICK, TICK - timedelta(hours=1))
    assert await pauses.resume(pool, "other", "cli:x@y", TICK) is None


async def test_pause_and_resume_over_http_and_a_paused_job_is_healthy(dsn: str) -> None:
    # Registered long ago, never run: unhealthy (its tick has passed) until paused.
    async with _conn(dsn) as conn:
        await conn.execute(
            "INSERT INTO kontod_jobs (name, registered_at) VALUES ('daily-snapshots', $1)",
            datetime(2026, 6, 1, tzinfo=UTC),
        )
    jobs = [spec("daily-snapshots", catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_daemon, base):
        assert (await get(base + "/health/cron"))[0] == 503
        assert (await post(base + "/jobs/daily-snapshots/pause"))[0] == 401
        status, body = await _post_json(
            base + "/jobs/daily-snapshots/pause",
            {"reason": "restoring a backup", "by": "alice", "until": "2099-01-01T08:00"},
        )
        assert status == 200, body
        assert body["by"] == "alice (http 127.0.0.1)"
        status, report = await get(base + "/health/cron")
        assert status == 200
        [job] = report["jobs"]
        assert job["healthy"] is True and job["paused"] is True
        assert job["pausedReason"] == "restoring a backup"
        assert job["pausedBy"] == "alice (http 127.0.0.1)"
        assert job["pausedUntil"] == "2099-01-01T07:00:00.000Z"
        assert "paused by alice" in job["reason"]
        _, text = await get(base + "/metrics")
        values = samples(text)
        assert values[("kontod_job_paused", (("job_name", "daily-snapshots"),))] == 1.0
        assert values[("kontod_job_healthy", (("job_name", "daily-snapshots"),))] == 1.0
        status, body = await _post_json(base + "/jobs/daily-snapshots/pause", {"reason": "x"})
        assert status == 409 and "already paused by alice" in body["error"]
        assert (await _post_json(base + "/jobs/daily-snapshots/pause", {}))[0] == 400
        assert (await _post_json(base + "/jobs/nope/pause", {"reason": "x"}))[0] == 404
        status, body = await _post_json(base + "/jobs/daily-snapshots/resume", {})
        assert (status, body["wasPaused"]) == (200, True)
        # Resuming starts the expectation afresh (as a new check would): the ticks before are
        # not reported as missed, the next one is expected.
        status, report = await get(base + "/health/cron")
        assert (status, report["jobs"][0]["paused"], report["jobs"][0]["reason"]) == (
            200,
            False,
            None,
        )


async def test_a_pause_over_http_takes_a_duration_as_the_cli_does(dsn: str) -> None:
    jobs = [spec("daily-snapshots", catchup=0), spec("refresh-stale-connections", catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_daemon, base):
        before = datetime.now(UTC)
        status, body = await _post_json(
            base + "/jobs/daily-snapshots/pause", {"reason": "db upgrade", "until": "2h"}
        )
        after = datetime.now(UTC)
        assert status == 200, body
        until = datetime.fromisoformat(body["until"])
        # The answer rounds to the millisecond.
        assert before + timedelta(hours=2, milliseconds=-1) <= until
        assert until <= after + timedelta(hours=2)
        status, body = await _post_json(
            base + "/jobs/refresh-stale-connections/pause", {"reason": "bank down", "until": "1d"}
        )
        assert status == 200, body
        assert datetime.fromisoformat(body["until"]) - until > timedelta(hours=21)
        status, body = await _post_json(base + "/jobs/daily-snapshots/resume", {})
        assert status == 200, body
        status, body = await _post_json(
            base + "/jobs/daily-snapshots/pause", {"reason": "x", "until": "soon"}
        )
        assert (status, body["field"]) == (400, "until"), body
        assert body["error"].startswith("until 'soon': expected a time such as")
        assert "a duration such as 30m, 2h or 1d" in body["error"]
        status, body = await _post_json(
            base + "/jobs/daily-snapshots/pause", {"reason": "x", "until": "0m"}
        )
        assert (status, body["field"]) == (400, "until"), body
        assert body["error"].startswith("until must be in the future")


async def test_a_run_doing_a_tenth_of_the_usual_items_is_suspicious(dsn: str) -> None:
    async with _conn(dsn) as conn:
        # 20 earlier successes of about a minute and 1000 users each.
        await conn.execute(
            """INSERT INTO kontod_runs (job, trigger, scheduled_for, started_at, finished_at,
                                      status, counts, instance, lease_until)
               SELECT 'daily-snapshots', 'schedule', t, t, t + interval '60 seconds', 'success',
                      '{"users": 1000, "items_users": 1000}', 'kontod-old', t
                 FROM generate_series(now() - interval '30 days', now() - interval '11 days',
                                      interval '1 day') AS t"""
        )

    async def light(ctx: RunContext) -> None:
        # Every user found (a drop in users is judged on its own: see the test below), a tenth
        # of the usual items processed.
        ctx.counts["users"] += 1000
        ctx.counts["items_users"] += 100

    jobs = [spec("daily-snapshots", light, catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (daemon, base):
        assert daemon.runner is not None
        # A manual run is not judged (a re-run often has less to do); a scheduled one is.
        manual = await daemon.runner.trigger("daily-snapshots", "manual")
        assert isinstance(manual, Started) and await manual.task == "success"
        _, report = await get(base + "/health/cron")
        assert report["jobs"][0]["suspicious"] is False
        tick = await daemon.runner.trigger("daily-snapshots", "schedule", TICK)
        assert isinstance(tick, Started) and await tick.task == "success"
        await wait_for(lambda: _suspicious(base))
        status, report = await get(base + "/health/cron")
        [job] = report["jobs"]
        assert (status, job["healthy"], job["lastStatus"]) == (200, True, "success")
        assert "processed 100 items, under 0.5 of the usual 1000" in job["suspiciousReason"]
        _, text = await get(base + "/metrics")
        key = ("kontod_job_last_run_suspicious", (("job_name", "daily-snapshots"),))
        assert samples(text)[key] == 1.0


async def _suspicious(base: str) -> bool:
    _, report = await get(base + "/health/cron")
    return bool(report["jobs"][0].get("suspicious"))


def test_suspicion_compares_with_the_median_of_earlier_successes() -> None:
    usual = [Sample(3000.0, 1000)] * 10 + [Sample(10.0, 10)] * 5  # a few odd runs: the median holds
    t = Thresholds()
    assert not suspicion.assess(Sample(2900.0, 990), usual, t).suspicious
    short = suspicion.assess(Sample(500.0, 1000), usual, t)
    assert short.suspicious and short.reason == "took 500.0 s, under 0.2 of the usual 3000.0 s"
    few = suspicion.assess(Sample(3000.0, 400), usual, t)
    assert few.suspicious and "processed 400 items" in (few.reason or "")
    assert not suspicion.assess(Sample(1.0, 1), usual[:4], t).suspicious  # too little history
    assert not suspicion.assess(Sample(1.0, 1), usual, Thresholds(0, 0)).suspicious
    # Sub-second jobs: their durations are noise, only items count.
    quick = [Sample(0.05, 10)] * 10
    assert not suspicion.assess(Sample(0.001, 10), quick, t).suspicious
    assert suspicion.items_of({"users": 5, "items_ok": 3, "items_failed": 2}) == 5
    assert suspicion.items_of({"users": 5}) is None


def test_suspicious_thresholds_are_settable_per_job() -> None:
    from kontod.config import ConfigError, load_settings

    settings = load_settings(
        {
            "KONTOD_SUSPICIOUS_REFRESH_STALE_CONNECTIONS": "items=0.1",
            "KONTOD_SUSPICIOUS_DAILY_SNAPSHOTS": "off",
        },
        isatty=False,
    )
    got = suspicion.from_settings(
        {"daily-snapshots": "users", "refresh-stale-connections": None},
        settings.suspicion.thresholds,
    )
    assert (got["daily-snapshots"].duration, got["daily-snapshots"].items) == (0, 0)
    assert (got["refresh-stale-connections"].duration, got["refresh-stale-connections"].items) == (
        0.2,
        0.1,
    )
    with pytest.raises(ConfigError, match="KONTOD_SUSPICIOUS_DAILY_SNAPSHOTS='items=2'"):
        load_settings({"KONTOD_SUSPICIOUS_DAILY_SNAPSHOTS": "items=2"}, isatty=False)


async def test_progress_of_a_long_snapshot_run_moves_and_is_shown_over_http(dsn: str) -> None:
    # 30 users in batches of 10. Two snapshot rows of today, for users of the second and the
    # third batch, are held locked by open transactions: the run stops at each of those
    # batches until the test lets it go on, so its progress can be read in between.
    today = datetime.now(PARIS).date()
    async with _conn(dsn) as conn:
        for _ in range(30):
            await add_user(conn, accounts=[("checking", "100", False)])
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM users ORDER BY id")]
        await conn.executemany(
            "INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)"
            " VALUES ($1, $2, 'total', 0)",
            [(today, ids[14]), (today, ids[24])],
        )
    holders = [await asyncpg.connect(dsn) for _ in range(2)]
    held = []
    try:
        for holder, uid in zip(holders, (ids[14], ids[24]), strict=True):
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "SELECT 1 FROM patrimoine_snapshots WHERE user_id = $1 FOR UPDATE", uid
            )
            held.append(tx)

        def jobs(pool: asyncpg.Pool, *_: object) -> list[JobSpec]:
            return [spec("daily-snapshots", snapshots.make_body(pool, PARIS, 10), catchup=0)]

        async with running_daemon(settings_for(dsn), jobs) as (daemon, base):
            await post(base + "/jobs/daily-snapshots/run", AUTH)
            await wait_for(lambda: _progress_is(base, 10 / 30))
            _, report = await get(base + "/health/cron")
            first = report["jobs"][0]["progress"]
            await held[0].rollback()
            await wait_for(lambda: _progress_is(base, 20 / 30))
            _, report = await get(base + "/health/cron")
            second = report["jobs"][0]["progress"]
            _, text = await get(base + "/metrics")
            await held[1].rollback()
            assert daemon.runner is not None
            await wait_for(lambda: _finished(daemon))
    finally:
        for holder in holders:
            await holder.close()
    assert (first["done"], first["expected"]) == (10, 30)
    assert (second["done"], second["expected"]) == (20, 30)
    assert second["ratio"] > first["ratio"]
    assert second["estimatedEnd"] is not None and second["ratePerSecond"] > 0
    values = samples(text)
    assert values[("kontod_job_progress_done", (("job_name", "daily-snapshots"),))] == 20
    assert values[("kontod_job_progress_expected", (("job_name", "daily-snapshots"),))] == 30
    ratio = values[("kontod_job_progress_ratio", (("job_name", "daily-snapshots"),))]
    assert abs(ratio - 20 / 30) < 1e-9


async def _progress_is(base: str, ratio: float) -> bool:
    _, report = await get(base + "/health/cron")
    progress = report["jobs"][0].get("progress")
    return (
        progress is not None
        and progress["ratio"] is not None
        and abs(progress["ratio"] - ratio) < 1e-9
    )


def test_progress_rate_and_estimated_end() -> None:
    start = TICK
    p = progress_of(250, 1000, start, start + timedelta(seconds=50))
    assert (p.ratio, p.rate_per_s) == (0.25, 5.0)
    assert p.eta == start + timedelta(seconds=200)
    unknown = progress_of(10, None, start, start + timedelta(seconds=1))
    assert (unknown.ratio, unknown.eta) == (None, None)


async def test_a_manual_run_over_http_records_the_requester_and_reason(dsn: str) -> None:
    jobs = [spec("daily-snapshots", catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (daemon, base):
        status, _body = await _post_json(
            base + "/jobs/daily-snapshots/run", {"reason": "re-run after the fix"}
        )
        assert status == 202
        await wait_for(lambda: _finished(daemon))
        assert (await _post_json(base + "/jobs/daily-snapshots/run", {"reason": 3}))[0] == 400
        [run] = await runlist.runs_of(daemon.runner.pool, "daily-snapshots", 5)  # type: ignore[union-attr]
    assert (run.requested_by, run.reason) == ("http 127.0.0.1", "re-run after the fix")


async def _finished(daemon: object) -> bool:
    runner = daemon.runner  # type: ignore[attr-defined]
    return runner.active("daily-snapshots") is None and bool(runner.stats.get("daily-snapshots"))


async def _post_json(url: str, payload: object) -> tuple[int, Any]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=json.dumps(payload), headers=AUTH) as resp,
    ):
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


class _conn:
    """``async with _conn(dsn) as conn``: one connection, closed afterwards."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def __aenter__(self) -> asyncpg.Connection:
        self.conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()
