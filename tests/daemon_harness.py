"""A kontod daemon started in-process on loopback, for tests that talk HTTP to it.

Every daemon started here follows a quiet schedule (``quiet_schedule``) unless the test asks
otherwise: whatever the time of day, no catch-up run and no scheduled run starts by itself, so
a manual run the test asks for is never refused because the day's catch-up run holds the job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from kontod.config import Settings
from kontod.daemon import Daemon, JobsFactory
from kontod.ops.systemd import Notifier
from kontod.providers.powens import Observer
from kontod.scheduler import schedule
from kontod.scheduler.contract import JobSpec
from kontod.scheduler.runner import utcnow
from tests.helpers import UNREACHABLE_DVF_URL, quiet_schedule, wait_for

TOKEN = "s3cret-admin-token"
# A test lasts far less than this: a tick further away than it cannot start during one.
QUIET_AHEAD = timedelta(days=7)


def settings_for(dsn: str, **changes: Mapping[str, Any]) -> Settings:
    """Settings of a loopback daemon on ``dsn`` whose jobs follow the quiet schedule, the DVF
    files at an address nothing answers (a test gives its sandbox's); ``changes`` are fields
    by section, as ``Settings.replace`` takes them."""
    quiet = quiet_schedule()
    base = Settings().replace(
        database={"url": dsn, "state_dir": Path("/nonexistent")},
        http={"listen": ("127.0.0.1", 0), "admin_token": TOKEN},
        runner={"timezone": "Europe/Paris", "shutdown_timeout": timedelta(seconds=2)},
        logging={"format": "console"},
        snapshots={"schedule": quiet},
        refresh={"schedule": quiet},
        estimations={"schedule": quiet, "dvf_url": UNREACHABLE_DVF_URL},
        audit={"schedule": quiet},
    )
    return base.replace(**changes)


def quieted(jobs: JobsFactory) -> JobsFactory:
    """The same jobs, each on the quiet schedule."""

    def build(pool: asyncpg.Pool, http: aiohttp.ClientSession, observe: Observer) -> list[JobSpec]:
        quiet = quiet_schedule()
        return [dataclasses.replace(s, schedule=quiet) for s in jobs(pool, http, observe)]

    return build


def check_quiet(daemon: Daemon, now: datetime) -> None:
    """Fail unless no job of ``daemon`` can start a run by itself during a test from ``now``:
    its newest tick is outside its catch-up window and its next one far ahead."""
    assert daemon.runner is not None
    for spec in daemon.runner.jobs.values():
        previous = schedule.previous_tick(spec.schedule, daemon.runner.tz, now)
        following = schedule.next_tick(spec.schedule, daemon.runner.tz, now)
        assert now - previous > spec.catchup_window and following - now > QUIET_AHEAD, (
            f"{spec.name} on {spec.schedule!r} may start a run by itself at {now.isoformat()}"
        )


@asynccontextmanager
async def running_daemon(
    settings: Settings,
    jobs: JobsFactory | None = None,
    clock: Callable[[], datetime] = utcnow,
    *,
    quiet: bool = True,
) -> AsyncIterator[tuple[Daemon, str]]:
    """Yield the daemon and its base URL; stop it afterwards.

    With ``quiet`` (the default) the given jobs are put on the quiet schedule, and the start
    fails if any job (one built from ``settings`` too) could still start a run by itself.
    """
    if quiet and jobs is not None:
        jobs = quieted(jobs)
    daemon = Daemon(settings, jobs=jobs, clock=clock, notifier=Notifier.from_env({}))
    await daemon.start()
    try:
        if quiet:
            check_quiet(daemon, clock())
        yield daemon, f"http://127.0.0.1:{daemon.port}"
    finally:
        await daemon.stop()


async def runs_of(pool: asyncpg.Pool, job: str) -> list[tuple[str, str]]:
    """(trigger, status) of every run of ``job``, oldest first."""
    rows = await pool.fetch(
        "SELECT trigger, status FROM kontod_runs WHERE job = $1 ORDER BY id", job
    )
    return [(r["trigger"], r["status"]) for r in rows]


async def run_ended(daemon: Daemon, job: str, run_id: int) -> str:
    """Wait until run ``run_id`` of ``job`` is recorded and over in this daemon; its status.

    The run was claimed before its id was known, so ``active`` already held it: once both
    the row and the runner say it is over, nothing of it is left to happen.
    """
    assert daemon.pool is not None and daemon.runner is not None
    pool, runner = daemon.pool, daemon.runner

    async def over() -> bool:
        status = await pool.fetchval("SELECT status FROM kontod_runs WHERE id = $1", run_id)
        return status not in (None, "running") and runner.active(job) is None

    await wait_for(over)
    status: str = await pool.fetchval("SELECT status FROM kontod_runs WHERE id = $1", run_id)
    return status
