"""The one place where kontod's jobs are declared: name, schedule, grace, limits, body."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import aiohttp
import asyncpg

from kontod.config import Settings
from kontod.job import JobSpec, RunContext
from kontod.jobs import snapshots

SNAPSHOTS = "daily-snapshots"
REFRESH = "refresh-stale-connections"


def declare_jobs(
    settings: Settings,
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession | None = None,
    observe_request: Callable[[str, str, float], None] | None = None,
) -> list[JobSpec]:
    """Both jobs, wired to the database and the settings."""
    return [
        JobSpec(
            name=SNAPSHOTS,
            schedule=settings.snapshot_schedule,
            body=snapshots.make_body(pool, settings.tz, settings.snapshot_batch_size),
            grace=timedelta(hours=1),
            max_runtime=timedelta(hours=2),
            catchup_window=timedelta(hours=20),
            description="wealth snapshot of every user, once a day",
        ),
        JobSpec(
            name=REFRESH,
            schedule=settings.refresh_schedule,
            body=_idle,
            grace=timedelta(minutes=30),
            max_runtime=timedelta(hours=5),
            catchup_window=timedelta(hours=5),
            description="refresh of stale bank connections through Powens",
            not_configured="the refresh job's body is not built yet",
        ),
    ]


async def _idle(ctx: RunContext) -> None:
    """What an unconfigured job does if it is ever run by hand: nothing."""
