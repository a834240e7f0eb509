"""``kontod runs`` and ``kontod jobs list``: tables that fit 100 columns, and ``--json`` with
everything in full.

A table row is one run or one job; what does not fit (a long error, many counts) is
shortened in the table and given whole by ``--json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import asyncpg

from kontod.cli import times
from kontod.cli.commands import visible
from kontod.ops import suspicion
from kontod.ops.board import verdict_of
from kontod.ops.health import Verdict
from kontod.scheduler import pauses, runlist, runs
from kontod.scheduler.contract import FAILED_STATUSES, JobSpec

WIDTH = 100
GAP = "  "


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def fit(rows: Sequence[Sequence[str]], flexible: Sequence[int], width: int = WIDTH) -> list[str]:
    """``rows`` (the first is the header) as aligned lines of at most ``width`` characters:
    the ``flexible`` columns, last listed first, give up what is too much (to no less than
    their header); the others keep their width."""
    cells = [[visible(cell) for cell in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    excess = sum(widths) + len(GAP) * (len(widths) - 1) - width
    for i in reversed(flexible):
        if excess <= 0:
            break
        give = min(excess, widths[i] - len(cells[0][i]))
        widths[i] -= give
        excess -= give
    return [
        GAP.join(shorten(c, widths[i]).ljust(widths[i]) for i, c in enumerate(r)).rstrip()
        for r in cells
    ]


def duration(seconds: float) -> str:
    """A duration in a few characters: 0.4s, 12.3s, 4m05s, 2h03m, 3d04h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _telling(key: str, population: str | None) -> tuple[int, str]:
    """Sort key of a count in a summary: the job's population, then failures, then the rest."""
    if key == population:
        return (0, key)
    if "fail" in key or "error" in key:
        return (1, key)
    return (2, key)


def summarise(counts: Mapping[str, int], width: int, population: str | None = None) -> str:
    """The counts that tell most, within ``width`` characters: the population, the non-zero
    failures, the other non-zero counts, then ``+N`` for those left out (zeros included)."""
    if not counts:
        return "-"
    shown: list[str] = []
    ordered = sorted(
        ((k, v) for k, v in counts.items() if v or k == population),
        key=lambda kv: _telling(kv[0], population),
    )
    for key, value in ordered:
        candidate = [*shown, f"{key}={value}"]
        rest = len(counts) - len(candidate)
        text = " ".join(candidate) + (f" +{rest}" if rest else "")
        if len(text) > width:
            break
        shown = candidate
    rest = len(counts) - len(shown)
    if not shown:
        return f"{len(counts)} counts"
    return " ".join(shown) + (f" +{rest}" if rest else "")


# -- kontod runs ----------------------------------------------------------------------------


async def print_runs(
    pool: asyncpg.Pool,
    job: str | None,
    limit: int,
    status: str | None,
    tz: ZoneInfo,
    now: datetime,
    populations: Mapping[str, str | None],
    as_json: bool = False,
    out: TextIO | None = None,
) -> None:
    """The newest runs of ``job`` (of every job when None), newest first."""
    out = out or sys.stdout
    found = await runlist.runs_of(pool, job, limit, status)
    if as_json:
        print(json.dumps([_run_json(r, tz, now) for r in found], indent=2), file=out)
        return
    if not found:
        what = f"{status + ' ' if status else ''}run"
        print(f"(no {what} of {job} yet)" if job else f"(no {what} yet)", file=out)
        return
    for line in run_lines(found, tz, now, populations, with_job=job is None):
        print(line, file=out)


def run_lines(
    found: Iterable[runlist.Run],
    tz: ZoneInfo,
    now: datetime,
    populations: Mapping[str, str | None],
    with_job: bool = True,
) -> list[str]:
    """A row per run; under it, indented and shortened to fit, who asked for it (and why) and
    its error."""
    found = list(found)
    header = ["ID", *(["JOB"] if with_job else []), "STARTED", "TRIGGER", "STATUS", "TOOK"]
    rows = [[*header, "COUNTS"]]
    for r in found:
        took = duration(r.duration_s(now)) + ("" if r.finished_at else " so far")
        rows.append(
            [
                str(r.id),
                *([r.job] if with_job else []),
                times.text(r.started_at, tz),
                r.trigger,
                r.status,
                took,
            ]
        )
    # The counts get what the other columns leave, summarised to fit.
    fixed = [max(len(visible(row[i])) for row in rows) for i in range(len(header))]
    room = max(len("COUNTS"), WIDTH - sum(fixed) - len(GAP) * len(fixed))
    for row, r in zip(rows[1:], found, strict=True):
        row.append(summarise(r.counts, room, populations.get(r.job)))
    lines = fit(rows, flexible=[len(header)])
    out = [lines[0]]
    for line, r in zip(lines[1:], found, strict=True):
        out.append(line)
        detail = []
        if r.requested_by:
            detail.append(f"by {r.requested_by}" + (f" ({r.reason})" if r.reason else ""))
        if r.error:
            detail.append(f"error: {r.error}")
        out.extend(shorten(visible("    " + line), WIDTH) for line in detail)
    return out


