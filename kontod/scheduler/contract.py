"""The contract between the runner and a job: what a job declares and what a run hands it.

Besides its body and schedule, a job declares as plain data what it exports beyond its plain
counts (``JobExports``): the platform renders any job's declarations and names none itself.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg
import structlog

from kontod.db import Connection as Connection  # the jobs take it from their contract


class ClaimLost(Exception):
    """The run no longer holds its claim: it must write nothing more and stop."""


Fence = Callable[[Connection], Awaitable[None]]


class RunStatus(StrEnum):
    """The status of a run as the run table stores it."""

    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"


# The statuses that count as a failed run.
FAILED_STATUSES = (RunStatus.ERROR, RunStatus.TIMEOUT, RunStatus.INTERRUPTED)
# How the observers hear of a run that lost its claim: it records nothing, so it has no
# stored status.
LOST = "lost"


class Trigger(StrEnum):
    """Why a run was started, as the run table stores it."""

    SCHEDULE = "schedule"  # its tick came while the runner waited for it
    CATCHUP = "catchup"  # a recent tick without a run, found at start or after a gap
    TAKEOVER = "takeover"  # the tick's run was interrupted (its owner stopped or vanished)
    RETRY = "retry"  # the tick's run failed and the retry policy tries again
    MANUAL = "manual"  # someone asked (HTTP, CLI, demo)


class SkipReason(StrEnum):
    """Why a tick or a manual request started no run."""

    OVERLAP = "overlap"  # another run of the job goes on
    CLAIMED = "claimed"  # another replica has this tick, running or ended
    PAUSED = "paused"  # the job is paused (scheduled ticks only)
    STOPPING = "stopping"  # this kontod is shutting down


@dataclass(frozen=True)
class CountFamily:
    """Counts of a run that share a prefix and differ by one label value (``<prefix><value>``),
    exported as one metric family with that label.

    The run stores them under ``key(value)`` like any count; the metric is read from the last
    finished run's counts, so every replica exports the same values after a restart.
    """

    metric: str
    doc: str
    prefix: str
    label: str
    # Whether the family carries a ``job_name`` label (False: one job owns the metric).
    per_job: bool = True
    # Label values exported at 0 when the run has none, so that rules comparing with an hour
    # or a day ago always have both sides.
    always: tuple[str, ...] = ()
    # Factor from the stored count to the metric's unit (days to seconds, say).
    scale: float = 1.0
    # The family is exported only when the run has a count starting with this prefix (None:
    # the family's own prefix): a run that did not get that far exports nothing stale.
    shown_with: str | None = None
    # Whether these counts also appear in ``kontod_job_last_run_counts``.
    in_run_counts: bool = True

    def key(self, value: str) -> str:
        """The count under which the run stores the value for ``value``."""
        return self.prefix + value

    def values(self, counts: Mapping[str, int]) -> dict[str, int] | None:
        """The family's values by label in ``counts`` (with the ``always`` ones), or None
        when the run exported none."""
        gate = self.shown_with or self.prefix
        if not any(key.startswith(gate) for key in counts):
            return None
        out = dict.fromkeys(self.always, 0)
        for key, value in counts.items():
            if key.startswith(self.prefix):
                out[key.removeprefix(self.prefix)] = value
        return out


# Reads how fresh a job's output is (the newest date it wrote), None when there is none.
Probe = Callable[[asyncpg.Pool], Awaitable[date | datetime | None]]


@dataclass(frozen=True)
class Freshness:
    """A probe of how fresh a job's output is, read with the run table's stats and exported as
    ``metric``: a timestamp, or midnight in kontod's zone for a date."""

    metric: str
    doc: str
    probe: Probe


@dataclass(frozen=True)
class JobExports:
    """What a job exports besides its plain counts, for metrics, rules and the dashboard."""

    families: tuple[CountFamily, ...] = ()
    freshness: tuple[Freshness, ...] = ()
    # The count of the items the job found to work on: a success that found none, or far
    # fewer than the success before it, is suspicious (None: the job has no such count).
    population: str | None = None
    # Further POST paths that start a manual run of the job (an older client's own route).
    trigger_paths: tuple[str, ...] = ()


