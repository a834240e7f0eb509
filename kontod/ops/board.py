"""The operator's view of each job: health with pauses, suspicious success, progress, last runs.

``/health/cron``, ``/metrics`` and the status page all read this one view, so they agree. The
``Board`` keeps what it needs from the database in memory (pauses, the verdict on the last
run, the last runs), re-read by its own loop every ``CACHE_S`` seconds, and follows the runs
of this process as they go (their progress). Requests never query for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from kontod.ops import suspicion
from kontod.ops.health import Verdict, assess_job
from kontod.ops.suspicion import Suspicion, Thresholds
from kontod.scheduler import runlist
from kontod.scheduler.contract import JobSpec, RunContext
from kontod.scheduler.pauses import CACHE_S, Pause, PauseCache, PauseState
from kontod.scheduler.runs import JobStats

BARS = 30
log = structlog.get_logger("kontod.board")


@dataclass(frozen=True)
class Progress:
    """Where a running run stands: items done and expected, rate, estimated end."""

    done: int
    expected: int | None
    started_at: datetime
    ratio: float | None
    rate_per_s: float | None
    eta: datetime | None


def progress_of(done: int, expected: int | None, started_at: datetime, now: datetime) -> Progress:
    """Ratio, rate and estimated end from the counts a run last reported."""
    elapsed = (now - started_at).total_seconds()
    ratio = min(done / expected, 1.0) if expected else None
    rate = done / elapsed if elapsed > 0 and done > 0 else None
    eta = None
    if rate and expected is not None and expected >= done:
        eta = now + timedelta(seconds=(expected - done) / rate)
    return Progress(done, expected, started_at, ratio, rate, eta)


@dataclass(frozen=True)
class JobView:
    spec: JobSpec
    stats: JobStats
    verdict: Verdict
    pause: Pause | None
    suspicion: Suspicion
    progress: Progress | None
    runs: list[runlist.Run]


def verdict_of(
    spec: JobSpec,
    tz: ZoneInfo,
    stats: JobStats,
    state: PauseState,
    pause: Pause | None,
    now: datetime,
) -> Verdict:
    """The job's health, knowing its pauses: healthy while paused, and a tick that fell inside
    a pause is not missed."""
    ended = state.last_ended_at
    if ended is not None and (stats.registered_at is None or stats.registered_at < ended):
        stats = dataclasses.replace(stats, registered_at=ended)
    verdict = assess_job(spec, tz, stats, now)
    if pause is not None and not spec.not_configured:
        until = f" until {pause.until.isoformat()}" if pause.until else ""
        reason = f"paused by {pause.by}{until}: {pause.reason}"
        return Verdict(True, reason, verdict.last_tick, verdict.next_tick)
    return verdict


class Board:
    """The cached operator state of every job, and its only writer; also a run observer.

    ``run`` re-reads pauses, the verdict on each job's last run and the last runs every
    ``CACHE_S`` seconds (sooner after a run of this process ends); requests only read.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        jobs: list[JobSpec],
        tz: ZoneInfo,
        thresholds: Mapping[str, Thresholds] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pool = pool
        self.jobs = jobs
        self.tz = tz
        self.clock = clock
        names = [spec.name for spec in jobs]
        self.thresholds = suspicion.for_jobs(suspicion.populations(jobs), thresholds or {})
        self.pauses = PauseCache(pool, names)
        self.suspicions: dict[str, Suspicion] = {}
        self.runs: dict[str, list[runlist.Run]] = {}
        self.running: dict[str, RunContext] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Bumped whenever the cached state changes (a page rendered from it can be reused).
        self.version = 0

    async def refresh(self) -> None:
        """Re-read pauses, the last-run verdicts and the last runs; on a failure the last known
        state stays."""
        try:
            async with asyncio.timeout(CACHE_S * 2):
                await self.pauses.refresh(self.clock())
                self.suspicions = await suspicion.latest(self.pool, self.thresholds)
                self.runs = await runlist.recent(self.pool, self.thresholds, BARS)
            self.version += 1
        except Exception as exc:  # the next round tries again
            log.warning("board.refresh_failed", error=f"{type(exc).__name__}: {exc}")

    async def run(self) -> None:
        """Refresh every ``CACHE_S`` seconds, or as soon as woken, until cancelled."""
        while True:
            await self.refresh()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation that
            # comes as the wake is set (a run ending as kontod stops), and this loop never ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CACHE_S):
                    await self._wake.wait()
            self._wake.clear()

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="board")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """Refresh now rather than at the end of the current wait."""
        self._wake.set()

    def paused(self, pause: Pause) -> None:
        """This process paused a job: show it at once."""
        self.pauses.put(pause.job, pause, self.clock())
        self.version += 1
        self.wake()

    def resumed(self, job: str, now: datetime) -> None:
        self.pauses.put(job, None, now)
        self.version += 1
        self.wake()

    # Run observer
    def run_started(self, ctx: RunContext) -> None:
        self.running[ctx.job] = ctx
        self.version += 1
        self.wake()

    def run_ended(self, ctx: RunContext, status: str, error: str | None, duration_s: float) -> None:
        self.running.pop(ctx.job, None)
        self.version += 1
        self.wake()

    # Reading
    def pause_of(self, job: str, now: datetime) -> Pause | None:
        return self.pauses.pause_of(job, now)

    def verdict(self, spec: JobSpec, stats: JobStats, now: datetime) -> Verdict:
        state = self.pauses.states.get(spec.name, PauseState())
        return verdict_of(spec, self.tz, stats, state, self.pause_of(spec.name, now), now)

    def progress(self, job: str, now: datetime) -> Progress | None:
        ctx = self.running.get(job)
        if ctx is None:
            return None
        return progress_of(ctx.progress_done, ctx.progress_expected, ctx.started_at, now)

    def state_key(self, stats: Mapping[str, JobStats], now: datetime) -> tuple[object, ...]:
        """Equal keys mean equal views: the caches, the progress of the runs, the second."""
        progress = tuple(
            (job, ctx.progress_done, ctx.progress_expected) for job, ctx in self.running.items()
        )
        return (id(stats), self.version, progress, int(now.timestamp()))

    def views(self, stats: Mapping[str, JobStats], now: datetime) -> list[JobView]:
        out = []
        for spec in self.jobs:
            st = stats.get(spec.name, JobStats())
            out.append(
                JobView(
                    spec=spec,
                    stats=st,
                    verdict=self.verdict(spec, st, now),
                    pause=self.pause_of(spec.name, now),
                    suspicion=self.suspicions.get(spec.name, Suspicion()),
                    progress=self.progress(spec.name, now),
                    runs=self.runs.get(spec.name, []),
                )
            )
        return out