def _run_json(r: runlist.Run, tz: ZoneInfo, now: datetime) -> dict[str, Any]:
    return {
        "id": r.id,
        "job": r.job,
        "trigger": r.trigger,
        "scheduledFor": times.iso(r.scheduled_for, tz) if r.scheduled_for else None,
        "attempt": r.attempt,
        "startedAt": times.iso(r.started_at, tz),
        "finishedAt": times.iso(r.finished_at, tz) if r.finished_at else None,
        "durationSeconds": r.duration_s(now),
        "status": r.status,
        "counts": dict(r.counts),
        "error": r.error,
        "instance": r.instance,
        "requestedBy": r.requested_by,
        "reason": r.reason,
    }


# -- kontod jobs list -----------------------------------------------------------------------


async def print_jobs(
    pool: asyncpg.Pool,
    specs: Sequence[JobSpec],
    tz: ZoneInfo,
    now: datetime,
    thresholds: Mapping[str, suspicion.Thresholds],
    as_json: bool = False,
    out: TextIO | None = None,
) -> None:
    """Every job: its schedule and zone, next tick, pause and health, from the database."""
    out = out or sys.stdout
    names = [spec.name for spec in specs]
    stats = await runs.job_stats(pool)
    states = await pauses.states(pool, names, now)
    verdicts = await suspicion.latest(pool, thresholds)
    listed = []
    for spec in specs:
        st = stats.get(spec.name, runs.JobStats())
        state = states.get(spec.name, pauses.PauseState())
        verdict = verdict_of(spec, tz, st, state, state.pause, now)
        listed.append((spec, st, state.pause, verdict, verdicts.get(spec.name)))
    if as_json:
        print(json.dumps([_job_json(*item, tz=tz) for item in listed], indent=2), file=out)
        return
    # The zone once, above the table: in every row it would leave the health no room.
    print(f"schedules in {tz.key}", file=out)
    rows = [["JOB", "SCHEDULE", "NEXT TICK", "PAUSED", "HEALTH"]]
    for spec, st, pause, verdict, suspect in listed:
        rows.append(
            [
                spec.name,
                spec.schedule,
                "-" if spec.not_configured else times.text(verdict.next_tick, tz),
                _paused_cell(pause, now),
                times.within(_health_cell(st, pause, verdict, suspect), tz),
            ]
        )
    for line in fit(rows, flexible=[1, 4]):
        print(line, file=out)


def _paused_cell(pause: pauses.Pause | None, now: datetime) -> str:
    # How long is left, not the end itself: a second time column would not fit 100
    # columns (``--json`` has the end, ``pausedUntil``).
    if pause is None:
        return "-"
    if pause.until is None:
        return "until resumed"
    return duration(max(0.0, (pause.until - now).total_seconds())) + " left"


def _health_cell(
    st: runs.JobStats,
    pause: pauses.Pause | None,
    verdict: Verdict,
    suspect: suspicion.Suspicion | None,
) -> str:
    if pause is not None:
        # Healthy while paused, but the last outcome still matters when the pause ends.
        failed = st.last_status in FAILED_STATUSES
        return f"paused; last run {st.last_status}" if failed else "paused"
    if not verdict.healthy:
        # The usual reason, said short enough to fit; the others as the verdict says them.
        if st.last_status in FAILED_STATUSES:
            return f"NO: last run {st.last_status}"
        return f"NO: {verdict.reason}"
    if verdict.reason:  # not configured
        return f"ok, {verdict.reason}"
    if suspect is not None and suspect.suspicious:
        return f"ok, suspicious: {suspect.reason}"
    return "ok"


def _job_json(
    spec: JobSpec,
    st: runs.JobStats,
    pause: pauses.Pause | None,
    verdict: Verdict,
    suspect: suspicion.Suspicion | None,
    *,
    tz: ZoneInfo,
) -> dict[str, Any]:
    return {
        "name": spec.name,
        "schedule": spec.schedule,
        "timezone": tz.key,
        "nextTick": None if spec.not_configured else times.iso(verdict.next_tick, tz),
        "paused": pause is not None,
        "pausedBy": pause.by if pause else None,
        "pausedReason": pause.reason if pause else None,
        "pausedUntil": times.iso(pause.until, tz) if pause and pause.until else None,
        "healthy": verdict.healthy,
        "reason": verdict.reason,
        "lastStatus": st.last_status,
        "lastRun": times.iso(st.last_started_at, tz) if st.last_started_at else None,
        "suspicious": bool(suspect and suspect.suspicious),
        "suspiciousReason": suspect.reason if suspect else None,
    }
