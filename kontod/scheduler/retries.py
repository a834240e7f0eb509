"""What a tick needs next: its first run, a takeover, a retry, or nothing (pure functions).

A tick is tried until one attempt succeeds, while it is the job's newest tick and inside the
job's catch-up window. An attempt that was ``interrupted`` (its owner stopped or lost its
lease) is taken over at once; one that ended ``error`` or ``timeout`` is retried after a delay
that doubles with each attempt. Takeovers and retries together are bounded by ``retries``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from kontod.scheduler.contract import RunStatus, Trigger
from kontod.scheduler.runs import JobStats, TickState


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # attempts after the first one
    delay: timedelta = timedelta(minutes=5)  # before the first retry; doubles each time


@dataclass(frozen=True)
class Planned:
    """The next attempt at a tick and when it is due."""

    tick: datetime
    attempt: int
    trigger: Trigger
    due: datetime


def next_attempt(
    state: TickState | None,
    tick: datetime,
    now: datetime,
    window: timedelta,
    policy: RetryPolicy,
    *,
    on_time: bool = False,
) -> Planned | None:
    """The attempt ``tick`` needs next given its newest attempt ``state``, or None.

    ``on_time``: the caller waited for this tick and it has just come (trigger ``schedule``,
    whatever the window); otherwise a tick without a run is made up (``catchup``).
    """
    if state is None and on_time:
        return Planned(tick, 1, Trigger.SCHEDULE, tick)
    if now - tick > window:
        return None
    if state is None:
        return Planned(tick, 1, Trigger.CATCHUP, tick)
    if state.status in (RunStatus.RUNNING, RunStatus.SUCCESS) or state.attempt > policy.retries:
        return None
    if state.status == RunStatus.INTERRUPTED:
        return Planned(tick, state.attempt + 1, Trigger.TAKEOVER, now)
    ended = state.finished_at or now
    due = ended + policy.delay * 2 ** (state.attempt - 1)
    if due - tick > window:
        return None
    return Planned(tick, state.attempt + 1, Trigger.RETRY, due)


def next_retry(
    state: TickState | None, now: datetime, window: timedelta, policy: RetryPolicy
) -> datetime | None:
    """When the newest tick's failed attempt is due to be run again, if it will be."""
    if state is None:
        return None
    planned = next_attempt(state, state.tick, now, window, policy)
    return planned.due if planned is not None else None


def retry_times(
    windows: Mapping[str, timedelta], policy: RetryPolicy
) -> Callable[[str, JobStats, datetime], datetime | None]:
    """``next_retry`` for each job by name, given its catch-up window: what the runner plans
    and ``/metrics`` exports, for whoever needs it without the runner."""

    def due(job: str, stats: JobStats, now: datetime) -> datetime | None:
        return next_retry(stats.latest_attempt, now, windows[job], policy)

    return due
