"""The runner: turns schedules into runs, once per tick across replicas, and records each run.

Scheduling re-reads the wall clock at least every ``RECHECK_S`` seconds instead of trusting one
long timer, so clock changes and suspends do not shift ticks. The database decides who runs a
tick: the run row is keyed by (job, scheduled time) and at most one row per job may be
``running``, so a replica that loses the insert skips the tick.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from kontod import pauses, runlist, runs, schedule
from kontod.job import JobSpec, RunContext

RECHECK_S = 30.0
RECORD_ATTEMPTS = 4  # over about 7 s
log = structlog.get_logger("kontod.runner")


def utcnow() -> datetime:
    return datetime.now(UTC)


class RunEvents(Protocol):
    """What the runner reports as it goes (the daemon turns it into metrics)."""

    def run_finished(
        self, job: str, status: str, duration_s: float, counts: Mapping[str, int]
    ) -> None: ...

    def tick_skipped(self, job: str, reason: str) -> None: ...


class RunObserver(Protocol):
    """Follows each run of this process from its start (pings, progress)."""

    def run_started(self, ctx: RunContext) -> None: ...

    def run_ended(
        self, ctx: RunContext, status: str, error: str | None, duration_s: float
    ) -> None: ...


class _NoEvents:
    def run_finished(
        self, job: str, status: str, duration_s: float, counts: Mapping[str, int]
    ) -> None:
        pass

    def tick_skipped(self, job: str, reason: str) -> None:
        pass


class UnknownJob(KeyError):
    pass


@dataclass(frozen=True)
class Started:
    """A run that was claimed and is now going; ``task`` ends when it is recorded."""

    run_id: int
    task: asyncio.Task[str]


@dataclass(frozen=True)
class Skipped:
    reason: str  # "overlap" or "claimed"


class Runner:
    """Runs the declared jobs on their schedules and on demand."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        jobs: list[JobSpec],
        tz: ZoneInfo,
        owner: str,
        *,
        events: RunEvents | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.pool = pool
        self.jobs = {spec.name: spec for spec in jobs}
        self.tz = tz
        self.owner = owner
        self.events: RunEvents = events or _NoEvents()
        self.clock = clock
        self.stats: dict[str, runs.JobStats] = {}
        self.observers: list[RunObserver] = []
        self._active: dict[str, asyncio.Task[str]] = {}
        # Jobs this process is claiming or running.
        self._busy: set[str] = set()
        # Runs of this process that ended but whose end could not be recorded.
        self._unrecorded: set[int] = set()
        self._prepared = False
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    # -- start and stop --------------------------------------------------------------------

    async def prepare(self) -> None:
        """Register the jobs and close the runs of processes that died."""
        await runs.register_jobs(self.pool, self.jobs)
        await self.reap()
        await self.refresh_stats()
        self._prepared = True

    async def reap(self) -> None:
        """Mark ``interrupted`` the runs nobody is running any more (see runs.reap_orphans)."""
        for run_id, job in await runs.reap_orphans(self.pool, self.owner, set(self._unrecorded)):
            self._unrecorded.discard(run_id)
            log.warning("run.interrupted_found", job=job, run_id=run_id)

    async def start(self) -> None:
        """Catch up on a recently missed tick, then follow each schedule."""
        now = self.clock()
        if not self._prepared:
            await self.prepare()
        for spec in self.jobs.values():
            if spec.not_configured:
                log.info("job.not_configured", job=spec.name, reason=spec.not_configured)
                continue
            log.info(
                "job.registered",
                job=spec.name,
                schedule=spec.schedule,
                timezone=self.tz.key,
                next_run=schedule.next_tick(spec.schedule, self.tz, now).isoformat(),
            )
            await self._catch_up(spec, now)
            # Following from the same instant as the catch-up leaves no tick in between.
            self._loops.append(
                asyncio.create_task(self._follow(spec, now), name=f"schedule:{spec.name}")
            )

    async def stop(self, grace_s: float) -> None:
        """Take no more ticks; let running jobs finish for ``grace_s`` seconds, then cancel them."""
        self._stopping.set()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        active = list(self._active.values())
        if active:
            log.info("runner.waiting", jobs=sorted(self._active), timeout_s=grace_s)
            _, pending = await asyncio.wait(active, timeout=grace_s)
            for run in pending:
                run.cancel()
            await asyncio.gather(*active, return_exceptions=True)

    @property
    def loops(self) -> list[asyncio.Task[None]]:
        return list(self._loops)

    def active(self, job: str) -> asyncio.Task[str] | None:
        """The task of the run of ``job`` this process has in progress, if any."""
        return self._active.get(job)

    # -- scheduling ------------------------------------------------------------------------

    async def _catch_up(self, spec: JobSpec, now: datetime) -> None:
        tick = schedule.previous_tick(spec.schedule, self.tz, now)
        if now - tick > spec.catchup_window:
            return
        if await runs.tick_done(self.pool, spec.name, tick):
            return
        log.info("tick.catchup", job=spec.name, scheduled_for=tick.isoformat())
        await self.trigger(spec.name, "catchup", tick)

    async def _follow(self, spec: JobSpec, start: datetime) -> None:
        tick = schedule.next_tick(spec.schedule, self.tz, start)
        while await self._sleep_until(tick):
            try:
                await self.trigger(spec.name, "schedule", tick)
            except Exception as exc:
                # Whatever fails (the database may be briefly away), the schedule goes on and
                # the next tick tries again.
                log.exception(
                    "tick.failed",
                    job=spec.name,
                    scheduled_for=tick.isoformat(),
                    error=_describe(exc),
                )
            # After a long stall, skip the ticks that passed meanwhile: only the latest counts.
            tick = schedule.next_tick(spec.schedule, self.tz, max(tick, self.clock()))
            await asyncio.sleep(0)  # never hold the loop, whatever the clock says

    async def _sleep_until(self, when: datetime) -> bool:
        """Wait for the wall clock to reach ``when``; False when stopping."""
        while not self._stopping.is_set():
            remaining = (when - self.clock()).total_seconds()
            if remaining <= 0:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=min(remaining, RECHECK_S))
        return False

    # -- running ---------------------------------------------------------------------------

    async def trigger(
        self,
        name: str,
        trigger: str,
        scheduled_for: datetime | None = None,
        *,
        requested_by: str | None = None,
        reason: str | None = None,
    ) -> Started | Skipped:
        """Claim a run of ``name`` and start it in the background."""
        spec = self.jobs.get(name)
        if spec is None:
            raise UnknownJob(name)
        if self._stopping.is_set():
            return self._skip(spec, "stopping", trigger, scheduled_for)
        # Read from the database at every tick, so a pause made on any replica holds here.
        if trigger != "manual" and await pauses.current(self.pool, name, self.clock()):
            return self._skip(spec, "paused", trigger, scheduled_for)
        if name in self._busy:
            return self._skip(spec, "overlap", trigger, scheduled_for)
        self._busy.add(name)
        try:
            await self.reap()
            run_id = await runs.claim(self.pool, name, trigger, scheduled_for, self.owner)
            if run_id is None:
                reason = await runs.why_not_claimed(self.pool, name)
                self._busy.discard(name)
                return self._skip(spec, reason, trigger, scheduled_for)
            if self._stopping.is_set():
                # stop() began during the claim and will not wait for this run: give it back.
                await runs.finish(self.pool, run_id, "interrupted", "kontod was stopping", {})
                self._busy.discard(name)
                return self._skip(spec, "stopping", trigger, scheduled_for)
            if requested_by is not None:
                await self._record_request(run_id, requested_by, reason)
        except BaseException:
            self._busy.discard(name)
            raise
        task = asyncio.create_task(
            self._execute(spec, run_id, trigger, scheduled_for), name=f"run:{name}:{run_id}"
        )
        self._active[name] = task

        def done(_: asyncio.Task[str]) -> None:
            self._active.pop(name, None)
            self._busy.discard(name)

        task.add_done_callback(done)
        return Started(run_id, task)

    async def _record_request(self, run_id: int, by: str, reason: str | None) -> None:
        try:
            await runlist.record_request(self.pool, run_id, by, reason)
        except Exception as exc:  # who asked is worth keeping, not worth losing the run over
            log.warning("run.request_not_recorded", run_id=run_id, error=_describe(exc))

    def _skip(
        self, spec: JobSpec, reason: str, trigger: str, scheduled_for: datetime | None
    ) -> Skipped:
        if trigger == "manual":
            log.warning("run.refused", job=spec.name, reason=reason)
            return Skipped(reason)
        log.warning(
            "tick.skipped",
            job=spec.name,
            reason=reason,
            trigger=trigger,
            scheduled_for=scheduled_for.isoformat() if scheduled_for else None,
        )
        self.events.tick_skipped(spec.name, reason)
        return Skipped(reason)

    async def _execute(
        self, spec: JobSpec, run_id: int, trigger: str, scheduled_for: datetime | None
    ) -> str:
        structlog.contextvars.bind_contextvars(job=spec.name, run_id=run_id)
        started = self.clock()
        run_log = structlog.get_logger("kontod.job")
        ctx = RunContext(run_id, spec.name, trigger, scheduled_for, started, run_log)
        run_log.info(
            "run.started",
            trigger=trigger,
            scheduled_for=scheduled_for.isoformat() if scheduled_for else None,
        )
        for observer in self.observers:
            observer.run_started(ctx)
        status, error = "success", None
        limit = asyncio.timeout(spec.max_runtime.total_seconds())
        try:
            async with limit:
                await spec.body(ctx)
        except TimeoutError as exc:
            if limit.expired():
                status = "timeout"
                error = f"exceeded its maximum run time of {spec.max_runtime.total_seconds():g} s"
            else:
                status, error = "error", _describe(exc)
        except asyncio.CancelledError:
            status, error = "interrupted", "cancelled while kontod was stopping"
            await self._record(spec, run_id, status, error, ctx, started)
            raise
        except Exception as exc:  # a job's failure is recorded, never fatal to the daemon
            status, error = "error", _describe(exc)
            run_log.exception("run.failed", error=error)
        await self._record(spec, run_id, status, error, ctx, started)
        return status

    async def _record(
        self,
        spec: JobSpec,
        run_id: int,
        status: str,
        error: str | None,
        ctx: RunContext,
        started: datetime,
    ) -> None:
        duration = (self.clock() - started).total_seconds()
        counts = dict(ctx.counts)
        for attempt in range(RECORD_ATTEMPTS):
            try:
                await runs.finish(self.pool, run_id, status, error, counts)
                break
            except Exception as exc:  # the database may be failing over: try again shortly
                log.error("run.record_failed", attempt=attempt + 1, error=_describe(exc))
                if attempt + 1 < RECORD_ATTEMPTS:
                    await asyncio.sleep(2**attempt)
        else:
            # The row stays 'running'; the next reap marks it interrupted so it blocks nothing.
            self._unrecorded.add(run_id)
        level = "info" if status == "success" else "error"
        getattr(ctx.log, level)(
            "run.finished", status=status, duration_s=round(duration, 3), error=error, counts=counts
        )
        self.events.run_finished(spec.name, status, duration, counts)
        for observer in self.observers:
            observer.run_ended(ctx, status, error, duration)
        await self.refresh_stats()

    async def refresh_stats(self) -> dict[str, runs.JobStats]:
        """Reload the per-job history from the run table (the cache metrics read)."""
        try:
            self.stats = await runs.job_stats(self.pool)
        except Exception as exc:  # a cache refresh may fail; the last known history stays
            log.warning("stats.refresh_failed", error=_describe(exc))
        return self.stats


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
