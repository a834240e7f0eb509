"""Cron maths: ticks in a zone, with cron's rules at daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from kontod.schedule import next_tick, previous_tick, ticks_between
from tests.helpers import PARIS


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(ticks: list[datetime]) -> list[str]:
    return [t.astimezone(PARIS).isoformat() for t in ticks]


@pytest.mark.parametrize(
    ("expr", "start", "end", "expected"),
    [
        # 2026-03-29: Paris jumps from 02:00 to 03:00. A 02:30 tick runs once, right after.
        ("30 2 * * *", utc(2026, 3, 28, 12), utc(2026, 3, 29, 12), ["2026-03-29T03:00:00+02:00"]),
        ("0 2 * * *", utc(2026, 3, 28, 12), utc(2026, 3, 29, 12), ["2026-03-29T03:00:00+02:00"]),
        # Ticks outside the gap keep their wall-clock time.
        ("0 2 * * *", utc(2026, 3, 29, 12), utc(2026, 3, 30, 12), ["2026-03-30T02:00:00+02:00"]),
        # 2026-10-25: 02:00-03:00 happens twice. A 02:30 tick runs once, not twice.
        ("30 2 * * *", utc(2026, 10, 24, 12), utc(2026, 10, 25, 12), ["2026-10-25T02:30:00+02:00"]),
        ("0 2 * * *", utc(2026, 10, 24, 12), utc(2026, 10, 25, 12), ["2026-10-25T02:00:00+02:00"]),
        # Every six hours across both changes: local hours 0, 6, 12, 18.
        (
            "0 */6 * * *",
            utc(2026, 3, 28, 20),
            utc(2026, 3, 29, 13),
            ["2026-03-29T00:00:00+01:00", "2026-03-29T06:00:00+02:00", "2026-03-29T12:00:00+02:00"],
        ),
        (
            "0 */6 * * *",
            utc(2026, 10, 24, 20),
            utc(2026, 10, 25, 12),
            ["2026-10-25T00:00:00+02:00", "2026-10-25T06:00:00+01:00", "2026-10-25T12:00:00+01:00"],
        ),
    ],
)
def test_ticks_at_daylight_saving_changes(
    expr: str, start: datetime, end: datetime, expected: list[str]
) -> None:
    assert local(ticks_between(expr, PARIS, start, end)) == expected


def test_six_fields_have_seconds_first() -> None:
    assert next_tick("*/15 * * * * *", PARIS, utc(2026, 1, 1, 0, 0, 1)) == utc(2026, 1, 1, 0, 0, 15)


def test_next_is_strictly_after_and_previous_is_inclusive() -> None:
    tick = utc(2026, 6, 1, 0)  # 02:00 in Paris (summer)
    assert next_tick("0 2 * * *", PARIS, tick) == utc(2026, 6, 2, 0)
    assert previous_tick("0 2 * * *", PARIS, tick) == tick
    assert previous_tick("0 2 * * *", PARIS, utc(2026, 6, 1, 7)) == tick
    assert previous_tick("0 2 * * *", PARIS, utc(2026, 5, 31, 23, 59, 59)) == utc(2026, 5, 31, 0)


def test_previous_tick_in_the_skipped_hour_is_when_it_really_fired() -> None:
    assert previous_tick("30 2 * * *", PARIS, utc(2026, 3, 29, 6)) == utc(2026, 3, 29, 1)


@pytest.mark.parametrize("expr", ["30 2 * * *", "0 2 * * *", "0 30 2 * * *", "0 0 2 * * *"])
@pytest.mark.parametrize(
    "start",
    [
        utc(2026, 10, 24, 20),  # before the change
        utc(2026, 10, 25, 0, 45),  # 02:45, first pass
        utc(2026, 10, 25, 1, 5),  # 02:05, second pass
    ],
)
def test_fixed_time_tick_in_the_repeated_hour_fires_once(expr: str, start: datetime) -> None:
    ticks = ticks_between(expr, PARIS, start, utc(2026, 10, 26, 12))
    assert all(t > start for t in ticks)
    wall = [t.astimezone(PARIS).strftime("%d %H:%M") for t in ticks]
    assert len(wall) == len(set(wall))
    assert wall[-1].startswith("26 ")


def test_wildcard_hour_fires_in_both_passes() -> None:
    ticks = ticks_between("0 * * * *", PARIS, utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 1, 30))
    assert local(ticks) == ["2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00"]


@pytest.mark.parametrize(
    ("expr", "at", "expected"),
    [
        # From inside the repeated hour, the last tick is the first-pass one, not yesterday's.
        ("30 2 * * *", utc(2026, 10, 25, 1, 5), utc(2026, 10, 25, 0, 30)),
        ("*/15 * * * *", utc(2026, 10, 25, 1, 5), utc(2026, 10, 25, 1, 0)),
        ("*/15 * * * *", utc(2026, 10, 25, 0, 50), utc(2026, 10, 25, 0, 45)),
    ],
)
def test_previous_tick_inside_the_repeated_hour(
    expr: str, at: datetime, expected: datetime
) -> None:
    assert previous_tick(expr, PARIS, at) == expected


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York", "Australia/Lord_Howe"])
@pytest.mark.parametrize(
    "expr", ["30 2 * * *", "0 30 2 * * *", "* * * * *", "*/15 * * * *", "0 */6 * * *"]
)
@pytest.mark.parametrize("month", [3, 4, 10, 11])
def test_previous_and_next_tick_agree_around_every_change(zone: str, expr: str, month: int) -> None:
    tz = ZoneInfo(zone)
    at = datetime(2026, month, 1, tzinfo=UTC)
    for _ in range(31 * 24):  # every hour and 7 seconds of the month, and the minutes next to it
        for probe in (
            at,
            at + timedelta(minutes=29, seconds=59),
            at + timedelta(minutes=59, seconds=59),
        ):
            prev = previous_tick(expr, tz, probe)
            assert prev <= probe
            assert next_tick(expr, tz, prev) > probe
        at += timedelta(hours=1, seconds=7)


@pytest.mark.parametrize(
    ("zone", "expr", "at", "expected"),
    [
        # The last second before the clock goes back: the tick is a minute ago, not an hour on.
        ("Europe/Paris", "* * * * *", utc(2026, 10, 25, 0, 59, 59), utc(2026, 10, 25, 0, 59)),
        # Lord Howe goes back by 30 minutes.
        ("Australia/Lord_Howe", "30 * * * *", utc(2026, 4, 4, 14, 59, 59), utc(2026, 4, 4, 14, 30)),
        # A 6-field fixed-time schedule later on the day the clock went back.
        ("Europe/Paris", "0 30 2 * * *", utc(2026, 10, 25, 11), utc(2026, 10, 25, 0, 30)),
    ],
)
def test_previous_tick_just_before_and_after_the_clock_goes_back(
    zone: str, expr: str, at: datetime, expected: datetime
) -> None:
    assert previous_tick(expr, ZoneInfo(zone), at) == expected
