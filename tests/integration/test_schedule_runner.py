"""The runner under a wall clock that jumps: a suspend over one tick or several days, and the
clock changes of Europe/Paris. The clock is the runner's injected one; PostgreSQL is real.

A check that nothing more ran waits first for housekeeping rounds (each wakes the schedule
loops, which then re-read the clock and the run table), not for a number of seconds.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta

import asyncpg

from kontod.scheduler.runner import Runner
from tests.helpers import close, runner_on, spec, wait_for

LEASE_S = 3.0  # housekeeping, and so a wake of the schedule loops, every second


class Clock:
    """A wall clock that stands still until the test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Rounds:
    """Counts the runner's housekeeping rounds, each of which wakes its schedule loops."""

    def __init__(self, runner: Runner) -> None:
        self.count = 0
        self._changed = asyncio.Event()
        runner.history.on_refresh(self._seen)

    def _seen(self) -> None:
        self.count += 1
        self._changed.set()

    async def wait(self, n: int = 3) -> None:
        """Return once ``n`` more rounds have passed."""
        target = self.count + n
        async with asyncio.timeout(20):
            while self.count < target:
                self._changed.clear()
                await self._changed.wait()


async def scheduled(dsn: str) -> list[tuple[str, datetime, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT trigger, scheduled_for, status FROM kontod_runs ORDER BY id"
        )
    finally:
        await conn.close()
    return [(r["trigger"], r["scheduled_for"], r["status"]) for r in rows]


async def runs_are(dsn: str, want: list[tuple[str, datetime, str]]) -> bool:
    return await scheduled(dsn) == want


def utc(year: int, month: int, day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


async def walk(
    dsn: str, expr: str, start: datetime, steps: list[tuple[datetime, list[tuple[str, datetime]]]]
) -> None:
    """Start a runner of ``expr`` (Europe/Paris) at ``start``; then for each step, set the
    clock and check that the runs are exactly the ones listed, and stay so."""
    clock = Clock(start)
    runner, _ = await runner_on(dsn, [spec(schedule=expr)], clock=clock, lease_s=LEASE_S)
    rounds = Rounds(runner)
    try:
        await runner.start()
        await rounds.wait(2)
        assert await scheduled(dsn) == []
        for when, expected in steps:
            clock.now = when
            want = [(trigger, tick, "success") for trigger, tick in expected]
            await wait_for(functools.partial(runs_are, dsn, want), timeout=10)
            await rounds.wait(2)
            assert await scheduled(dsn) == want, when
    finally:
        await close(runner)


async def test_a_suspend_over_a_tick_runs_it_once_on_waking(dsn: str) -> None:
    # Asleep at 01:00 in Paris, awake at 05:00: the 02:00 tick runs once, as the one awaited.
    tick = utc(2026, 6, 10, 0)
    await walk(
        dsn,
        "0 2 * * *",
        utc(2026, 6, 9, 23),
        [
            (utc(2026, 6, 10, 3), [("schedule", tick)]),
            (utc(2026, 6, 10, 3, 1), [("schedule", tick)]),
        ],
    )


async def test_a_suspend_over_several_days_runs_only_the_newest_tick(dsn: str) -> None:
    # Asleep on the 10th before 02:00, awake on the 12th at 05:00: only the 12th's tick runs.
    await walk(
        dsn,
        "0 2 * * *",
        utc(2026, 6, 9, 23),
        [(utc(2026, 6, 12, 3), [("catchup", utc(2026, 6, 12, 0))])],
    )


async def test_the_tick_the_clock_skips_runs_once_right_after_the_jump(dsn: str) -> None:
    # 2026-03-29 in Paris: 02:00 CET becomes 03:00 CEST; the 02:30 tick runs at 03:00.
    moved = utc(2026, 3, 29, 1)
    await walk(
        dsn,
        "30 2 * * *",
        utc(2026, 3, 29, 0, 59, 58),
        [
            (moved + timedelta(seconds=1), [("schedule", moved)]),
            (utc(2026, 3, 29, 2, 0), [("schedule", moved)]),
        ],
    )


async def test_the_tick_in_repeated_time_runs_once_in_the_first_pass(dsn: str) -> None:
    # 2026-10-25 in Paris: 03:00 CEST becomes 02:00 CET; 02:30 comes twice and runs once.
    first = utc(2026, 10, 25, 0, 30)
    await walk(
        dsn,
        "30 2 * * *",
        utc(2026, 10, 25, 0, 29),
        [
            (first + timedelta(seconds=1), [("schedule", first)]),
            (utc(2026, 10, 25, 1, 30, 1), [("schedule", first)]),  # 02:30 CET, the second pass
            (utc(2026, 10, 25, 2, 0), [("schedule", first)]),
        ],
    )


async def test_a_wildcard_tick_in_repeated_time_runs_in_both_passes(dsn: str) -> None:
    # The same night, `*/30 2 * * *`: 02:00 and 02:30 at +02:00, then both again at +01:00.
    ticks = [utc(2026, 10, 25, 0), utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1)]
    ticks.append(utc(2026, 10, 25, 1, 30))
    steps = [
        (tick + timedelta(seconds=1), [("schedule", t) for t in ticks[: i + 1]])
        for i, tick in enumerate(ticks)
    ]
    await walk(dsn, "*/30 2 * * *", utc(2026, 10, 24, 23, 59), steps)
