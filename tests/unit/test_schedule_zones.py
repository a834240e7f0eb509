"""Ticks around clock changes in zones with 1-hour, 30-minute, midnight and whole-day changes.

The expected ticks are written from the rules (docs/schedules.md):
a fixed-time tick the clock skips runs once at the first instant after the jump ("moved"), a
wildcard one does not run; in a repeated interval a fixed-time tick runs in the first pass only,
a wildcard one in both (the second pass is "repeated").
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim

from kontod.scheduler import schedule
from kontod.scheduler.schedule import (
    Tick,
    clock_changes,
    next_tick,
    previous_tick,
    ticks_between,
    upcoming,
)

US = timedelta(microseconds=1)

# (zone, expression, after (local, with offset), the ticks that follow: local time and note)
TABLE: list[tuple[str, str, str, list[str]]] = [
    # Europe/Paris: 2026-03-29 02:00 -> 03:00, 2026-10-25 03:00 -> 02:00.
    ("Europe/Paris", "30 2 * * *", "2026-03-28T12:00+01:00",
     ["2026-03-29T03:00:00+02:00 moved", "2026-03-30T02:30:00+02:00"]),
    ("Europe/Paris", "0 30 2 * * *", "2026-03-28T12:00+01:00",
     ["2026-03-29T03:00:00+02:00 moved", "2026-03-30T02:30:00+02:00"]),
    ("Europe/Paris", "0,30 2 * * *", "2026-03-29T00:00+01:00",
     ["2026-03-29T03:00:00+02:00 moved", "2026-03-30T02:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
    ("Europe/Paris", "*/20 2 * * *", "2026-03-28T12:00+01:00",
     ["2026-03-30T02:00:00+02:00", "2026-03-30T02:20:00+02:00", "2026-03-30T02:40:00+02:00"]),
    ("Europe/Paris", "*/20 * * * * *", "2026-03-29T01:59:00+01:00",
     ["2026-03-29T01:59:20+01:00", "2026-03-29T01:59:40+01:00", "2026-03-29T03:00:00+02:00",
      "2026-03-29T03:00:20+02:00"]),
    ("Europe/Paris", "30 2 * * *", "2026-10-24T12:00+02:00",
     ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]),
    ("Europe/Paris", "0 30 2 * * *", "2026-10-24T12:00+02:00",
     ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]),
    ("Europe/Paris", "*/30 2 * * *", "2026-10-25T01:00+02:00",
     ["2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00",
      "2026-10-25T02:00:00+01:00 repeated", "2026-10-25T02:30:00+01:00 repeated",
      "2026-10-26T02:00:00+01:00"]),
    ("Europe/Paris", "0 15 * * * *", "2026-10-25T01:30+02:00",
     ["2026-10-25T02:15:00+02:00", "2026-10-25T02:15:00+01:00 repeated",
      "2026-10-25T03:15:00+01:00"]),
    # America/New_York: 2026-03-08 02:00 -> 03:00, 2026-11-01 02:00 -> 01:00.
    ("America/New_York", "30 2 * * *", "2026-03-07T12:00-05:00",
     ["2026-03-08T03:00:00-04:00 moved", "2026-03-09T02:30:00-04:00"]),
    ("America/New_York", "0 2 * * 0", "2026-03-07T12:00-05:00",
     ["2026-03-08T03:00:00-04:00 moved", "2026-03-15T02:00:00-04:00"]),
    ("America/New_York", "*/15 2 * * *", "2026-03-08T00:00-05:00",
     ["2026-03-09T02:00:00-04:00", "2026-03-09T02:15:00-04:00"]),
    ("America/New_York", "0 */6 * * *", "2026-03-07T20:00-05:00",
     ["2026-03-08T00:00:00-05:00", "2026-03-08T06:00:00-04:00", "2026-03-08T12:00:00-04:00"]),
    ("America/New_York", "30 1 * * *", "2026-10-31T12:00-04:00",
     ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]),
    ("America/New_York", "0 30 1 * * *", "2026-10-31T12:00-04:00",
     ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]),
    ("America/New_York", "*/30 1 * * *", "2026-10-31T12:00-04:00",
     ["2026-11-01T01:00:00-04:00", "2026-11-01T01:30:00-04:00",
      "2026-11-01T01:00:00-05:00 repeated", "2026-11-01T01:30:00-05:00 repeated",
      "2026-11-02T01:00:00-05:00"]),
    # Australia/Lord_Howe, 30-minute changes: 2026-04-05 02:00 -> 01:30, 2026-10-04 02:00 -> 02:30.
    ("Australia/Lord_Howe", "0 */6 * * *", "2026-04-04T20:00+11:00",
     ["2026-04-05T00:00:00+11:00", "2026-04-05T06:00:00+10:30", "2026-04-05T12:00:00+10:30"]),
    ("Australia/Lord_Howe", "0 */6 * * *", "2026-10-03T20:00+10:30",
     ["2026-10-04T00:00:00+10:30", "2026-10-04T06:00:00+11:00", "2026-10-04T12:00:00+11:00"]),
    ("Australia/Lord_Howe", "45 1 * * *", "2026-04-04T12:00+11:00",
     ["2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"]),
    ("Australia/Lord_Howe", "*/15 1 * * *", "2026-04-05T01:20+11:00",
     ["2026-04-05T01:30:00+11:00", "2026-04-05T01:45:00+11:00",
      "2026-04-05T01:30:00+10:30 repeated", "2026-04-05T01:45:00+10:30 repeated",
      "2026-04-06T01:00:00+10:30"]),
    ("Australia/Lord_Howe", "15 2 * * *", "2026-10-03T12:00+10:30",
     ["2026-10-04T02:30:00+11:00 moved", "2026-10-05T02:15:00+11:00"]),
    ("Australia/Lord_Howe", "0 0 2 * * *", "2026-10-03T12:00+10:30",
     ["2026-10-04T02:30:00+11:00 moved", "2026-10-05T02:00:00+11:00"]),
    ("Australia/Lord_Howe", "*/15 2 * * *", "2026-10-04T01:50+10:30",
     ["2026-10-04T02:30:00+11:00", "2026-10-04T02:45:00+11:00", "2026-10-05T02:00:00+11:00"]),
    # America/Santiago, changes at midnight: Saturday 2026-04-04 24:00 -> 23:00 (Saturday's
    # 23:00-24:00 twice), Sunday 2026-09-06 00:00 -> 01:00 (that Sunday starts at 01:00).
    ("America/Santiago", "0 23 * * *", "2026-04-04T12:00-03:00",
     ["2026-04-04T23:00:00-03:00", "2026-04-05T23:00:00-04:00"]),
    ("America/Santiago", "0 * * * 6", "2026-04-04T21:30-03:00",
     ["2026-04-04T22:00:00-03:00", "2026-04-04T23:00:00-03:00",
      "2026-04-04T23:00:00-04:00 repeated", "2026-04-11T00:00:00-04:00"]),
    ("America/Santiago", "0 0 * * 0", "2026-04-04T22:00-03:00",
     ["2026-04-05T00:00:00-04:00", "2026-04-12T00:00:00-04:00"]),
    ("America/Santiago", "0 0 * * *", "2026-09-05T12:00-04:00",
     ["2026-09-06T01:00:00-03:00 moved", "2026-09-07T00:00:00-03:00"]),
    ("America/Santiago", "0 0 0 * * *", "2026-09-05T12:00-04:00",
     ["2026-09-06T01:00:00-03:00 moved", "2026-09-07T00:00:00-03:00"]),
    ("America/Santiago", "30 0 * * 0", "2026-09-05T12:00-04:00",
     ["2026-09-06T01:00:00-03:00 moved", "2026-09-13T00:30:00-03:00"]),
    ("America/Santiago", "0 */6 * * 0", "2026-09-05T12:00-04:00",
     ["2026-09-06T06:00:00-03:00", "2026-09-06T12:00:00-03:00", "2026-09-06T18:00:00-03:00",
      "2026-09-13T00:00:00-03:00"]),
    # Asia/Beirut and America/Havana, also at midnight.
    ("Asia/Beirut", "0 0 * * 0", "2026-03-28T12:00+02:00",
     ["2026-03-29T01:00:00+03:00 moved", "2026-04-05T00:00:00+03:00"]),
    ("Asia/Beirut", "0 * * * 6", "2026-10-24T22:30+03:00",
     ["2026-10-24T23:00:00+03:00", "2026-10-24T23:00:00+02:00 repeated",
      "2026-10-31T00:00:00+02:00"]),
    ("America/Havana", "0 0 * * *", "2026-03-07T12:00-05:00",
     ["2026-03-08T01:00:00-04:00 moved", "2026-03-09T00:00:00-04:00"]),
    ("America/Havana", "*/30 0 * * *", "2026-10-31T23:50-04:00",
     ["2026-11-01T00:00:00-04:00", "2026-11-01T00:30:00-04:00",
      "2026-11-01T00:00:00-05:00 repeated", "2026-11-01T00:30:00-05:00 repeated",
      "2026-11-02T00:00:00-05:00"]),
    # Pacific/Chatham, +13:45 / +12:45: 2026-04-05 03:45 -> 02:45, 2026-09-27 02:45 -> 03:45.
    ("Pacific/Chatham", "*/30 2 * * *", "2026-04-05T01:00+13:45",
     ["2026-04-05T02:00:00+13:45", "2026-04-05T02:30:00+13:45", "2026-04-06T02:00:00+12:45"]),
    ("Pacific/Chatham", "0 30 2 * * *", "2026-04-04T12:00+13:45",
     ["2026-04-05T02:30:00+13:45", "2026-04-06T02:30:00+12:45"]),
    ("Pacific/Chatham", "0 3 * * *", "2026-04-04T12:00+13:45",
     ["2026-04-05T03:00:00+13:45", "2026-04-06T03:00:00+12:45"]),
    ("Pacific/Chatham", "*/30 3 * * *", "2026-04-05T02:50+13:45",
     ["2026-04-05T03:00:00+13:45", "2026-04-05T03:30:00+13:45",
      "2026-04-05T03:00:00+12:45 repeated", "2026-04-05T03:30:00+12:45 repeated",
      "2026-04-06T03:00:00+12:45"]),
    ("Pacific/Chatham", "0 3 * * *", "2026-09-26T12:00+12:45",
     ["2026-09-27T03:45:00+13:45 moved", "2026-09-28T03:00:00+13:45"]),
    ("Pacific/Chatham", "0 45 2 * * *", "2026-09-26T12:00+12:45",
     ["2026-09-27T03:45:00+13:45 moved", "2026-09-28T02:45:00+13:45"]),
    ("Pacific/Chatham", "*/30 3 * * *", "2026-09-27T02:00+12:45",
     ["2026-09-28T03:00:00+13:45", "2026-09-28T03:30:00+13:45"]),
    # Pacific/Apia skipped 2011-12-30 (a Friday): 2011-12-29 24:00 -10:00 -> 12-31 00:00 +14:00.
    ("Pacific/Apia", "0 */6 * * 1-5", "2011-12-29T12:00-10:00",
     ["2011-12-29T18:00:00-10:00", "2012-01-02T00:00:00+14:00"]),
    ("Pacific/Apia", "0 2 * * *", "2011-12-29T12:00-10:00",
     ["2011-12-31T00:00:00+14:00 moved", "2011-12-31T02:00:00+14:00"]),
    ("Pacific/Apia", "0,30 9,21 * * *", "2011-12-29T22:00-10:00",
     ["2011-12-31T00:00:00+14:00 moved", "2011-12-31T09:00:00+14:00"]),
    ("Pacific/Apia", "0 0 0 * * *", "2011-12-29T12:00-10:00",
     ["2011-12-31T00:00:00+14:00 moved", "2012-01-01T00:00:00+14:00"]),
    ("Pacific/Apia", "0 * * * *", "2011-12-29T22:30-10:00",
     ["2011-12-29T23:00:00-10:00", "2011-12-31T00:00:00+14:00", "2011-12-31T01:00:00+14:00"]),
]  # fmt: skip


def described(tick: Tick) -> str:
    return tick.local.isoformat() + (f" {tick.note}" if tick.note else "")


def instants(expected: list[str]) -> list[datetime]:
    return [datetime.fromisoformat(e.split()[0]).astimezone(UTC) for e in expected]


@pytest.mark.parametrize(("zone", "expr", "after", "expected"), TABLE)
def test_next_ticks_follow_the_rules(zone: str, expr: str, after: str, expected: list[str]) -> None:
    tz = ZoneInfo(zone)
    start = datetime.fromisoformat(after)
    assert [described(t) for t in upcoming(expr, tz, start, len(expected))] == expected
    ticks = instants(expected)
    assert ticks_between(expr, tz, start, ticks[-1]) == ticks
    assert [next_tick(expr, tz, t) for t in [start, *ticks[:-1]]] == ticks


@pytest.mark.parametrize(("zone", "expr", "after", "expected"), TABLE)
def test_previous_ticks_are_the_same_ticks(
    zone: str, expr: str, after: str, expected: list[str]
) -> None:
    tz = ZoneInfo(zone)
    ticks = instants(expected)
    for earlier, tick in pairwise(ticks):
        assert previous_tick(expr, tz, tick) == tick
        assert previous_tick(expr, tz, tick - US) == earlier
    assert previous_tick(expr, tz, ticks[0] - US) <= datetime.fromisoformat(after)


@pytest.mark.parametrize(
    ("zone", "expr", "at", "expected"),
    [
        # A 6-field fixed-time tick in the skipped hour ran right after the jump.
        ("Europe/Paris", "0 30 2 * * *", "2026-03-29T12:00+02:00", "2026-03-29T03:00+02:00"),
        # Lord Howe: the 06:00 tick after either change is the one that ran.
        ("Australia/Lord_Howe", "0 */6 * * *", "2026-04-05T06:30+10:30", "2026-04-05T06:00+10:30"),
        ("Australia/Lord_Howe", "0 */6 * * *", "2026-10-04T06:30+11:00", "2026-10-04T06:00+11:00"),
        # Chatham after its autumn change, until the next day.
        ("Pacific/Chatham", "*/30 2 * * *", "2026-04-05T12:00+12:45", "2026-04-05T02:30+13:45"),
        ("Pacific/Chatham", "0 30 2 * * *", "2026-04-06T01:00+12:45", "2026-04-05T02:30+13:45"),
        # Apia after its skipped Friday: the Thursday's last tick.
        ("Pacific/Apia", "0 */6 * * 1-5", "2012-01-01T12:00+14:00", "2011-12-29T18:00-10:00"),
        # From inside the second pass, a fixed-time tick later in the interval ran in the first.
        ("Europe/Paris", "50 2 * * *", "2026-10-25T02:05+01:00", "2026-10-25T02:50+02:00"),
        ("Pacific/Chatham", "30 3 * * *", "2026-04-05T03:00+12:45", "2026-04-05T03:30+13:45"),
    ],
)
def test_previous_tick_after_a_change(zone: str, expr: str, at: str, expected: str) -> None:
    tick = previous_tick(expr, ZoneInfo(zone), datetime.fromisoformat(at))
    assert tick == datetime.fromisoformat(expected)


# -- cronsim's own iterator and daylight-saving cases, through kontod's functions --------------

NOW = datetime(2020, 1, 1, tzinfo=UTC)
UTC_ZONE = ZoneInfo("UTC")


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("1 1 L * *", ["2020-01-31", "2020-02-29", "2020-03-31"]),  # last day of the month
        ("1 1 * * 5L", ["2020-01-31", "2020-02-28", "2020-03-27", "2020-04-24"]),  # last Friday
        ("1 1 * * 0L", ["2020-01-26", "2020-02-23"]),  # last Sunday, as 0 ...
        ("1 1 * * 7L", ["2020-01-26", "2020-02-23"]),  # ... and as 7
        ("1 1 * * 1#2", ["2020-01-13", "2020-02-10"]),  # second Monday
        ("1 1 LW * *", ["2020-01-31", "2020-02-28", "2020-03-31", "2020-04-30"]),  # last weekday
        # A day-of-week starting with * makes day-of-month AND day-of-week: first Sunday.
        ("1 1 1-7 * */7", ["2020-01-05", "2020-02-02", "2020-03-01", "2020-04-05"]),
        # Both restricted: day-of-month OR day-of-week (the */100 is day 1 only, but starts with
        # *, so: Mondays among the 1st-7th).
        ("1 1 */100,1-7 * MON", ["2020-01-06", "2020-02-03", "2020-03-02", "2020-04-06"]),
        ("1 1 1,15 * SUN", ["2020-01-01", "2020-01-05", "2020-01-12", "2020-01-15"]),
    ],
)
def test_cronsim_day_rules_are_kept(expr: str, expected: list[str]) -> None:
    got = [t.local for t in upcoming(expr, UTC_ZONE, NOW, len(expected))]
    assert [t.date().isoformat() for t in got] == expected
    assert all((t.hour, t.minute) == (1, 1) for t in got)


def test_an_expression_that_never_fires_is_an_error_not_a_stop() -> None:
    # The 1st of the month that is also its fourth Monday: never.
    with pytest.raises(schedule.ScheduleError, match="never fires"):
        next_tick("1 1 */100 * MON#4", UTC_ZONE, NOW)
    with pytest.raises(schedule.ScheduleError, match="never fires"):
        previous_tick("1 1 */100 * MON#4", UTC_ZONE, NOW)


# Europe/Riga, 2021: 03:00 -> 04:00 on March 28, 04:00 -> 03:00 on October 31.
RIGA = ZoneInfo("Europe/Riga")


@pytest.mark.parametrize(
    ("expr", "start", "expected"),
    [
        ("0 * * * *", "2021-03-28T01:30+02:00", ["02:00+02:00", "04:00+03:00"]),
        ("0 * * * *", "2021-10-31T01:30+03:00",
         ["02:00+03:00", "03:00+03:00", "03:00+02:00", "04:00+02:00"]),
        ("*/30 * * * *", "2021-03-28T02:10+02:00", ["02:30+02:00", "04:00+03:00", "04:30+03:00"]),
        ("*/30 * * * *", "2021-10-31T02:10+03:00",
         ["02:30+03:00", "03:00+03:00", "03:30+03:00", "03:00+02:00", "03:30+02:00",
          "04:00+02:00"]),
        ("*/15 * * * *", "2021-03-28T02:40+02:00", ["02:45+02:00", "04:00+03:00"]),
        ("*/15 * * * *", "2021-10-31T03:40+03:00",
         ["03:45+03:00", "03:00+02:00", "03:15+02:00", "03:30+02:00", "03:45+02:00",
          "04:00+02:00"]),
        ("0 */2 * * *", "2021-03-28T01:30+02:00", ["02:00+02:00", "04:00+03:00", "06:00+03:00"]),
        ("0 */2 * * *", "2021-10-31T01:30+03:00", ["02:00+03:00", "04:00+02:00", "06:00+02:00"]),
        ("30 */2 * * *", "2021-03-28T01:30+02:00", ["02:30+02:00", "04:30+03:00"]),
        ("30 */2 * * *", "2021-10-31T01:30+03:00", ["02:30+03:00", "04:30+02:00"]),
        ("0 */3 * * *", "2021-10-31T01:30+03:00", ["03:00+03:00", "03:00+02:00", "06:00+02:00"]),
        ("0 1,2,3,4,5 * * *", "2021-03-28T01:30+02:00",
         ["02:00+02:00", "04:00+03:00", "05:00+03:00"]),
        ("0 1,2,3,4,5 * * *", "2021-10-31T01:30+03:00",
         ["02:00+03:00", "03:00+03:00", "04:00+02:00"]),
        ("30 1,2,3,4,5 * * *", "2021-03-28T01:30+02:00",
         ["02:30+02:00", "04:00+03:00", "04:30+03:00"]),
        ("30 1,2,3,4,5 * * *", "2021-10-31T01:30+03:00",
         ["02:30+03:00", "03:30+03:00", "04:30+02:00"]),
        ("0 2 * * *", "2021-03-28T01:30+02:00", ["02:00+02:00", "02:00+03:00"]),
        ("0 3 * * *", "2021-03-27T01:30+02:00", ["03:00+02:00", "04:00+03:00", "03:00+03:00"]),
        ("0 3 * * *", "2021-10-31T01:30+03:00", ["03:00+03:00", "03:00+02:00"]),
        ("0 4 * * *", "2021-10-30T01:30+03:00", ["04:00+03:00", "04:00+02:00", "04:00+02:00"]),
        ("15 3 * * *", "2021-03-27T00:00+02:00", ["03:15+02:00", "04:00+03:00", "03:15+03:00"]),
        ("15 3 * * *", "2021-10-30T00:00+03:00", ["03:15+03:00", "03:15+03:00", "03:15+02:00"]),
        ("0 1,3,5,7,9,11,13,15,17,19,21,23 * * *", "2021-03-28T00:30+02:00",
         ["01:00+02:00", "04:00+03:00", "05:00+03:00"]),
        ("0 1,3,5,7,9,11,13,15,17,19,21,23 * * *", "2021-10-31T00:30+03:00",
         ["01:00+03:00", "03:00+03:00", "05:00+02:00"]),
        ("0 1-5 * * *", "2021-03-28T01:30+02:00", ["02:00+02:00", "04:00+03:00", "05:00+03:00"]),
        # Deliberate difference: a range makes the hour a wildcard here, so 03:00 runs in both
        # passes (cronsim, like Vixie cron, counts only a leading * and runs it once:
        # 02:00+03:00, 03:00+03:00, 04:00+02:00).
        ("0 1-5 * * *", "2021-10-31T01:30+03:00", ["02:00+03:00", "03:00+03:00", "03:00+02:00"]),
        ("* * * * *", "2021-03-28T02:58+02:00", ["02:59+02:00", "04:00+03:00"]),
        ("* * * * *", "2021-10-31T03:58+03:00", ["03:59+03:00", "03:00+02:00", "03:01+02:00"]),
        ("* 1-6 * * *", "2021-03-28T02:58+02:00", ["02:59+02:00", "04:00+03:00"]),
        ("* 1-6 * * *", "2021-10-31T03:58+03:00", ["03:59+03:00", "03:00+02:00", "03:01+02:00"]),
    ],
)  # fmt: skip
def test_cronsim_dst_cases(expr: str, start: str, expected: list[str]) -> None:
    got = upcoming(expr, RIGA, datetime.fromisoformat(start), len(expected))
    assert [t.local.isoformat(timespec="minutes")[11:] for t in got] == expected
    for tick in got:
        assert previous_tick(expr, RIGA, tick.at) == tick.at


# -- properties over random instants near changes --------------------------------------------

ZONES = [
    "Europe/Paris",
    "America/New_York",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Pacific/Chatham",
    "Pacific/Apia",
    "Asia/Beirut",
    "America/Havana",
]
EXPRESSIONS = [
    "0 2 * * *",
    "30 2 * * *",
    "0 */6 * * *",
    "*/30 2 * * *",
    "0 30 2 * * *",
    "* * * * *",
    "*/15 * * * *",
    "0 0 * * *",
    "0 23 * * *",
    "0 */6 * * 1-5",
    "0 * * * 6",
    "15,45 0,1,2,3 * * *",
    "0 1-3 * * *",
    "*/20 * * * * *",
    "* * 2 * * *",
    "*/10 30 2 * * *",
    "0 45 2 * * *",
]


def _changes(rng: random.Random, zone: ZoneInfo, years: int) -> list[datetime]:
    found: list[datetime] = []
    for year in rng.sample(range(2000, 2036), years):
        found += clock_changes(
            zone, datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
        )
    return found


@pytest.mark.parametrize("zone", ZONES)
def test_next_and_previous_agree_near_changes(zone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every call must find its tick within a handful of wall-clock candidates: past that the
    # walk raises, so a call that would scan (or hang) fails here.
    monkeypatch.setattr(schedule, "MAX_CANDIDATES", 4)
    rng = random.Random(f"agree {zone}")
    tz = ZoneInfo(zone)
    changes = _changes(rng, tz, 6) + clock_changes(
        tz, datetime(2011, 12, 1, tzinfo=UTC), datetime(2012, 1, 1, tzinfo=UTC)
    )
    assert changes
    for _ in range(150):
        expr = rng.choice(EXPRESSIONS)
        t = rng.choice(changes) + timedelta(seconds=rng.randint(-3 * 3600, 3 * 3600))
        t += timedelta(microseconds=rng.choice([0, 0, 500_000]))
        nxt = next_tick(expr, tz, t)
        prev = previous_tick(expr, tz, t)
        assert prev <= t < nxt, (expr, t)
        assert previous_tick(expr, tz, nxt) == nxt, (expr, t)
        assert next_tick(expr, tz, prev) == nxt, (expr, t)


def _matches(expr: str, wall: datetime) -> bool:
    """Whether cronsim names this naive wall-clock time (it is its own next tick)."""
    return next(CronSim(expr, wall - timedelta(seconds=1))) == wall


def _by_instants(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The rules applied the other way round, from every minute of absolute time in
    (start, end]: each shows one wall-clock time, which runs unless it is the second pass of a
    fixed-time tick; and each gap holding a fixed-time tick gives one run at its end."""
    fixed = schedule.is_fixed_time(expr)
    out: set[datetime] = set()
    t = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while t <= end:
        local = t.astimezone(tz)
        if (local.fold == 0 or not fixed) and _matches(expr, local.replace(tzinfo=None)):
            out.add(t)
        t += timedelta(minutes=1)
    for change in clock_changes(tz, start, end):
        skipped_from = (change - timedelta(seconds=1)).astimezone(tz).replace(tzinfo=None)
        skipped_to = change.astimezone(tz).replace(tzinfo=None)
        if fixed and next(CronSim(expr, skipped_from)) < skipped_to:
            out.add(change)
    return sorted(out)


@pytest.mark.parametrize("zone", ZONES)
def test_ticks_agree_with_the_rules_read_from_absolute_time(zone: str) -> None:
    rng = random.Random(f"instants {zone}")
    tz = ZoneInfo(zone)
    five_fields = [e for e in EXPRESSIONS if len(e.split()) == 5]
    for change in _changes(rng, tz, 2)[:3]:
        expr = rng.choice(five_fields)
        start, end = change - timedelta(hours=5), change + timedelta(hours=5)
        assert ticks_between(expr, tz, start, end) == _by_instants(expr, tz, start, end), expr
