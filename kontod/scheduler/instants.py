"""Instants typed by people: an ISO 8601 time, local to kontod's zone when it has no offset, or
a duration from now (``2h``). The CLI's flags and the HTTP API's fields read them here, so that
both accept the same things and refuse them with the same words.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from kontod.scheduler.pauses import LATEST_UNTIL

DURATION_UNITS = {"m": 60, "h": 3600, "d": 86400}


def parse_time(raw: str, tz: ZoneInfo) -> datetime:
    """An ISO 8601 time, local to ``tz`` when it has no offset; ValueError says what is accepted."""
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise ValueError(
            f"{raw!r}: expected a time such as 2026-03-02T08:00 or 2026-03-02T08:00+01:00"
        ) from None
    return value.replace(tzinfo=tz) if value.tzinfo is None else value


def parse_until(raw: str, tz: ZoneInfo, now: datetime) -> datetime:
    """When a pause ends, in UTC: an ISO 8601 time (local to ``tz`` without an offset) or a
    duration from ``now`` such as 30m, 2h or 1d, after ``now`` and before ``LATEST_UNTIL``.

    Raises ValueError with a message that does not name the input (the caller prefixes its
    own: ``--until`` or ``until``)."""
    text = raw.strip()
    shown = text if len(text) <= 40 else text[:40] + "..."
    try:
        if text[:-1].isdecimal() and text[-1:] in DURATION_UNITS:
            until = now + timedelta(seconds=int(text[:-1]) * DURATION_UNITS[text[-1]])
        else:
            until = parse_time(text, tz)
        # Converting tells an instant past year 9999 in UTC (9999-12-31T23:59-01:00).
        until = until.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(
            f"{shown!r}: expected a time such as 2026-03-02T08:00 or 2026-03-02T08:00+01:00,"
            f" or a duration such as 30m, 2h or 1d, before {LATEST_UNTIL.year}"
        ) from None
    if until >= LATEST_UNTIL:
        raise ValueError(
            f"must be before {LATEST_UNTIL.date().isoformat()}; leave it out to pause until resumed"
        )
    if until <= now:
        raise ValueError(f"must be in the future, not {until.isoformat()}")
    return until
