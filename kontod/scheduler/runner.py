"""The runner: tick -> claimed run -> recorded outcome, once per attempt across replicas.

Scheduling re-reads the wall clock at least every ``RECHECK_S`` seconds instead of trusting one
long timer, so clock changes and suspends do not shift ticks. The database decides who runs an
attempt: the run row is keyed by (job, tick, attempt) and at most one row per job may be
``running``, so a replica that loses the insert skips it. A claimed run holds a lease that
``History`` renews; every write of the job is fenced by it, and its outcome is recorded with a
compare-and-set, retried until the database answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from kontod.scheduler import pauses, retries, runlist, runs, schedule
from kontod.scheduler.contract import (
    LOST,
    ClaimLost,
    Connection,
    Fence,
    JobSpec,
    RunContext,
    RunStatus,
    SkipReason,
    Trigger,
)
from kontod.scheduler.history import History, describe
from kontod.scheduler.retries import RetryPolicy

RECHECK_S = 30.0
RECORD_GRACE_S = 4.0  # how long a stopping runner still tries to record outcomes
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
    reason: SkipReason


@dataclass(frozen=True)
class Outcome:
    status: RunStatus
    error: str | None
    counts: Mapping[str, int]


class Runner:
    """Runs the declared jobs on their schedules and on demand."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        jobs: list[JobSpec],
        tz: ZoneInfo,
        instance: str,
        *,
        events: RunEvents | None = None,
        clock: Callable[[], datetime] = utcnow,
        lease_s: float = 30.0,
        retry: RetryPolicy | None = None,
        history: History | None = None,
        observers: Sequence[RunObserver] = (),
    ) -> None:
        self.pool = pool
        self.jobs = {spec.name: spec for spec in jobs}
        self.tz = tz
        self.instance = instance
        self.events: RunEvents = events or _NoEvents()
        self.clock = clock
        self.lease_s = lease_s
        self.retry = retry or RetryPolicy()
        self._next_retry = retries.retry_times(
            {spec.name: spec.catchup_window for spec in jobs}, self.retry
        )
        self.history = history or History(
            pool,
            instance,
            lease_s=lease_s,
            freshness=[probe for spec in jobs for probe in spec.exports.freshness],
        )
        # Told of each run's start and end, in this order (the board, pings, a progress display).
        self.observers: tuple[RunObserver, ...] = tuple(observers)
        # Every bookkeeping statement answers within this, or is given up and tried again.
        self.bookkeeping_s = min(5.0, lease_s / 3)
        self._active: dict[str, asyncio.Task[str]] = {}
        # Jobs this process is claiming or running.
        self._busy: set[str] = set()
        # Outcomes known but not yet recorded, by run id.
        self._pending: dict[int, asyncio.Task[None]] = {}
        # Runs cancelled because they lost their lease: they record nothing.
        self._lost: set[int] = set()
        # Per job, a tick that came while the job was paused: not made up after the resume.
        self._given_up: dict[str, datetime] = {}
        self._wake = {name: asyncio.Event() for name in self.jobs}
        # Set once a job's schedule has decided its start: a catch-up claimed, or none due.
        self._first_pass = {name: asyncio.Event() for name in self.jobs}
        self._prepared = False
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._started_history = False
        self.history.on_refresh(self._wake_all)

    @property
    def stats(self) -> dict[str, runs.JobStats]:
        """The per-job history cache (owned by ``History``)."""
        return self.history.stats

    # -- start and stop --------------------------------------------------------------------

    async def prepare(self) -> None:
        """Register the jobs, close the runs whose lease expired, load history, hold leases."""
        await self.history.bounded(runs.register_jobs(self.pool, self.jobs), self.bookkeeping_s)
        await self.history.reap()
        await self.history.refresh()
        self._start_history()
        self._prepared = True

    def _start_history(self) -> None:
        """The lease and housekeeping loops run from the first claim or prepare to stop."""
        if not self._started_history:
            self.history.start()
            self._started_history = True

    async def refresh_stats(self) -> dict[str, runs.JobStats]:
        return await self.history.refresh()

    async def start(self) -> None:
        """Follow each schedule, beginning with the catch-up of a recently missed tick."""
        now = self.clock()
        if not self._prepared:
            await self.prepare()
        for spec in self.jobs.values():
            if spec.not_configured:
                log.info("job.not_configured", job=spec.name, reason=spec.not_configured)
                self._first_pass[spec.name].set()
                continue
            log.info(
                "job.registered",
                job=spec.name,
                schedule=spec.schedule,
                timezone=self.tz.key,
                next_run=schedule.next_tick(spec.schedule, self.tz, now).isoformat(),
            )
            self._loops.append(
                asyncio.create_task(self._follow(spec), name=f"schedule:{spec.name}")
            )

    async def stop(self, grace_s: float) -> None:
        """Take no more ticks; let running jobs finish for ``grace_s`` seconds, then cancel them.

        Outcomes still unrecorded get ``RECORD_GRACE_S`` more; then the leases stop.
        """
        self._stopping.set()
        self._wake_all()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        active = list(self._active.values())
        if active:
            log.info("runner.waiting", jobs=sorted(self._active), timeout_s=grace_s)
            _, pending = await asyncio.wait(active, timeout=grace_s)
            for run in pending:
                run.cancel()  # each records itself as interrupted
        # Outcomes still being written (the database may be away) get a last, bounded chance.
        unfinished: list[asyncio.Task[Any]] = [*active, *self._pending.values()]
        if unfinished:
            await asyncio.wait(unfinished, timeout=RECORD_GRACE_S)
        left: list[asyncio.Task[Any]] = [
            t for t in [*active, *self._pending.values()] if not t.done()
        ]
        for task in left:
            task.cancel()
        if left:
            # A task still there after this waits on a database that does not answer (a
            # rollback, say); closing the pool, the daemon's next step, ends it.
            await asyncio.wait(left, timeout=1.0)
        await self.history.stop()

    @property
    def loops(self) -> list[asyncio.Task[None]]:
        return list(self._loops)

    async def first_pass(self, job: str) -> None:
        """Wait until the schedule of ``job`` has made its first decision after ``start``: the
        catch-up of a missed tick claimed (``active`` then has its run), or none due. Whoever
        starts a run by hand at start (the demo) asks after this, or races the catch-up."""
        await self._first_pass[job].wait()

    def active(self, job: str) -> asyncio.Task[str] | None:
        """The task of the run of ``job`` this process has in progress, if any."""
        return self._active.get(job)

    def next_retry(self, job: str, stats: runs.JobStats, now: datetime) -> datetime | None:
        """When the newest tick of ``job`` is due to be tried again, if it will be."""
        return self._next_retry(job, stats, now)

    # -- scheduling ------------------------------------------------------------------------

    def _wake_all(self) -> None:
        for event in self._wake.values():
            event.set()

    async def _follow(self, spec: JobSpec) -> None:
        awaited: datetime | None = None  # the tick this loop last slept for
        while not self._stopping.is_set():
            now = self.clock()
            plan = await self._plan(spec, now, awaited)
            if plan is not None and plan.due <= now:
                await self._run_planned(spec, plan)
                plan = None  # what comes next is decided once this is known
            self._first_pass[spec.name].set()
            awaited = schedule.next_tick(spec.schedule, self.tz, now)
            wake_at = awaited if plan is None else min(awaited, plan.due)
            if not await self._sleep_until(wake_at, self._wake[spec.name]):
                return
            await asyncio.sleep(0)  # never hold the loop, whatever the clock says

    async def _plan(
        self, spec: JobSpec, now: datetime, awaited: datetime | None
    ) -> retries.Planned | None:
        """The next attempt due for the job's newest tick (only the newest tick counts)."""
        tick = schedule.previous_tick(spec.schedule, self.tz, now)
        on_time = tick == awaited
        if self._given_up.get(spec.name) == tick:
            return None
        if not on_time and now - tick > spec.catchup_window:
            return None
        try:
            state, busy = await self.history.bounded(
                runs.tick_state(self.pool, spec.name, tick), self.bookkeeping_s
            )
        except Exception as exc:  # the database may be briefly away: the next wake retries
            log.warning("tick.state_failed", job=spec.name, error=describe(exc))
            return None
        plan = retries.next_attempt(
            state, tick, now, spec.catchup_window, self.retry, on_time=on_time
        )
        if plan is not None and busy and plan.trigger != Trigger.SCHEDULE:
            # A run of the job goes on (another replica's run of this tick, a manual one, a
            # stale row not yet reaped): the attempt waits for its end, woken by the history
            # refresh, rather than trying a claim that must fail at every wake.
            return None
        return plan

    async def _run_planned(self, spec: JobSpec, plan: retries.Planned) -> None:
        if plan.trigger == Trigger.CATCHUP:
            log.info("tick.catchup", job=spec.name, scheduled_for=plan.tick.isoformat())
        elif plan.trigger in (Trigger.TAKEOVER, Trigger.RETRY):
            log.info(
                "tick.retry" if plan.trigger == Trigger.RETRY else "tick.takeover",
                job=spec.name,
                scheduled_for=plan.tick.isoformat(),
                attempt=plan.attempt,
            )
        try:
            outcome = await self.trigger(spec.name, plan.trigger, plan.tick, attempt=plan.attempt)
        except Exception as exc:
            # Whatever fails (the database may be briefly away), the schedule goes on and the
            # next wake tries again.
            log.exception(
                "tick.failed",
                job=spec.name,
                scheduled_for=plan.tick.isoformat(),
                error=describe(exc),
            )
            return
        if isinstance(outcome, Skipped) and outcome.reason == SkipReason.PAUSED:
            # A paused tick is not made up later: resuming starts afresh. A tick lost to
            # another run (``claimed``, ``overlap``) is not given up: when that run ends
            # without success, the tick is taken over, retried or caught up as usual.
            self._given_up[spec.name] = plan.tick

    async def _sleep_until(self, when: datetime, wake: asyncio.Event) -> bool:
        """Wait for the wall clock to reach ``when`` or for ``wake``; False when stopping."""
        while not self._stopping.is_set():
            remaining = (when - self.clock()).total_seconds()
            if remaining <= 0:
                return True
            # asyncio.timeout, not wait_for, which on Python 3.11 can drop a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, RECHECK_S)):
                    await wake.wait()
            if wake.is_set():
                wake.clear()
                return not self._stopping.is_set()
        return False

    # -- running ---------------------------------------------------------------------------

    async def trigger(
        self,
        name: str,
        trigger: Trigger | str,
        scheduled_for: datetime | None = None,
        *,
        attempt: int = 1,
        requested_by: str | None = None,
        reason: str | None = None,
    ) -> Started | Skipped:
        """Claim a run of ``name`` and start it in the background (ValueError for a trigger
        that is not a ``Trigger``)."""
        trigger = Trigger(trigger)
        spec = self.jobs.get(name)
        if spec is None:
            raise UnknownJob(name)
        if self._stopping.is_set():
            return self._skip(spec, SkipReason.STOPPING, trigger, scheduled_for)
        # Read from the database at every tick, so a pause made on any replica holds here.
        if trigger != Trigger.MANUAL:
            held = await self.history.bounded(
                pauses.current(self.pool, name, self.clock()), self.bookkeeping_s
            )
            if held is not None:
                return self._skip(spec, SkipReason.PAUSED, trigger, scheduled_for)
        if name in self._busy:
            return self._skip(spec, SkipReason.OVERLAP, trigger, scheduled_for)
        self._busy.add(name)
        try:
            run_id = await self.history.bounded(
                runs.claim(
                    self.pool, name, trigger, scheduled_for, attempt, self.instance, self.lease_s
                ),
                self.bookkeeping_s,
            )
            if run_id is None:
                reason = await self.history.bounded(
                    runs.why_not_claimed(self.pool, name, scheduled_for), self.bookkeeping_s
                )
                self._busy.discard(name)
                return self._skip(spec, reason, trigger, scheduled_for)
        except BaseException:
            self._busy.discard(name)
            raise
        self._start_history()
        self.history.hold(run_id, lambda: self._lose(name, run_id))
        if requested_by is not None:
            await self._record_request(run_id, requested_by, reason)
        if self._stopping.is_set():
            # stop() began during the claim and will not wait for this run: give it back.
            await self._write_outcome(
                spec, run_id, Outcome(RunStatus.INTERRUPTED, "kontod was stopping", {})
            )
            self._busy.discard(name)
            return self._skip(spec, SkipReason.STOPPING, trigger, scheduled_for)
        task = asyncio.create_task(
            self._execute(spec, run_id, trigger, scheduled_for, attempt),
            name=f"run:{name}:{run_id}",
        )
        self._active[name] = task

        def done(_: asyncio.Task[str]) -> None:
            self._active.pop(name, None)
            self._busy.discard(name)
            self._lost.discard(run_id)
            self._wake[name].set()  # a failure may call for a retry

        task.add_done_callback(done)
        return Started(run_id, task)

    async def _record_request(self, run_id: int, by: str, reason: str | None) -> None:
        try:
            await self.history.bounded(
                runlist.record_request(self.pool, run_id, by, reason), self.bookkeeping_s
            )
        except Exception as exc:  # who asked is worth keeping, not worth losing the run over
            log.warning("run.request_not_recorded", run_id=run_id, error=describe(exc))

    def _skip(
        self, spec: JobSpec, reason: SkipReason, trigger: Trigger, scheduled_for: datetime | None
    ) -> Skipped:
        if trigger == Trigger.MANUAL:
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

    def _lose(self, name: str, run_id: int) -> None:
        """The lease of ``run_id`` is gone: stop the run; it records nothing."""
        if run_id in self._pending:
            return  # its outcome is being written; the write will find out
        task = self._active.get(name)
        if task is not None and not task.done():
            self._lost.add(run_id)
            task.cancel()

    def _fence(self, run_id: int) -> Fence:
        statement_ms = int(self.lease_s * 1000)
        idle_ms = int(self.lease_s * 1000 / 3)

        async def fence(conn: Connection) -> None:
            if not conn.is_in_transaction():
                raise RuntimeError("check_claim must be called inside the write transaction")
            held = await self.history.bounded(
                runs.fence(conn, run_id, self.instance, statement_ms, idle_ms),
                self.bookkeeping_s,
            )
            if not held:
                raise ClaimLost(f"run {run_id} no longer holds its lease")

        return fence

    async def _execute(
        self,
        spec: JobSpec,
        run_id: int,
        trigger: Trigger,
        scheduled_for: datetime | None,
        attempt: int,
    ) -> str:
        structlog.contextvars.bind_contextvars(job=spec.name, run_id=run_id)
        started = self.clock()
        began = time.monotonic()
        run_log = structlog.get_logger("kontod.job")
        ctx = RunContext(run_id, spec.name, trigger, scheduled_for, started, run_log)
        ctx.fence = self._fence(run_id)
        run_log.info(
            "run.started",
            trigger=trigger,
            attempt=attempt,
            scheduled_for=scheduled_for.isoformat() if scheduled_for else None,
        )
        for observer in self.observers:
            observer.run_started(ctx)
        status: RunStatus = RunStatus.SUCCESS
        error: str | None = None
        limit = asyncio.timeout(spec.max_runtime.total_seconds())
        try:
            async with limit:
                await spec.body(ctx)
        except ClaimLost as exc:
            self._observe_end(ctx, LOST, describe(exc), began)
            return self._abandon(run_id, describe(exc))
        except TimeoutError as exc:
            if limit.expired():
                status = RunStatus.TIMEOUT
                error = f"exceeded its maximum run time of {spec.max_runtime.total_seconds():g} s"
            else:
                status, error = RunStatus.ERROR, describe(exc)
        except asyncio.CancelledError:
            if run_id in self._lost:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                self._observe_end(ctx, LOST, "its lease was lost", began)
                return self._abandon(run_id, "its lease was lost")
            status, error = RunStatus.INTERRUPTED, "cancelled while kontod was stopping"
            try:
                await self._record(spec, run_id, Outcome(status, error, dict(ctx.counts)), began)
            finally:
                self._observe_end(ctx, status, error, began)
            raise
        except Exception as exc:  # a job's failure is recorded, never fatal to the daemon
            if run_id in self._lost or isinstance(exc.__cause__, ClaimLost):
                self._observe_end(ctx, LOST, describe(exc), began)
                return self._abandon(run_id, describe(exc))
            status, error = RunStatus.ERROR, describe(exc)
            run_log.exception("run.failed", error=error)
        # The observers hear of the end once it is recorded, so that what they show or send
        # next (the status page reloading the run table, a ping) already finds it written.
        try:
            await self._record(spec, run_id, Outcome(status, error, dict(ctx.counts)), began)
        finally:
            self._observe_end(ctx, status, error, began)
        return status

    def _observe_end(self, ctx: RunContext, status: str, error: str | None, began: float) -> None:
        """Tell the observers how a run ended (``lost``: it lost its claim and records nothing)."""
        for observer in self.observers:
            observer.run_ended(ctx, status, error, time.monotonic() - began)

    def _abandon(self, run_id: int, why: str) -> str:
        """A run that lost its claim stops here: it writes and records nothing more."""
        self.history.release(run_id)
        log.error("run.claim_lost", run_id=run_id, reason=why)
        return LOST

    async def _record(self, spec: JobSpec, run_id: int, outcome: Outcome, began: float) -> None:
        """Report the outcome, then write it; the write goes on if this task is cancelled."""
        duration = time.monotonic() - began
        level = "info" if outcome.status == RunStatus.SUCCESS else "error"
        getattr(log, level)(
            "run.finished",
            status=outcome.status,
            duration_s=round(duration, 3),
            error=outcome.error,
            counts=dict(outcome.counts),
        )
        self.events.run_finished(spec.name, outcome.status, duration, outcome.counts)
        writer = asyncio.create_task(
            self._write_outcome(spec, run_id, outcome), name=f"record:{spec.name}:{run_id}"
        )
        self._pending[run_id] = writer
        writer.add_done_callback(lambda _: self._pending.pop(run_id, None))
        await asyncio.shield(writer)

    async def _write_outcome(self, spec: JobSpec, run_id: int, outcome: Outcome) -> None:
        """Write the outcome with a compare-and-set; retried until the database answers."""
        delay = 0.5
        try:
            while True:
                try:
                    written = await self.history.bounded(
                        runs.finish(
                            self.pool,
                            run_id,
                            self.instance,
                            outcome.status,
                            outcome.error,
                            outcome.counts,
                        ),
                        self.bookkeeping_s,
                    )
                    break
                except Exception as exc:  # the database may be failing over: keep it, retry
                    log.error("run.record_failed", run_id=run_id, error=describe(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.lease_s / 3)
        except asyncio.CancelledError:
            log.error(
                "run.unrecorded",
                run_id=run_id,
                status=outcome.status,
                error=outcome.error,
                counts=dict(outcome.counts),
            )
            raise
        finally:
            self.history.release(run_id)
        if not written:
            # Its lease expired and another replica marked it interrupted meanwhile.
            log.error(
                "run.record_lost",
                job=spec.name,
                run_id=run_id,
                status=outcome.status,
                error=outcome.error,
                counts=dict(outcome.counts),
            )
        await self.history.refresh()
