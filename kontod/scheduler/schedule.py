"""Cron maths: pure functions of (expression, zone, instant). Imports nothing of kontod.

cronsim (the engine aiocron uses) enumerates the wall-clock times an expression names, as naive
datetimes, forwards or backwards, with its own field rules (day-of-month OR day-of-week, ``L``,
``#``, ``W``). Each wall-clock time is then resolved against the zone here, by one rule set for
5- and 6-field expressions (docs/schedules.md):

- a wall-clock time the zone has once is a tick at that instant;
- one the clock jumps over (a gap): a fixed-time schedule runs once, at the first instant after
  the jump, however many of its times the gap holds; any other schedule does not run there;
- one the clock shows twice (a repeated interval): a fixed-time schedule runs in the first pass
  only, any other in both passes (every first-pass instant, then every second-pass one).

Forwards and backwards walk the same candidates with the same rules, so ``next_tick`` and
``previous_tick`` agree. Every walk is bounded: past ``MAX_CANDIDATES`` candidates or
``MAX_SPAN`` of wall-clock time without a tick it raises ``ScheduleError``. Results are aware
datetimes in UTC.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Literal
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

# Bounds of one search, counted from the start or from the previous tick found.
MAX_CANDIDATES = 10_000
MAX_SPAN = timedelta(days=5 * 366)
# Bound of the wall-clock times skipped_between may list.
MAX_SKIPPED = 100_000
# check() walks at most this many ticks of the coming year.
CHECK_TICKS = 2_000

_SECOND = timedelta(seconds=1)
_EPOCH = datetime(1970, 1, 1)
_PLAIN = re.compile(r"\d+(,\d+)*")


class ScheduleError(Exception):
    """A schedule that cannot be computed, or has no tick within the bounds of a search."""


@dataclass(frozen=True)
class Tick:
    """One scheduled run.

    ``at`` is the instant (UTC), ``local`` the same instant on the zone's clock, ``nominal``
    the naive wall-clock time the expression named. ``note`` is None for an ordinary tick,
    ``"moved"`` for a fixed-time tick whose time the clock skipped (it runs right after the
    jump) and ``"repeated"`` for the second pass of a wildcard tick in a repeated interval.
    """

    at: datetime
    local: datetime
    nominal: datetime
    note: Literal["moved", "repeated"] | None = None


@dataclass(frozen=True)
class _Change:
    """A change of the zone's offset at instant ``at``: the naive wall-clock times in
    [start, end) are skipped (``gap``) or shown twice, once on each side of ``at``."""

    at: datetime
    start: datetime
    end: datetime
    gap: bool


def _fields(expr: str) -> list[str]:
    parts = expr.split()
    return parts[1:] if len(parts) == 6 else parts


def is_fixed_time(expr: str) -> bool:
    """Whether the schedule names its minutes and hours: plain numbers or lists of them.

    A ``*``, a range or a step in either field makes it a wildcard schedule. The seconds of a
    6-field expression do not count: ``*/10 30 2 * * *`` is fixed-time (02:30).
    """
    fields = _fields(expr)
    return len(fields) >= 2 and all(_PLAIN.fullmatch(field) for field in fields[:2])


# -- resolving a wall-clock time against the zone ----------------------------------------------


def _epoch(naive: datetime) -> int:
    return int((naive - _EPOCH).total_seconds())


def _offset_at(seconds: int, tz: ZoneInfo) -> timedelta:
    offset = datetime.fromtimestamp(seconds, tz).utcoffset()
    if offset is None:  # never for a ZoneInfo; said for the type checker
        raise ScheduleError(f"{tz.key} has no UTC offset at {seconds}")
    return offset


def _first_with(offset: timedelta, lo: int, hi: int, tz: ZoneInfo) -> int:
    """The first second in (lo, hi] from which the zone has ``offset`` (it has it at hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset_at(mid, tz) == offset:
            hi = mid
        else:
            lo = mid
    return hi


def _change_of(wall: datetime, tz: ZoneInfo) -> _Change | None:
    """The clock change that skips or repeats ``wall``, or None when it exists once."""
    before = wall.replace(tzinfo=tz, fold=0).utcoffset()
    after = wall.replace(tzinfo=tz, fold=1).utcoffset()
    if before is None or after is None or before == after:
        return None
    # Read with either offset, ``wall`` names an instant on each side of the change (PEP 495:
    # fold=0 takes the offset from before it, fold=1 the one from after): the change is the
    # first instant in between with the later offset.
    lo = _epoch(wall) - int(max(before, after).total_seconds())
    hi = _epoch(wall) - int(min(before, after).total_seconds())
    if _offset_at(lo, tz) != before or _offset_at(hi, tz) != after:
        raise ScheduleError(f"cannot place the wall-clock time {wall} in {tz.key}")
    at = datetime.fromtimestamp(_first_with(after, lo, hi, tz), UTC)
    naive = at.replace(tzinfo=None)
    return _Change(at, naive + min(before, after), naive + max(before, after), after > before)


def _instant(wall: datetime, tz: ZoneInfo, fold: int = 0) -> datetime:
    return wall.replace(tzinfo=tz, fold=fold).astimezone(UTC)


def _tick(wall: datetime, tz: ZoneInfo, fold: int = 0) -> Tick:
    at = _instant(wall, tz, fold)
    return Tick(at, at.astimezone(tz), wall, "repeated" if fold else None)


def _moved(wall: datetime, change: _Change, tz: ZoneInfo) -> Tick:
    return Tick(change.at, change.at.astimezone(tz), wall, "moved")


def _repeated_here(local: datetime, tz: ZoneInfo) -> _Change | None:
    """The repeated interval the aware ``local`` lies in, if any."""
    change = _change_of(local.replace(tzinfo=None, microsecond=0), tz)
    return None if change is None or change.gap else change


# -- walking the candidates ------------------------------------------------------------------


class _Candidates:
    """cronsim's naive wall-clock times in one direction, counted against the bounds."""

    def __init__(self, expr: str, forward: bool, origin: datetime) -> None:
        self.expr = expr
        self.forward = forward
        self.origin = origin
        self.count = 0
        self._it = CronSim(expr, origin, reverse=not forward)

    def restart(self, wall: datetime) -> None:
        """Go on from ``wall``, exclusive, in the same direction."""
        self._it = CronSim(self.expr, wall, reverse=not self.forward)

    def found(self, wall: datetime) -> None:
        """A tick was found at ``wall``: the bounds start again from there."""
        self.origin = wall
        self.count = 0

    def __next__(self) -> datetime:
        self.count += 1
        if self.count > MAX_CANDIDATES:
            raise ScheduleError(
                f"{self.expr!r}: no tick among {MAX_CANDIDATES} wall-clock times from {self.origin}"
            )
        try:
            wall: datetime = next(self._it)
        except StopIteration:
            raise ScheduleError(
                f"{self.expr!r} never fires: no date matches it within 50 years of {self.origin}"
            ) from None
        if abs(wall - self.origin) > MAX_SPAN:
            raise ScheduleError(
                f"{self.expr!r}: no tick within {MAX_SPAN.days} days of {self.origin}"
            )
        return wall


def _forward(
    expr: str, tz: ZoneInfo, after: datetime, on_skip: Callable[[_Change], None] | None = None
) -> Iterator[Tick]:
    """Every tick strictly after ``after``, in time order. ``on_skip`` hears of each gap whose
    wall-clock times a wildcard schedule did not run."""
    fixed = is_fixed_time(expr)
    last = after.astimezone(UTC)
    local = last.astimezone(tz)
    start = local.replace(tzinfo=None, microsecond=0)
    walk = _Candidates(expr, True, start)

    def emit(tick: Tick) -> Iterator[Tick]:
        nonlocal last
        if tick.at > last:
            last = tick.at
            walk.found(tick.nominal)
            yield tick

    wall = next(walk)
    pending = _repeated_here(local, tz)  # a repeated interval whose first pass we are in
    if pending is not None and local.fold:
        # Already in the second pass: the first-pass instants are behind us.
        if fixed:
            walk.restart(pending.end - _SECOND)
            wall = next(walk)
        else:
            while wall < pending.end:
                yield from emit(_tick(wall, tz, fold=1))
                wall = next(walk)
        pending = None
    while True:
        if pending is not None and wall >= pending.end:
            if not fixed:
                # The second pass of the interval: each of its wall-clock times again.
                walk.restart(pending.start - _SECOND)
                wall = next(walk)
                while wall < pending.end:
                    yield from emit(_tick(wall, tz, fold=1))
                    wall = next(walk)
            pending = None
            continue
        change = _change_of(wall, tz)
        if change is None:
            yield from emit(_tick(wall, tz))
        elif not change.gap:
            if pending is None:
                pending = change
            yield from emit(_tick(wall, tz))
        elif fixed:
            yield from emit(_moved(wall, change, tz))
            walk.restart(change.end)  # its other times here are this same run
        else:
            if on_skip is not None:
                on_skip(change)
            walk.restart(change.end - _SECOND)
        wall = next(walk)


def _backward(expr: str, tz: ZoneInfo, at: datetime) -> Iterator[Tick]:
    """Every tick at or before ``at``, latest first; the same ticks as ``_forward``."""
    fixed = is_fixed_time(expr)
    last = at.astimezone(UTC) + timedelta(microseconds=1)
    local = at.astimezone(tz)
    start = local.replace(tzinfo=None, microsecond=0)
    walk = _Candidates(expr, False, start + _SECOND)

    def emit(tick: Tick) -> Iterator[Tick]:
        nonlocal last
        if tick.at < last:
            last = tick.at
            walk.found(tick.nominal)
            yield tick

    # The repeated interval whose second pass is done with (or still to come).
    done = _repeated_here(local, tz)
    if done is not None and local.fold:
        if not fixed:
            wall = next(walk)
            while wall >= done.start:
                yield from emit(_tick(wall, tz, fold=1))
                wall = next(walk)
        walk.restart(done.end)  # then the whole first pass, which is earlier
    while True:
        wall = next(walk)
        change = _change_of(wall, tz)
        if change is None:
            yield from emit(_tick(wall, tz))
        elif not change.gap:
            if (done is None or done.at != change.at) and not fixed:
                # Coming from later: the second pass first, then the first pass.
                done = change
                while wall >= change.start:
                    yield from emit(_tick(wall, tz, fold=1))
                    wall = next(walk)
                walk.restart(change.end)
                continue
            done = change
            yield from emit(_tick(wall, tz))
        elif fixed:
            yield from emit(_moved(wall, change, tz))
            walk.restart(change.start)
        else:
            walk.restart(change.start)


# -- the API ---------------------------------------------------------------------------------


def next_tick(expr: str, tz: ZoneInfo, after: datetime) -> datetime:
    """The first scheduled instant strictly after ``after``."""
    return next(_forward(expr, tz, after)).at


def previous_tick(expr: str, tz: ZoneInfo, at: datetime) -> datetime:
    """The most recent scheduled instant at or before ``at``."""
    return next(_backward(expr, tz, at)).at


def ticks_between(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """Every tick in (start, end], for tests and reports."""
    out: list[datetime] = []
    for tick in _forward(expr, tz, start):
        if tick.at > end:
            break
        out.append(tick.at)
    return out


def upcoming(expr: str, tz: ZoneInfo, after: datetime, count: int) -> list[Tick]:
    """The next ``count`` ticks strictly after ``after``, each with its local time, the
    wall-clock time cron named and a note when a clock change moved or repeated it."""
    if count < 0:
        raise ValueError("count must be 0 or more")
    return list(islice(_forward(expr, tz, after), count))


def skipped_between(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The naive wall-clock times of a wildcard schedule that did not run because the clock
    jumped over them, at changes in (start, end]. A fixed-time schedule skips none: its times
    in a gap run once, right after the jump."""
    gaps: list[_Change] = []
    for tick in _forward(expr, tz, start, on_skip=gaps.append):
        if tick.at > end:
            break
    out: list[datetime] = []
    for gap in gaps:
        if not start < gap.at <= end:
            continue
        walk = CronSim(expr, gap.start - _SECOND)
        wall: datetime = next(walk)
        while wall < gap.end:
            out.append(wall)
            if len(out) > MAX_SKIPPED:
                raise ScheduleError(f"{expr!r}: more than {MAX_SKIPPED} skipped times")
            wall = next(walk)
    return out


def clock_changes(tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The instants in (start, end] at which the zone's offset changes (hourly sampling, so
    two changes less than an hour apart may be missed)."""
    out: list[datetime] = []
    t = int(start.timestamp())
    stop = int(end.timestamp())
    offset = _offset_at(t, tz)
    while t < stop:
        step = min(3600, stop - t)
        nxt = _offset_at(t + step, tz)
        if nxt != offset:
            out.append(datetime.fromtimestamp(_first_with(nxt, t, t + step, tz), UTC))
            offset = nxt
        t += step
    return out


def check(expr: str, tz: ZoneInfo, now: datetime) -> None:
    """Raise ScheduleError unless ``expr`` fires within a year of ``now`` in ``tz`` and every
    tick of that year, and the ticks next to each clock change in it, can be computed."""
    try:
        CronSim(expr, now.replace(tzinfo=None))
    except (CronSimError, ValueError) as exc:
        raise ScheduleError(f"{expr!r} is not a cron expression ({exc})") from None
    horizon = now + timedelta(days=366)
    first = next_tick(expr, tz, now)
    if first > horizon:
        raise ScheduleError(f"{expr!r} does not fire within a year (first tick {first})")
    previous_tick(expr, tz, now)
    for _, tick in zip(range(CHECK_TICKS), _forward(expr, tz, now), strict=False):
        if tick.at > horizon:
            break
    for change in clock_changes(tz, now, horizon):
        for minutes in range(-120, 121, 15):
            probe = change + timedelta(minutes=minutes)
            previous_tick(expr, tz, next_tick(expr, tz, probe))
            next_tick(expr, tz, previous_tick(expr, tz, probe))
