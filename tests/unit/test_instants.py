"""Instants people type (``--until``, the HTTP ``until`` field): a table of inputs and answers."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from kontod.scheduler.instants import parse_time, parse_until

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("30m", NOW + timedelta(minutes=30)),
        ("2h", NOW + timedelta(hours=2)),
        (" 1d ", NOW + timedelta(days=1)),
        # Without an offset, the time is on kontod's clock (Paris is UTC+1 in March).
        ("2026-03-02T12:00", datetime(2026, 3, 2, 11, 0, tzinfo=UTC)),
        ("2026-03-02T12:00+00:00", datetime(2026, 3, 2, 12, 0, tzinfo=UTC)),
        ("2026-03-02T12:00Z", datetime(2026, 3, 2, 12, 0, tzinfo=UTC)),
        ("8999-12-31T23:30:00+14:00", datetime(8999, 12, 31, 9, 30, tzinfo=UTC)),
    ],
)
def test_until_is_a_time_or_a_duration_from_now(raw: str, expected: datetime) -> None:
    until = parse_until(raw, PARIS, NOW)
    assert until == expected and until.tzinfo == UTC


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("soon", "'soon': expected a time such as 2026-03-02T08:00"),
        ("2w", "or a duration such as 30m, 2h or 1d"),
        ("-2h", "expected a time"),
        ("h", "expected a time"),
        ("", "expected a time"),
        ("9" * 5000 + "d", "'" + "9" * 40 + "...': expected a time"),
        ("99999999999999d", "expected a time"),
        ("9999-12-31T23:59:59-01:00", "expected a time"),
        ("9500-01-01", "must be before 9000-01-01"),
        ("0m", "must be in the future, not 2026-03-02T09:00:00+00:00"),
        ("2026-03-02T09:00", "must be in the future"),
    ],
)
def test_until_refused_says_what_is_accepted(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_until(raw, PARIS, NOW)


def test_a_time_without_an_offset_is_local() -> None:
    assert parse_time("2026-07-01T08:00", PARIS) == datetime(2026, 7, 1, 8, 0, tzinfo=PARIS)
    with pytest.raises(ValueError, match="expected a time such as"):
        parse_time("tomorrow", PARIS)
