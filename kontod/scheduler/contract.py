"""The contract between the runner and a job: what a job declares and what a run hands it."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from kontod.db import Connection as Connection  # the jobs take it from their contract


class ClaimLost(Exception):
    """The run no longer holds its claim: it must write nothing more and stop."""


Fence = Callable[[Connection], Awaitable[None]]


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
    trigger: str
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

    def report_progress(self, done: int, expected: int | None) -> None:
        """Record how many items are done and how many are expected (None: not known yet)."""
        self.progress_done = done
        self.progress_expected = expected

    @property
    def at(self) -> datetime:
        """The instant the run belongs to: its scheduled tick, or its start for a manual run."""
        return self.scheduled_for or self.started_at


JobBody = Callable[[RunContext], Awaitable[None]]


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
