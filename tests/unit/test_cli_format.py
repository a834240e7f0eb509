"""The pieces of the command line's tables: the one time format, durations, count summaries
and the fitting of a table to 100 columns."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from kontod.cli import listing, times

PARIS = ZoneInfo("Europe/Paris")


def test_a_time_is_local_with_its_offset_in_tables_and_iso_in_json() -> None:
    winter = datetime(2026, 12, 7, 13, 2, 5, 269_000, tzinfo=UTC)
    summer = datetime(2026, 7, 7, 13, 2, 5, tzinfo=UTC)
    assert times.text(winter, PARIS) == "2026-12-07 14:02:05 +01:00"
    assert times.text(summer, PARIS) == "2026-07-07 15:02:05 +02:00"
    assert times.text(winter, ZoneInfo("UTC")) == "2026-12-07 13:02:05 +00:00"
    assert times.iso(winter, ZoneInfo("Asia/Kolkata")) == "2026-12-07T18:32:05+05:30"
    assert times.text(None, PARIS) == "-"
    # Past what Python can show in the zone: the instant in UTC, same format.
    assert times.text(datetime(9999, 12, 31, 23, tzinfo=UTC), ZoneInfo("Asia/Tokyo")) == (
        "9999-12-31 23:00:00 +00:00"
    )


def test_instants_inside_a_message_take_the_same_format() -> None:
    reason = "no run for the tick of 2026-12-07T01:00:00+00:00 within its grace of 3600 s"
    assert times.within(reason, PARIS) == (
        "no run for the tick of 2026-12-07 02:00:00 +01:00 within its grace of 3600 s"
    )
    assert times.within("since 2026-12-07T13:02:05.269Z", PARIS) == (
        "since 2026-12-07 14:02:05 +01:00"
    )
    assert times.within("version 2026-12-07 stays", PARIS) == "version 2026-12-07 stays"


def test_durations_are_short() -> None:
    assert [listing.duration(s) for s in (0.04, 12.34, 245, 7380, 273_600)] == [
        "0.0s",
        "12.3s",
        "4m05s",
        "2h03m",
        "3d04h",
    ]


def test_counts_are_summarised_to_the_room_left() -> None:
    counts = {"batches": 2, "items_failed": 3, "rows_written": 9, "users": 12, "zero": 0}
    assert listing.summarise(counts, 100, "users") == (
        "users=12 items_failed=3 batches=2 rows_written=9 +1"
    )
    assert listing.summarise(counts, 26, "users") == "users=12 items_failed=3 +3"
    assert listing.summarise(counts, 9, "users") == "5 counts"
    assert listing.summarise({}, 20) == "-"


def test_a_table_gives_up_width_from_its_flexible_columns() -> None:
    rows = [["A", "NOTE", "B"], ["x" * 30, "n" * 80, "y" * 10]]
    lines = listing.fit(rows, flexible=[1], width=60)
    assert all(len(line) <= 60 for line in lines)
    assert lines[1] == "x" * 30 + "  " + "n" * 15 + "…  " + "y" * 10
    # Data cannot draw on the terminal, and its escapes count in the width.
    [_, line] = listing.fit([["A"], ["\x1b[2J"]], flexible=[0])
    assert line == r"\x1b[2J"
