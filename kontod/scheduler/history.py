"""Run history's single writer: leases of this process's runs, the reaper, the stats cache and
retention.

Everything derived from the run table is written here and nowhere else: HTTP requests and
metric scrapes read ``History.stats`` and never touch the database for it. Three loops run
side by side, so a slow one never delays another:

- leases: every lease/3, one statement renews the lease of every run this process holds; a run
  whose lease could not be renewed (another replica reaped it, or the database stayed away for
  a whole lease) is reported lost to its owner, which stops it;
- housekeeping: every lease/3, mark ``interrupted`` the runs whose lease expired (on any
  replica), reload the stats and read the jobs' freshness probes, then tell the listeners
  (the runner looks for takeovers);
- retention: once a day, delete old runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import date, datetime
from typing import TypeVar

import asyncpg
import structlog

from kontod.scheduler import runs
from kontod.scheduler.contract import Freshness

log = structlog.get_logger("kontod.history")
KEEP_RUNS = 100  # per job, whatever their age
RETENTION_EVERY_S = 86400.0
RETENTION_TIMEOUT_S = 60.0
T = TypeVar("T")


class History:
    """The owner of the leases and of the cached per-job history of one process."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        instance: str,
        *,
        lease_s: float,
        history_days: int = 90,
        freshness: Sequence[Freshness] = (),
        listeners: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.pool = pool
        self.instance = instance
        self.lease_s = lease_s
        self.history_days = history_days
        self.stats: dict[str, runs.JobStats] = {}
        self.freshness = tuple(freshness)
        # The last reading of each probe, by the metric it feeds.
        self.fresh: dict[str, date | datetime | None] = {}
        self._held: dict[int, Callable[[], None]] = {}
        self._renewed_at: dict[int, float] = {}
        # Called after each housekeeping round (see on_refresh).
        self._listeners: list[Callable[[], None]] = list(listeners)
        self._tasks: list[asyncio.Task[None]] = []
        self._reloading = asyncio.Lock()

    @property
    def every_s(self) -> float:
        """How often leases are renewed and expired ones looked for."""
        return self.lease_s / 3

    # -- leases ----------------------------------------------------------------------------

    def hold(self, run_id: int, on_lost: Callable[[], None]) -> None:
        """Keep renewing ``run_id``'s lease; call ``on_lost`` once if it cannot be kept."""
        self._held[run_id] = on_lost
        self._renewed_at[run_id] = time.monotonic()

    def release(self, run_id: int) -> None:
        """Stop renewing: the run's end is recorded, or it is lost."""
        self._held.pop(run_id, None)
        self._renewed_at.pop(run_id, None)

    async def renew(self) -> None:
        """One renewal of every lease held; the runs that lost theirs are told so."""
        if not self._held:
            return
        held = list(self._held)
        try:
            renewed = await self.bounded(
                runs.renew(self.pool, held, self.instance, self.lease_s), self.every_s
            )
        except Exception as exc:  # the database is away: the leases run on until they expire
            log.warning("lease.renew_failed", runs=held, error=describe(exc))
            now = time.monotonic()
            for run_id in held:
                if now - self._renewed_at.get(run_id, now) >= self.lease_s:
                    # A whole lease without renewal: another replica may have taken over.
                    self._lose(run_id, "the lease could not be renewed for a whole lease")
            return
        now = time.monotonic()
        for run_id in held:
            if run_id in renewed:
                self._renewed_at[run_id] = now
            else:
                self._lose(run_id, "the lease had expired or the run was taken over")

    def _lose(self, run_id: int, why: str) -> None:
        on_lost = self._held.pop(run_id, None)
        self._renewed_at.pop(run_id, None)
        if on_lost is not None:
            log.error("lease.lost", run_id=run_id, reason=why)
            on_lost()

    # -- derived state ---------------------------------------------------------------------

    def on_refresh(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each housekeeping round."""
        self._listeners.append(listener)

    async def reap(self) -> list[runs.Reaped]:
        """Mark ``interrupted`` the runs whose lease expired, on whichever replica."""
        reaped = await self.bounded(runs.reap_expired(self.pool), self.every_s)
        for r in reaped:
            log.warning(
                "run.interrupted_found",
                job=r.job,
                run_id=r.id,
                owner_instance=r.instance,
                last_heartbeat=r.heartbeat_at.isoformat(),
            )
        return reaped

    async def refresh(self) -> dict[str, runs.JobStats]:
        """Reload the per-job history; on a failure the last known one stays."""
        # One reload at a time: one that began before a run's outcome was written must not
        # land after the reload that follows the write, and show the run as not finished.
        async with self._reloading:
            try:
                self.stats = await self.bounded(runs.job_stats(self.pool), self.every_s)
                for probe in self.freshness:
                    self.fresh[probe.metric] = await self.bounded(
                        probe.probe(self.pool), self.every_s
                    )
            except Exception as exc:  # the next round tries again
                log.warning("stats.refresh_failed", error=describe(exc))
        return self.stats

    async def housekeeping(self) -> None:
        """One round: reap, reload, tell the listeners."""
        try:
            await self.reap()
        except Exception as exc:  # the next round tries again
            log.warning("stats.reap_failed", error=describe(exc))
        await self.refresh()
        for listener in self._listeners:
            listener()

    async def prune(self) -> int:
        """Delete runs older than the history window (see runs.prune)."""
        deleted = await self.bounded(
            runs.prune(self.pool, self.history_days, KEEP_RUNS), RETENTION_TIMEOUT_S
        )
        log.info("history.pruned", deleted=deleted, older_than_days=self.history_days)
        return deleted

    # -- loops -----------------------------------------------------------------------------

    def start(self) -> list[asyncio.Task[None]]:
        """Start the three loops; they run until ``stop``."""
        self._tasks = [
            asyncio.create_task(self._every(self.every_s, self.renew), name="leases"),
            asyncio.create_task(self._every(self.every_s, self.housekeeping), name="housekeeping"),
            asyncio.create_task(self._every(RETENTION_EVERY_S, self._prune_once), name="retention"),
        ]
        return list(self._tasks)

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._tasks)

    async def stop(self) -> None:
        """Cancel the loops; one stuck on a database that does not answer is left to the
        closing of the pool."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)

    async def _prune_once(self) -> None:
        try:
            await self.prune()
        except Exception as exc:  # tomorrow's round tries again
            log.warning("history.prune_failed", error=describe(exc))

    @staticmethod
    async def _every(seconds: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await step()
            await asyncio.sleep(seconds)

    @staticmethod
    async def bounded(call: Awaitable[T], seconds: float) -> T:
        """``call`` within ``seconds``; TimeoutError otherwise (a bookkeeping statement must
        never hang on a database that does not answer)."""
        async with asyncio.timeout(seconds):
            return await call


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
