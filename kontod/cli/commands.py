"""The operator commands of ``kontod``: jobs next, jobs pause/resume, and the progress display
of ``jobs run``. ``kontod.cli`` parses the arguments and calls these."""

from __future__ import annotations

import asyncio
import getpass
import re
import socket
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TextIO
from zoneinfo import ZoneInfo

import asyncpg

from kontod.cli import times
from kontod.ops.board import progress_of
from kontod.scheduler import pauses, schedule
from kontod.scheduler.contract import RunContext

UTC_ZONE = ZoneInfo("UTC")

# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    r"""``text`` safe for a terminal: each control character written as its escape (``\x1b``,
    ``\n``, ``\u202e``), so data (a bank's error text, a reason) can neither move the cursor,
    retitle the window nor change colours, and shows what it holds."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def requester() -> str:
    """Who runs this command, as runs and pauses record it: ``cli:<user>@<host>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container): the uid says enough
        import os

        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    rows = [[visible(cell) for cell in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip(), file=out)


# -- kontod jobs next -----------------------------------------------------------------------


def print_next(
    job: str, expr: str, tz: ZoneInfo, now: datetime, count: int, out: TextIO | None = None
) -> None:
    """The next ``count`` ticks in local time and UTC, marking those a DST change moved, and
    the wall-clock times it skipped."""
    out = out or sys.stdout
    ticks = schedule.upcoming(expr, tz, now, count)
    print(f"{job}: {expr} in {tz.key}", file=out)
    rows: list[tuple[tuple[datetime, int], tuple[str, str, str]]] = []
    for t in ticks:
        note = ""
        if t.note == "moved":
            note = (
                f"moved: {t.nominal.strftime('%H:%M')} does not exist that day (clocks go forward)"
            )
        elif t.note == "repeated":
            note = "repeated: second pass of an hour the clocks go through twice"
        elif t.local.replace(fold=1).utcoffset() != t.local.replace(fold=0).utcoffset():
            note = f"once: {t.local.strftime('%H:%M')} comes twice that day (clocks go back)"
        rows.append(
            (
                (t.at, 1),
                (times.text(t.at, tz), times.text(t.at, UTC_ZONE), note),
            )
        )
    if ticks:
        for nominal in schedule.skipped_between(expr, tz, now, ticks[-1].at):
            at = nominal.replace(tzinfo=tz).astimezone(UTC)
            text = (
                f"skipped: {nominal.strftime('%Y-%m-%d %H:%M')} does not exist (clocks go forward)"
            )
            rows.append(((at, 0), ("-", "-", text)))
    rows.sort(key=lambda row: row[0])
    _table([("LOCAL", "UTC", "NOTE"), *(cells for _, cells in rows)], out)


# -- kontod jobs pause / resume -------------------------------------------------------------


async def pause_job(
    pool: asyncpg.Pool,
    job: str,
    reason: str,
    until: datetime | None,
    tz: ZoneInfo,
    now: datetime,
    out: TextIO | None = None,
) -> None:
    held = await pauses.pause(pool, job, reason, requester(), now, until)
    end = f" until {times.text(held.until, tz)}" if held.until else " until resumed"
    print(visible(f"{job}: paused{end} by {held.by}: {held.reason}"), file=out)


async def resume_job(
    pool: asyncpg.Pool, job: str, now: datetime, out: TextIO | None = None
) -> None:
    ended = await pauses.resume(pool, job, requester(), now)
    print(visible(f"{job}: {'resumed' if ended else 'was not paused'}"), file=out)


# -- progress of kontod jobs run ------------------------------------------------------------


class Follow:
    """A run observer that keeps the context of the run it follows (for its progress)."""

    def __init__(self) -> None:
        self.ctx: RunContext | None = None

    def run_started(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run_ended(self, ctx: RunContext, status: str, error: str | None, duration_s: float) -> None:
        pass


def progress_line(ctx: RunContext, now: datetime, width: int = 30) -> tuple[str, str]:
    """(bar for a terminal, plain line) of where a run stands; the plain line changes only
    when the counts do."""
    p = progress_of(ctx.progress_done, ctx.progress_expected, ctx.started_at, now)
    rate = f" {p.rate_per_s:.1f}/s" if p.rate_per_s else ""
    eta = ""
    if p.eta is not None:
        eta = f" about {max(0, int((p.eta - now).total_seconds()))} s left"
    if p.ratio is None:
        text = f"{ctx.job}: {p.done} done{rate}"
        return text, text
    filled = round(p.ratio * width)
    bar = f"{ctx.job} [{'#' * filled}{'.' * (width - filled)}] {p.ratio:4.0%} {p.done}/{p.expected}"
    plain = f"{ctx.job}: {p.done}/{p.expected} ({p.ratio:.0%})"
    return bar + rate + eta, plain


async def show_progress(
    follow: Follow,
    task: asyncio.Task[str],
    out: TextIO,
    clock: Callable[[], datetime],
    every_s: float = 0.2,
) -> None:
    """Until ``task`` ends: a bar redrawn in place on a terminal, else a line per change."""
    tty = out.isatty()
    last = ""
    drawn = False
    while not task.done():
        await asyncio.wait([task], timeout=every_s)
        if follow.ctx is None or (
            follow.ctx.progress_expected is None and not follow.ctx.progress_done
        ):
            continue
        bar, plain = progress_line(follow.ctx, clock())
        if tty:
            out.write("\r\x1b[2K" + bar)
            drawn = True
        elif plain != last:
            print(plain, file=out)
        last = plain
        out.flush()
    if drawn:
        out.write("\n")
        out.flush()
