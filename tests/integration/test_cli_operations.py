"""The operator commands as a user runs them: runs, jobs next/pause/resume, progress."""

from __future__ import annotations

import asyncio
import io
import os
import pty
from datetime import UTC, datetime

from kontod.cli import commands
from kontod.demo.rates_sandbox import RateSandbox
from kontod.demo.rates_sandbox import urls as rate_urls
from kontod.scheduler.contract import RunContext
from kontod.scheduler.runner import Started, utcnow
from tests.helpers import PARIS, add_user, close, runner_on, spec, wait_for
from tests.integration.test_cli import kontod


async def test_pause_run_runs_and_resume_from_the_command_line(dsn: str) -> None:
    await _one_user(dsn)
    async with RateSandbox().serve() as rates_root:
        fiat, crypto = rate_urls(rates_root)
        env = {
            "KONTOD_DATABASE_URL": dsn,
            "KONTOD_TIMEZONE": "Europe/Paris",
            "KONTOD_FIAT_RATES_URL": fiat,
            "KONTOD_CRYPTO_PRICES_URL": crypto,
        }
        await _pause_run_runs_and_resume(env)


async def _pause_run_runs_and_resume(env: dict[str, str]) -> None:
    code, out, err = await kontod(
        "jobs", "pause", "daily-snapshots", "--reason", "database upgrade", "--until", "2h", env=env
    )
    assert code == 0, err
    assert "daily-snapshots: paused until" in out and "by cli:" in out and "database upgrade" in out
    code, _, err = await kontod("jobs", "pause", "daily-snapshots", "--reason", "again", env=env)
    assert code == 1 and "already paused by cli:" in err
    code, out, err = await kontod("jobs", "run", "daily-snapshots", "--reason", "check", env=env)
    assert code == 0, err
    assert "is paused by cli:" in err and "running it anyway" in err
    code, out, _ = await kontod("runs", "daily-snapshots", "--limit", "5", env=env)
    assert code == 0
    header, row, by = out.splitlines()[:3]
    assert header.split() == ["ID", "STARTED", "TRIGGER", "STATUS", "TOOK", "COUNTS"]
    assert "manual" in row and "success" in row and "  users=1 " in row
    assert by.startswith("    by cli:") and by.endswith("(check)")
    code, out, _ = await kontod("runs", "daily-snapshots", "--status", "error", env=env)
    assert (code, out.strip()) == (0, "(no error run of daily-snapshots yet)")
    code, out, _ = await kontod("jobs", "resume", "daily-snapshots", env=env)
    assert (code, out.strip()) == (0, "daily-snapshots: resumed")
    code, _, err = await kontod("runs", "nope", env=env)
    assert code == 2 and "no job named 'nope'" in err
    code, _, err = await kontod(
        "jobs", "pause", "daily-snapshots", "--reason", "x", "--until", "soon", env=env
    )
    assert code == 2 and "--until 'soon'" in err


async def _one_user(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await add_user(conn, accounts=[("checking", "10", False)])
    finally:
        await conn.close()


async def test_jobs_next_marks_the_ticks_moved_by_daylight_saving() -> None:
    env = {"KONTOD_TIMEZONE": "Europe/Paris", "KONTOD_SNAPSHOT_SCHEDULE": "30 2 * * *"}
    code, out, err = await kontod(
        "jobs", "next", "daily-snapshots", "--from", "2026-03-28T12:00", "--count", "3", env=env
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "daily-snapshots: 30 2 * * * in Europe/Paris"
    assert lines[2].startswith(
        "2026-03-29 03:00:00 +02:00  2026-03-29 01:00:00 +00:00  moved: 02:30"
    )
    assert (
        lines[3].startswith("2026-03-30 02:30:00 +02:00  2026-03-30 00:30:00 +00:00")
        and "moved" not in lines[3]
    )
    # In autumn a fixed-time tick runs once, in the first pass of the repeated hour.
    out = _next("30 2 * * *", datetime(2026, 10, 24, 12, tzinfo=UTC), 2)
    assert "2026-10-25 02:30:00 +02:00  2026-10-25 00:30:00 +00:00  once: 02:30 comes twice" in out
    assert "2026-10-25 02:30:00 +01:00" not in out
    # A wildcard schedule: the gap skips 02:30 in spring, the repeated hour runs it twice.
    spring = _next("30 * * * *", datetime(2026, 3, 29, 0, 0, tzinfo=UTC), 3)
    assert "skipped: 2026-03-29 02:30 does not exist" in spring
    autumn = _next("30 * * * *", datetime(2026, 10, 24, 23, 45, tzinfo=UTC), 3)
    assert "2026-10-25 02:30:00 +01:00  2026-10-25 01:30:00 +00:00  repeated" in autumn


def _next(expr: str, after: datetime, count: int) -> str:
    out = io.StringIO()
    commands.print_next("job", expr, PARIS, after, count, out)
    return out.getvalue()


async def test_the_progress_of_jobs_run_is_a_bar_on_a_terminal_and_lines_otherwise(
    dsn: str,
) -> None:
    steps = [asyncio.Event() for _ in range(4)]

    async def batches(ctx: RunContext) -> None:
        for i, step in enumerate(steps):
            ctx.report_progress(25 * (i + 1), 100)
            await step.wait()

    async def release() -> None:
        for step in steps:
            await asyncio.sleep(0.15)
            step.set()

    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w")
    plain = io.StringIO()
    try:
        for out in (terminal, plain):
            for step in steps:
                step.clear()
            follow = commands.Follow()
            runner, _ = await runner_on(dsn, [spec(body=batches, catchup=0)], observers=[follow])
            try:
                await runner.prepare()
                outcome = await runner.trigger("test-job", "manual")
                assert isinstance(outcome, Started)
                releasing = asyncio.create_task(release())
                await commands.show_progress(follow, outcome.task, out, utcnow, every_s=0.02)
                await releasing
                assert await outcome.task == "success"
            finally:
                await close(runner)
        screen = os.read(master, 65536).decode()
    finally:
        terminal.close()
        os.close(master)
    assert "\r\x1b[2K" in screen  # redrawn in place
    assert "test-job [########......................]  25% 25/100" in screen
    assert "test-job [##############################] 100% 100/100" in screen
    assert plain.getvalue().splitlines() == [
        "test-job: 25/100 (25%)",
        "test-job: 50/100 (50%)",
        "test-job: 75/100 (75%)",
        "test-job: 100/100 (100%)",
    ]


async def test_status_says_who_paused_a_job(dsn: str) -> None:
    from kontod.scheduler import pauses
    from tests.daemon_harness import running_daemon, settings_for

    jobs = [spec("daily-snapshots", catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (daemon, base):
        assert daemon.pool is not None
        await pauses.pause(daemon.pool, "daily-snapshots", "disk full", "cli:ops@db1", utcnow())
        await wait_for(lambda: _paused(base))  # within the board's cache time, 2 s
        code, out, _ = await kontod("status", "--url", base)
    assert code == 0, out
    assert "yes, paused by cli:ops@db1: disk full" in out


async def _paused(base: str) -> bool:
    from tests.integration.test_http import get

    _, report = await get(base + "/health/cron")
    return bool(report["jobs"][0]["paused"])
