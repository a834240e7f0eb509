"""Cron maths: pure functions of (expression, zone, instant). Imports nothing of kontod.

Ticks are computed in the job's zone with cronsim (the engine aiocron uses), which follows
cron's rules at daylight-saving changes: a tick inside the skipped hour fires once right after
the jump, a tick inside the repeated hour fires once. Results are aware datetimes in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from cronsim import CronSim


def next_tick(expr: str, tz: ZoneInfo, after: datetime) -> datetime:
    """The first scheduled instant strictly after ``after``."""
    local = after.astimezone(tz).replace(microsecond=0)
    return next(CronSim(expr, local)).astimezone(UTC)


def previous_tick(expr: str, tz: ZoneInfo, at: datetime) -> datetime:
    """The most recent scheduled instant at or before ``at``."""
    # cronsim's reverse iteration starts strictly before its start; one second later makes
    # the bound inclusive for whole-second instants.
    local = (at.astimezone(tz) + timedelta(seconds=1)).replace(microsecond=0)
    prev = next(CronSim(expr, local, reverse=True)).astimezone(UTC)
    # In reverse, a tick inside a skipped hour would be reported at its imaginary time;
    # forward iteration from just before it gives the instant it really fires.
    return next_tick(expr, tz, prev - timedelta(seconds=1))


def ticks_between(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """Every tick in (start, end], for tests and reports."""
    out: list[datetime] = []
    t = next_tick(expr, tz, start)
    while t <= end:
        out.append(t)
        t = next_tick(expr, tz, t)
    return out
