"""The daemon's own lifetime: it serves until asked to stop, or exits 1 if a side task dies."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import pytest

from kontod import db
from kontod.cli.main import _database
from kontod.daemon import Daemon, assemble, run_until_stopped
from kontod.ops.systemd import Notifier
from kontod.providers.powens import Observer
from kontod.scheduler import schedule
from kontod.scheduler.contract import JobSpec
from kontod.scheduler.runner import utcnow
from tests.daemon_harness import running_daemon, runs_of, settings_for
from tests.helpers import PARIS, quiet_schedule, spec


async def test_daemon_exits_1_when_a_schedule_loop_ends(dsn: str) -> None:
    jobs = [spec(schedule=quiet_schedule(), catchup=0)]
    daemon = Daemon(settings_for(dsn), jobs=lambda *_: jobs, notifier=Notifier.from_env({}))
    await daemon.start()
    serving = asyncio.create_task(run_until_stopped(daemon, asyncio.Event()))
    await asyncio.sleep(0.1)
    assert not serving.done()
    daemon.side_tasks()[0].cancel()  # as if the schedule loop had died
    assert await asyncio.wait_for(serving, timeout=20) == 1


async def test_daemon_exits_0_when_asked_to_stop(dsn: str) -> None:
    daemon = Daemon(
        settings_for(dsn),
        jobs=lambda *_: [spec(schedule=quiet_schedule())],
        notifier=Notifier.from_env({}),
    )
    await daemon.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(run_until_stopped(daemon, stop))
    stop.set()
    assert await asyncio.wait_for(serving, timeout=20) == 0


@pytest.mark.parametrize("month", range(1, 13))
def test_the_quiet_schedule_has_no_tick_near_any_day(month: int) -> None:
    for day, hour in ((1, 0), (15, 12), (28, 23)):
        now = datetime(2026, month, day, hour, tzinfo=UTC)
        expr = quiet_schedule(now)
        for zone in (PARIS, ZoneInfo("Pacific/Kiritimati"), ZoneInfo("Pacific/Pago_Pago")):
            assert now - schedule.previous_tick(expr, zone, now) > timedelta(days=60), expr
            assert schedule.next_tick(expr, zone, now) - now > timedelta(days=60), expr


async def test_the_harness_refuses_a_daemon_that_could_start_a_run_by_itself(dsn: str) -> None:
    # 03:00 in Paris, an hour after the snapshot's tick: inside its 20 h catch-up window.
    at_three = datetime(2026, 12, 7, 2, tzinfo=UTC)
    async with running_daemon(settings_for(dsn), clock=lambda: at_three) as (daemon, _):
        assert daemon.pool is not None
        assert await runs_of(daemon.pool, "daily-snapshots") == []
    settings = settings_for(dsn, snapshots={"schedule": "0 2 * * *"})
    with pytest.raises(AssertionError, match="daily-snapshots on '0 2 \\* \\* \\*' may start"):
        async with running_daemon(settings, clock=lambda: at_three):
            pass


async def test_each_part_is_wired_by_its_constructor_and_nothing_starts(dsn: str) -> None:
    seen: list[Observer] = []

    def jobs(pool: asyncpg.Pool, http: aiohttp.ClientSession, observe: Observer) -> list[JobSpec]:
        seen.append(observe)
        return [spec(schedule=quiet_schedule(), catchup=0)]

    settings = settings_for(dsn)
    pool = await db.create_pool(dsn, settings.runner.instance, max_size=2)
    before = asyncio.all_tasks()
    try:
        async with aiohttp.ClientSession() as http:
            parts = await assemble(settings, pool, http, jobs, utcnow, Notifier.from_env({}))
            assert asyncio.all_tasks() == before
            assert parts.runner.history is parts.history
            assert parts.runner.events is parts.instruments
            assert parts.runner.observers == (parts.board, parts.pinger)
            # What the provider client reports from inside a job reaches the daemon's registry.
            [observe] = seen
            observe("/users/me/connections", "200", 0.2)
            sample = parts.registry.get_sample_value
            labels = {"endpoint": "/users/me/connections", "code": "200"}
            assert sample("kontod_provider_requests_total", labels) == 1
    finally:
        await pool.close()


async def test_the_daemon_and_the_commands_open_pools_of_one_size(dsn: str) -> None:
    settings = settings_for(dsn, snapshots={"workers": 5})
    async with _database(settings) as pool:
        command = pool.get_max_size()
    async with running_daemon(settings) as (daemon, _):
        assert daemon.pool is not None
        assert daemon.pool.get_max_size() == command == db.pool_size(5)
