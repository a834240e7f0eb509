"""The operator's view of each job: health with pauses, suspicious success, progress, last runs.

``/health/cron``, ``/metrics`` and the status page all read this one view, so they agree. The
``Board`` keeps what it needs from the database in memory (pauses, the verdict on the last
run, the last runs), re-read at most every ``CACHE_S`` seconds, and follows the runs of this
process as they go (their progress).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from kontod import runlist, suspicion
from kontod.health import Verdict, assess_job
from kontod.job import JobSpec, RunContext
from kontod.pauses import CACHE_S, Pause, PauseCache, PauseState
from kontod.runs import JobStats
from kontod.suspicion import Suspicion, Thresholds

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
    """The cached operator state of every job; also a run observer of the runner."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        jobs: list[JobSpec],
        tz: ZoneInfo,
        thresholds: Mapping[str, Thresholds] | None = None,
    ) -> None:
        self.pool = pool
        self.jobs = jobs
        self.tz = tz
        names = [spec.name for spec in jobs]
        self.thresholds = suspicion.for_jobs(names, thresholds or {})
        self.pauses = PauseCache(pool, names)
        self.suspicions: dict[str, Suspicion] = {}
        self.runs: dict[str, list[runlist.Run]] = {}
        self.running: dict[str, RunContext] = {}
        self._read_at: datetime | None = None

    async def refresh(self, now: datetime, *, force: bool = False) -> None:
        """Re-read pauses, the last-run verdicts and the last runs, unless read moments ago."""
        if (
            not force
            and self._read_at is not None
            and 0 <= (now - self._read_at).total_seconds() < CACHE_S
        ):
            return
        try:
            await self.pauses.refresh(now, force=True)
            self.suspicions = await suspicion.latest(self.pool, self.thresholds)
            self.runs = await runlist.recent(self.pool, self.thresholds, BARS)
            self._read_at = now
        except Exception as exc:  # the last known state stays; the next refresh tries again
            log.warning("board.refresh_failed", error=f"{type(exc).__name__}: {exc}")

    def invalidate(self) -> None:
        """The next refresh reads the database whatever the age of the cache."""
        self._read_at = None

    # Run observer
    def run_started(self, ctx: RunContext) -> None:
        self.running[ctx.job] = ctx
        self.invalidate()

    def run_ended(self, ctx: RunContext, status: str, error: str | None, duration_s: float) -> None:
        self.running.pop(ctx.job, None)
        self.invalidate()

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
