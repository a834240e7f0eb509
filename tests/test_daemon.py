"""The daemon's own lifetime: it serves until asked to stop, or exits 1 if a side task dies."""

from __future__ import annotations

import asyncio

from kontod.daemon import Daemon, run_until_stopped
from kontod.systemd import Notifier
from tests.daemon_harness import settings_for
from tests.helpers import quiet_schedule, spec


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