async def _no_fence(conn: Connection) -> None:
    """The fence of a run that nothing can take over (tests that build a RunContext by hand)."""


@dataclass
class RunContext:
    """What one run of a job receives; the job fills ``counts`` as it goes.

    ``counts`` are stored with the run (and exported as the last run's counts); keys that
    start with ``items_`` are also the items processed by outcome (``items_failed`` -> outcome
    ``failed``).
    """

    run_id: int
    job: str
    trigger: Trigger | str
    scheduled_for: datetime | None
    started_at: datetime
    log: structlog.typing.FilteringBoundLogger
    counts: Counter[str] = field(default_factory=Counter)
    # Set by the runner: checks, inside the caller's transaction, that this run still holds
    # its claim, and raises ClaimLost otherwise.
    fence: Fence = _no_fence
    # Progress as the job last reported it (per batch, never per row).
    progress_done: int = 0
    progress_expected: int | None = None

    async def check_claim(self, conn: Connection) -> None:
        """Call inside every write transaction: raises ClaimLost when the run lost its claim."""
        await self.fence(conn)

    def count_in(self, family: CountFamily, value: str, n: int = 1) -> None:
        """Add ``n`` to the count of ``family`` for the label ``value``."""
        self.counts[family.key(value)] += n

    def set_in(self, family: CountFamily, value: str, n: int) -> None:
        """Set the count of ``family`` for the label ``value`` (a level, not a tally)."""
        self.counts[family.key(value)] = n

    def report_progress(self, done: int, expected: int | None) -> None:
        """Record how many items are done and how many are expected (None: not known yet)."""
        self.progress_done = done
        self.progress_expected = expected

    @property
    def at(self) -> datetime:
        """The instant the run belongs to: its scheduled tick, or its start for a manual run."""
        return self.scheduled_for or self.started_at


JobBody = Callable[[RunContext], Awaitable[None]]
# Says, once at start, why a job cannot run against this database (None: it can), such as a
# Konto table or column the job needs and the database lacks.
Requirement = Callable[[], Awaitable[str | None]]


async def run_workers(work: Callable[[], Coroutine[Any, Any, None]], count: int, name: str) -> None:
    """Run ``count`` copies of ``work`` at once (workers sharing one source of items). When one
    fails the others are cancelled, and one error ends the run, not the group around it: a
    lost claim first, whichever worker met it, so that the runner records nothing; else the
    first."""
    if count <= 1:
        await work()
        return
    try:
        async with asyncio.TaskGroup() as group:
            for n in range(count):
                group.create_task(work(), name=f"{name}-worker-{n}")
    except ExceptionGroup as errors:
        lost = [e for e in errors.exceptions if isinstance(e, ClaimLost)]
        raise (lost or errors.exceptions)[0] from None


@dataclass(frozen=True)
class JobSpec:
    """One scheduled job as the runner sees it."""

    name: str
    schedule: str
    body: JobBody
    grace: timedelta
    max_runtime: timedelta
    catchup_window: timedelta
    description: str = ""
    # Set when the job is registered but has nothing to do here; health reports it, the
    # runner does not schedule it.
    not_configured: str | None = None
    exports: JobExports = field(default_factory=JobExports)
    # Checked by ``settle`` once the database is open: a reason makes the job not configured.
    requires: Requirement | None = None


async def settle(specs: list[JobSpec]) -> list[JobSpec]:
    """The jobs, each whose requirement gives a reason marked not configured with it (a job
    already not configured keeps its own reason and is not asked)."""
    settled = []
    for spec in specs:
        if spec.requires is not None and spec.not_configured is None:
            reason = await spec.requires()
            if reason is not None:
                spec = replace(spec, not_configured=reason)
        settled.append(spec)
    return settled
