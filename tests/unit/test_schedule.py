"""Cron maths: ticks in a zone, with cron's rules at daylight-saving changes."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from kontod.config import ConfigError, load_settings
from kontod.scheduler import schedule
from kontod.scheduler.schedule import (
    ScheduleError,
    Tick,
    clock_changes,
    next_tick,
    previous_tick,
    skipped_between,
    ticks_between,
    upcoming,
)
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
def test_previous_and_next_tick_agree_around_every_change(zone: str, expr: str) -> None:
    tz = ZoneInfo(zone)
    for change in clock_changes(tz, utc(2026, 1, 1), utc(2027, 1, 1)):
        probe = change - timedelta(hours=6)
        while probe < change + timedelta(hours=6):  # every 7 min 13 s, twelve hours around it
            prev = previous_tick(expr, tz, probe)
            assert prev <= probe
            assert next_tick(expr, tz, prev) > probe
            probe += timedelta(minutes=7, seconds=13)


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


# -- the rule's classification, the listing functions, the bounds -------------------------------


@pytest.mark.parametrize(
    ("expr", "fixed"),
    [
        ("0 2 * * *", True),
        ("0,30 2 * * *", True),
        ("0 2,14 * * *", True),
        ("0 30 2 * * *", True),
        ("*/10 30 2 * * *", True),  # the seconds do not count
        ("* 30 2 * * *", True),
        ("0 */6 * * *", False),
        ("*/5 2 * * *", False),
        ("5/10 2 * * *", False),
        ("0 1-3 * * *", False),  # a range is a wildcard (Vixie cron: only a leading *)
        ("0 1,2-4 * * *", False),
        ("0 0-30 2 * * *", False),
        ("0 * * * *", False),
    ],
)
def test_fixed_time_means_plain_minutes_and_hours(expr: str, fixed: bool) -> None:
    assert schedule.is_fixed_time(expr) is fixed


def test_upcoming_describes_each_tick() -> None:
    ticks = upcoming("30 2 * * *", PARIS, utc(2026, 3, 28, 12), 2)
    assert ticks == [
        Tick(
            at=utc(2026, 3, 29, 1),
            local=datetime(2026, 3, 29, 3, 0, tzinfo=PARIS),
            nominal=datetime(2026, 3, 29, 2, 30),
            note="moved",
        ),
        Tick(
            at=utc(2026, 3, 30, 0, 30),
            local=datetime(2026, 3, 30, 2, 30, tzinfo=PARIS),
            nominal=datetime(2026, 3, 30, 2, 30),
            note=None,
        ),
    ]
    assert ticks[0].at.tzinfo is UTC and ticks[0].nominal.tzinfo is None
    repeated = upcoming("0 * * * *", PARIS, utc(2026, 10, 25, 0, 30), 2)
    assert [(t.local.utcoffset(), t.note) for t in repeated] == [
        (timedelta(hours=1), "repeated"),
        (timedelta(hours=1), None),
    ]
    assert repeated[0].nominal == datetime(2026, 10, 25, 2, 0)
    assert upcoming("0 2 * * *", PARIS, utc(2026, 1, 1), 0) == []
    with pytest.raises(ValueError, match="count"):
        upcoming("0 2 * * *", PARIS, utc(2026, 1, 1), -1)


def test_skipped_between_lists_the_wildcard_times_a_gap_swallowed() -> None:
    spring = (utc(2026, 3, 28), utc(2026, 3, 30))
    assert skipped_between("*/20 2 * * *", PARIS, *spring) == [
        datetime(2026, 3, 29, 2, 0),
        datetime(2026, 3, 29, 2, 20),
        datetime(2026, 3, 29, 2, 40),
    ]
    assert skipped_between("*/20 2 * * *", PARIS, utc(2026, 3, 29, 1), utc(2026, 3, 30)) == []
    assert skipped_between("*/20 2 * * *", PARIS, utc(2026, 3, 28), utc(2026, 3, 29, 0, 59)) == []
    # Fixed-time ticks in a gap are not skipped: they run once, right after the jump.
    assert skipped_between("20,40 2 * * *", PARIS, *spring) == []
    # Apia's missing Friday.
    apia = ZoneInfo("Pacific/Apia")
    assert skipped_between("0 */6 * * 1-5", apia, utc(2011, 12, 28), utc(2012, 1, 3)) == [
        datetime(2011, 12, 30, hour) for hour in (0, 6, 12, 18)
    ]


def test_skipped_between_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedule, "MAX_SKIPPED", 100)
    with pytest.raises(ScheduleError, match="skipped"):
        skipped_between("* * 2 * * *", PARIS, utc(2026, 3, 28), utc(2026, 3, 30))


def test_clock_changes() -> None:
    assert clock_changes(PARIS, utc(2026, 1, 1), utc(2027, 1, 1)) == [
        utc(2026, 3, 29, 1),
        utc(2026, 10, 25, 1),
    ]
    assert clock_changes(ZoneInfo("UTC"), utc(2026, 1, 1), utc(2027, 1, 1)) == []


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("1 1 */100 * MON#4", "never fires"),  # the 1st that is a fourth Monday
        ("0 0 * 2 MON#5", "no tick within"),  # a fifth Monday in February: 2044
    ],
)
def test_a_search_past_its_bounds_is_a_schedule_error(expr: str, message: str) -> None:
    for find in (next_tick, previous_tick):
        with pytest.raises(ScheduleError, match=message):
            find(expr, PARIS, utc(2026, 1, 1))


def test_the_candidate_bound_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # With no room to step over a skipped candidate, the walk stops with an error.
    monkeypatch.setattr(schedule, "MAX_CANDIDATES", 1)
    with pytest.raises(ScheduleError, match="no tick among 1"):
        next_tick("*/20 2 * * *", PARIS, utc(2026, 3, 29, 0, 30))


def test_check_accepts_what_fires_within_a_year() -> None:
    schedule.check("0 2 * * *", PARIS, utc(2026, 1, 1))
    schedule.check("* * * * * *", ZoneInfo("Pacific/Chatham"), utc(2026, 1, 1))
    schedule.check("0 0 29 2 *", PARIS, utc(2027, 6, 1))  # 2028-02-29 is within a year


@pytest.mark.parametrize(
    ("expr", "now", "message"),
    [
        ("1 1 */100 * MON#4", utc(2026, 1, 1), "never fires"),
        ("0 0 29 2 *", utc(2026, 3, 1), "does not fire within a year"),
        ("0 0 * 2 MON#5", utc(2026, 1, 1), "no tick within"),
        ("0 61 * * *", utc(2026, 1, 1), "not a cron expression"),
    ],
)
def test_check_refuses(expr: str, now: datetime, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        schedule.check(expr, PARIS, now)


# -- the settings check ------------------------------------------------------------------------


def test_settings_refuse_a_schedule_that_never_fires(tmp_path: Path) -> None:
    env = {"KONTOD_TIMEZONE": "Europe/Paris", "KONTOD_REFRESH_SCHEDULE": "1 1 */100 * MON#4"}
    with pytest.raises(ConfigError) as err:
        load_settings(env, now=utc(2026, 1, 1))
    assert err.value.setting == "KONTOD_REFRESH_SCHEDULE"
    assert "fires at least once a year in Europe/Paris" in str(err.value)
    config = tmp_path / "kontod.toml"
    config.write_text('snapshot_schedule = "0 0 29 2 *"\ntimezone = "Asia/Tokyo"\n')
    with pytest.raises(ConfigError, match="does not fire within a year") as err:
        load_settings({"KONTOD_CONFIG": str(config)}, now=utc(2026, 3, 1))
    assert err.value.setting == f"snapshot_schedule in {config}"
    settings = load_settings({"KONTOD_CONFIG": str(config)}, now=utc(2027, 6, 1))
    assert settings.snapshots.schedule == "0 0 29 2 *"


def test_a_schedule_that_never_fires_exits_2_with_one_line() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KONTOD_", "DATABASE_URL"))}
    env = {**clean, "KONTOD_SNAPSHOT_SCHEDULE": "1 1 */100 * MON#4"}
    result = subprocess.run(
        [sys.executable, "-m", "kontod", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kontod: invalid KONTOD_SNAPSHOT_SCHEDULE='1 1 */100 * MON#4'")
    assert "never fires" in lines[0]
