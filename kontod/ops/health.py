"""A job's health as a pure function of its schedule, its run history and ``now``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from kontod.scheduler import schedule
from kontod.scheduler.contract import FAILED_STATUSES, JobSpec, RunStatus
from kontod.scheduler.runs import JobStats


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str | None
    last_tick: datetime
    next_tick: datetime


def assess(
    expr: str,
    tz: ZoneInfo,
    grace: timedelta,
    stats: JobStats,
    now: datetime,
    *,
    max_runtime: timedelta | None = None,
    not_configured: str | None = None,
) -> Verdict:
    """Unhealthy when the last run failed, when a tick past its grace has no run, or while a
    retry of the newest tick runs (the tick has no success yet).

    A job is expected only from the moment kontod first registered it, so a fresh install is
    healthy until its first tick plus grace.
    """
    last_tick = schedule.previous_tick(expr, tz, now)
    next_tick = schedule.next_tick(expr, tz, now)
    if not_configured:
        return Verdict(True, f"not configured: {not_configured}", last_tick, next_tick)
    if stats.last_status in FAILED_STATUSES:
        return Verdict(False, f"last run ended with {stats.last_status}", last_tick, next_tick)
    newest = stats.latest_attempt
    if (
        stats.last_status == RunStatus.RUNNING
        and newest is not None
        and newest.status == RunStatus.RUNNING
        and newest.attempt > 1
        and newest.tick == last_tick
    ):
        # A takeover or a retry is going: the tick has failed once and has no success yet.
        return Verdict(
            False,
            f"attempt {newest.attempt} at the tick of {newest.tick.isoformat()} is running"
            " after a failed one",
            last_tick,
            next_tick,
        )
    if stats.last_status == RunStatus.RUNNING:
        since = stats.running_since or stats.last_started_at
        if max_runtime is not None and since is not None and now - since > max_runtime:
            # kontod stops runs at that limit: one still going means nobody is watching it.
            return Verdict(
                False,
                f"running since {since.isoformat()}, past its maximum run time",
                last_tick,
                next_tick,
            )
        return Verdict(True, None, last_tick, next_tick)
    due = schedule.previous_tick(expr, tz, now - grace)
    expected_since = stats.registered_at or now
    ran_since_due = (stats.last_tick_run is not None and stats.last_tick_run >= due) or (
        stats.last_started_at is not None and stats.last_started_at >= due
    )
    if due >= expected_since and not ran_since_due:
        return Verdict(
            False,
            f"no run for the tick of {due.isoformat()} within its grace of "
            f"{int(grace.total_seconds())} s",
            last_tick,
            next_tick,
        )
    return Verdict(True, None, last_tick, next_tick)


def assess_job(spec: JobSpec, tz: ZoneInfo, stats: JobStats, now: datetime) -> Verdict:
    """``assess`` with the schedule and limits a job declares."""
    return assess(
        spec.schedule,
        tz,
        spec.grace,
        stats,
        now,
        max_runtime=spec.max_runtime,
        not_configured=spec.not_configured,
    )
