"""Cron maths: pure functions of (expression, zone, instant). Imports nothing of kontod.

Ticks are computed in the job's zone with cronsim (the engine aiocron uses), which follows
cron's rules at daylight-saving changes: a tick inside the skipped hour fires once right after
the jump, a tick inside the repeated hour fires once. Results are aware datetimes in UTC.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from cronsim import CronSim


def _fields(expr: str) -> list[str]:
    parts = expr.split()
    return parts[1:] if len(parts) == 6 else parts


def is_fixed_time(expr: str) -> bool:
    """Whether the schedule names its minutes and hours (no ``*`` in either field).

    Like cron, a fixed-time schedule runs once in an hour that the clock repeats; a schedule
    with a wildcard there runs in both passes.
    """
    minute, hour = _fields(expr)[:2]
    return not (minute.startswith("*") or hour.startswith("*"))


def _second_pass(instant: datetime, tz: ZoneInfo) -> bool:
    """Whether ``instant`` falls in the second pass of a wall-clock hour the zone repeats."""
    local = instant.astimezone(tz)
    return bool(local.fold) and local.replace(fold=0).utcoffset() != local.utcoffset()


def _candidates(expr: str, tz: ZoneInfo, after: datetime) -> Iterator[datetime]:
    """cronsim's ticks from ``after`` on, in UTC, strictly later than ``after``."""
    local = after.astimezone(tz).replace(microsecond=0)
    for tick in CronSim(expr, local):
        instant = tick.astimezone(UTC)
        # From inside a repeated hour cronsim may answer with an instant already past.
        if instant > after:
            yield instant


def next_tick(expr: str, tz: ZoneInfo, after: datetime) -> datetime:
    """The first scheduled instant strictly after ``after``."""
    fixed = is_fixed_time(expr)
    for instant in _candidates(expr, tz, after):
        if fixed and _second_pass(instant, tz):
            continue  # the same wall-clock time already fired in the first pass
        return instant
    raise AssertionError("a cron schedule has no end")


def previous_tick(expr: str, tz: ZoneInfo, at: datetime) -> datetime:
    """The most recent scheduled instant at or before ``at``."""
    # cronsim's reverse iteration gives a nearby earlier tick (at an imaginary time inside a
    # skipped hour, or one pass too early in a repeated hour); stepping forward from just before
    # it with next_tick's rules finds the real last tick.
    # One second later in absolute time (adding it to a wall-clock time could cross into the
    # second pass of a repeated hour).
    local = (at.astimezone(UTC) + timedelta(seconds=1)).astimezone(tz).replace(microsecond=0)
    candidate = next(CronSim(expr, local, reverse=True))
    if is_fixed_time(expr):
        candidate = candidate.replace(fold=0)  # a repeated wall-clock time fires in its first pass
    candidate = candidate.astimezone(UTC)
    last = tick = next_tick(expr, tz, min(candidate, at) - timedelta(seconds=1))
    while tick <= at:
        last = tick
        tick = next_tick(expr, tz, tick)
    return last


def ticks_between(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """Every tick in (start, end], for tests and reports."""
    out: list[datetime] = []
    t = next_tick(expr, tz, start)
    while t <= end:
        out.append(t)
        t = next_tick(expr, tz, t)
    return out
