"""The one way the ``kontod`` commands show a time: local to ``KONTOD_TIMEZONE``, with its
offset from UTC (``2026-12-07 14:02:05 +01:00``) in tables, ISO 8601 with the same offset
(``2026-12-07T14:02:05+01:00``) in ``--json``. Every command goes through these two."""

from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo


def text(value: datetime | None, tz: ZoneInfo) -> str:
    """``value`` for a table: local time to the second and its offset; ``-`` for None."""
    if value is None:
        return "-"
    shown = iso(value, tz)
    return f"{shown[:10]} {shown[11:19]} {shown[19:]}"


def iso(value: datetime, tz: ZoneInfo) -> str:
    """``value`` for ``--json``: ISO 8601 local to ``tz``, to the second, with its offset."""
    try:
        return value.astimezone(tz).isoformat(timespec="seconds")
    except (OverflowError, ValueError):  # a time written by hand near year 1 or 9999
        return value.isoformat(timespec="seconds")


# An ISO 8601 instant as kontod's messages write them (a health reason, a daemon's answer).
_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:\d\d)")


def within(message: str, tz: ZoneInfo) -> str:
    """``message`` with every ISO 8601 instant in it shown as ``text`` shows times, so that a
    reason written for the HTTP API reads like the rest of the table."""

    def local(match: re.Match[str]) -> str:
        try:
            return text(datetime.fromisoformat(match.group()), tz)
        except ValueError:
            return match.group()

    return _ISO.sub(local, message)


def parse(value: str | None) -> datetime | None:
    """An ISO 8601 instant from a daemon's answer (``Z`` or an offset); None stays None."""
    return None if value is None else datetime.fromisoformat(value)
