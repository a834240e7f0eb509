"""The daemon: wires the database, the jobs, the runner, the history, the HTTP server and
systemd together. ``assemble`` builds the objects in dependency order, each from its
constructor's arguments; ``Daemon.start`` starts them.

Start-up order: database (embedded or not) -> migrations -> Konto's SQLite-family database, if
that is where Konto's tables are (opened, kontod's two tables created, checked) -> runner
prepared -> HTTP bound -> schedules started -> READY=1. A signal during start cancels it (no
READY=1). Shutdown runs the same steps backwards, each bounded in time, so that SIGTERM ends
kontod within ``KONTOD_SHUTDOWN_TIMEOUT`` + 10 s even when the database does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import structlog
from aiohttp import web
from asyncpg.pool import PoolConnectionProxy
from prometheus_client.registry import CollectorRegistry

from kontod import db
from kontod.config import Settings, redact_dsn
from kontod.jobs import declare_jobs
from kontod.konto import engines, tokens
from kontod.konto import schema as konto_schema
from kontod.konto.store import KontoSql
from kontod.ops import pings, suspicion
from kontod.ops.board import Board
from kontod.ops.http import GUARD, GuardedSite, HttpLimits, build_app
from kontod.ops.metrics import (
    BoardCollector,
    JobExportsCollector,
    ProviderInstruments,
    RunInstruments,
    RunTableCollector,
    new_registry,
)
from kontod.ops.systemd import Notifier
from kontod.providers.powens import Observer
from kontod.scheduler import retries, schedule
from kontod.scheduler.contract import JobSpec, settle
from kontod.scheduler.history import History
from kontod.scheduler.retries import RetryPolicy
from kontod.scheduler.runner import Runner, utcnow
from kontod.scheduler.runs import JobStats

log = structlog.get_logger("kontod.daemon")
HTTP_SHUTDOWN_S = 2.0  # open requests get this long once kontod stops
POOL_CLOSE_S = db.POOL_CLOSE_S
START_ABORT_S = 5.0  # how long an aborted start may take to unwind

# Builds the jobs on the pool and the HTTP session, reporting provider requests to the observer.
JobsFactory = Callable[[asyncpg.Pool, aiohttp.ClientSession, Observer], list[JobSpec]]


def konto_check(settings: Settings) -> db.Check | None:
    """What the daemon checks on PostgreSQL once it is migrated, when Konto's tables are there:
    the web app's schema as kontod reads it (KontoSchemaError) and, when one is set, the token
    key (WrongKey); both exit 2. With Konto's tables in a SQLite file or a libSQL server the
    copies migration 0001 leaves in PostgreSQL are empty and nothing reads them: that database
    is checked instead (``engines.open_checked``)."""
    if settings.konto.location is not None:
        return None
    key = settings.refresh.db_encryption_key

    async def check(conn: PoolConnectionProxy) -> None:
        await konto_schema.load(conn)
        if key is not None:
            await tokens.check_key(conn, key)

    return check


@dataclass(frozen=True)
class Parts:
    """The daemon's objects, each built by ``assemble`` from the ones before it."""

    jobs: list[JobSpec]
    history: History
    board: Board
    registry: CollectorRegistry
    instruments: RunInstruments
    pinger: pings.Pinger
    runner: Runner
    app: web.Application


async def assemble(
    settings: Settings,
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    jobs_factory: JobsFactory,
    clock: Callable[[], datetime],
    notifier: Notifier,
) -> Parts:
    """Build the daemon's objects in dependency order, each from its constructor's arguments.

    Nothing here starts a task: ``Daemon.start`` does that, in its own order. The one I/O is
    each job's requirement check (``settle``), so that a job the database cannot serve is
    known as not configured before anything is built on the list of jobs.
    """
    s = settings
    registry = new_registry()
    # The provider client reports to these from inside the jobs.
    provider = ProviderInstruments(registry)
    jobs = await settle(jobs_factory(pool, http, provider.provider_request))
    names = [spec.name for spec in jobs]
    retry = RetryPolicy(s.runner.retry_attempts, s.runner.retry_delay)
    instruments = RunInstruments(registry, names)

    def show_status() -> None:
        notifier.status(status_line(jobs, s.runner.tz, clock()))

    history = History(
        pool,
        s.runner.instance,
        lease_s=s.runner.lease.total_seconds(),
        history_days=s.runner.history_days,
        freshness=[probe for spec in jobs for probe in spec.exports.freshness],
        listeners=[show_status],
    )
    board = Board(
        pool,
        jobs,
        s.runner.tz,
        suspicion.from_settings(suspicion.populations(jobs), s.suspicion.thresholds),
        clock,
    )
    pinger = pings.Pinger(
        http, pings.ping_urls(names, s.pings.urls, s.pings.base_url), observe=instruments.ping
    )
    runner = Runner(
        pool,
        jobs,
        s.runner.tz,
        s.runner.instance,
        events=instruments,
        clock=clock,
        lease_s=s.runner.lease.total_seconds(),
        retry=retry,
        history=history,
        observers=[board, pinger],
    )

    def stats() -> dict[str, JobStats]:
        return history.stats

    # The collectors read on each scrape; each registers itself on the registry.
    RunTableCollector(
        registry,
        jobs,
        stats,
        clock,
        board.verdict,
        retries.retry_times({j.name: j.catchup_window for j in jobs}, retry),
    )
    JobExportsCollector(
        registry,
        {spec.name: spec.exports for spec in jobs},
        s.runner.tz,
        stats,
        lambda: history.fresh,
    )
    BoardCollector(registry, board, stats, clock)
    app = build_app(
        runner,
        registry,
        s.http.admin_token,
        clock,
        board=board,
        limits=HttpLimits(s.http.header_timeout, s.http.max_connections),
    )
    return Parts(jobs, history, board, registry, instruments, pinger, runner, app)


def status_line(jobs: list[JobSpec], tz: ZoneInfo, now: datetime) -> str:
    """What systemd shows: the jobs scheduled and the next tick."""
    upcoming = [
        (schedule.next_tick(spec.schedule, tz, now), spec.name)
        for spec in jobs
        if not spec.not_configured
    ]
    if not upcoming:
        return "no job scheduled"
    when, name = min(upcoming)
    local = when.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")
    return f"{len(upcoming)} job(s) scheduled; next: {name} at {local}"


class Daemon:
    """One kontod process. ``start`` brings it up, ``stop`` takes it down."""

    def __init__(
        self,
        settings: Settings,
        *,
        jobs: JobsFactory | None = None,
        clock: Callable[[], datetime] = utcnow,
        notifier: Notifier | None = None,
        on_migrated: Callable[[asyncpg.Pool], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.notifier = notifier or Notifier.from_env()
        self._jobs_factory: JobsFactory = jobs or (
            lambda pool, http, observe: declare_jobs(
                settings, pool, http, observe, konto=self.konto
            )
        )
        self._on_migrated = on_migrated
        self.instance = settings.runner.instance
        # Only the daemon (kontod run, the demo) may create an embedded database.
        self.database = db.open(settings, create=True, check=konto_check(settings))
        # Konto's SQLite-family database, opened at start (None: Konto's tables in PostgreSQL).
        self.konto: KontoSql | None = None
        # What start has brought up so far; stop takes down whatever is there.
        self.http: aiohttp.ClientSession | None = None
        self.parts: Parts | None = None
        self.site_runner: web.AppRunner | None = None
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_watchdog = asyncio.Event()

    @property
    def pool(self) -> asyncpg.Pool | None:
        return self.database.pool

    @property
    def runner(self) -> Runner | None:
        return self.parts.runner if self.parts is not None else None

    @property
    def history(self) -> History | None:
        return self.parts.history if self.parts is not None else None

    @property
    def board(self) -> Board | None:
        return self.parts.board if self.parts is not None else None

    @property
    def registry(self) -> CollectorRegistry | None:
        return self.parts.registry if self.parts is not None else None

    @property
    def pinger(self) -> pings.Pinger | None:
        return self.parts.pinger if self.parts is not None else None

    async def start(self) -> None:
        s = self.settings
        if s.database.url is not None:
            # The daemon's first line names its database; the commands name only an embedded one.
            log.info("database.external", url=redact_dsn(s.database.url))
        pool = await self.database.start()
        self.konto = await engines.open_checked(s.konto, s.refresh.db_encryption_key)
        if self.konto is not None:
            log.info("konto.opened", engine=self.konto.engine, location=str(self.konto.location))
        if self._on_migrated is not None:
            await self._on_migrated(pool)
        self.http = aiohttp.ClientSession()
        self.parts = parts = await assemble(
            s, pool, self.http, self._jobs_factory, self.clock, self.notifier
        )
        await parts.runner.prepare()
        await parts.board.refresh()

        self.site_runner = web.AppRunner(
            parts.app, access_log=None, handle_signals=False, shutdown_timeout=HTTP_SHUTDOWN_S
        )
        await self.site_runner.setup()
        site = GuardedSite(self.site_runner, s.http.host, s.http.port, parts.app[GUARD])
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else s.http.port
        log.info("http.listening", url=f"http://{s.http.host}:{self.port}")

        await parts.runner.start()
        self._tasks.append(parts.board.start())
        self._tasks.append(
            asyncio.create_task(self.notifier.run_watchdog(self._stop_watchdog), name="watchdog")
        )
        self.notifier.ready(self.status_line())

    def side_tasks(self) -> list[asyncio.Task[None]]:
        """The long-lived tasks that must never end while the daemon runs."""
        if self.parts is None:
            return list(self._tasks)
        return [*self.parts.runner.loops, *self.parts.history.tasks, *self._tasks]

    def status_line(self) -> str:
        """What systemd shows: the jobs scheduled and the next tick."""
        assert self.parts is not None
        return status_line(self.parts.jobs, self.settings.runner.tz, self.clock())

    async def _refresh_stats(self) -> None:
        """One housekeeping round now (tests use it instead of waiting for the next one)."""
        assert self.parts is not None
        await self.parts.history.housekeeping()

    async def stop(self) -> None:
        """Stop taking ticks, give running jobs the shutdown timeout, then close everything.

        Every step is bounded: the runs get the shutdown timeout and their outcomes a few
        seconds more, open HTTP requests 2 s, the pool 2 s before its connections are dropped.
        """
        self.notifier.stopping()
        log.info("daemon.stopping", timeout_s=self.settings.runner.shutdown_timeout.total_seconds())
        if self.parts is not None:
            await self.parts.runner.stop(self.settings.runner.shutdown_timeout.total_seconds())
            await self.parts.pinger.drain(pings.DRAIN_S)
        self._stop_watchdog.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.site_runner is not None:
            await self.site_runner.cleanup()
        if self.http is not None:
            await self.http.close()
        if self.konto is not None:
            await self.konto.close()
        await self.database.close(POOL_CLOSE_S)
        log.info("daemon.stopped")

    async def abort(self) -> None:
        """The quickest clean exit (a second signal): drop connections, stop the database.
        Konto's SQLite file is left to the process's exit, which ends its transaction."""
        await self.database.abort()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status.

    A signal during start aborts the start (no READY=1, exit 0). A second signal cuts the
    orderly shutdown short, but still stops the embedded PostgreSQL (exit 130).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("daemon.forced_exit", signal=name)
            force.set()
            return
        log.info("daemon.signal", signal=name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    structlog.contextvars.bind_contextvars(instance=settings.runner.instance)

    daemon = Daemon(settings)
    starting = asyncio.create_task(daemon.start(), name="start")
    signalled = asyncio.create_task(stop.wait(), name="signals")
    await asyncio.wait([starting, signalled], return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    if not starting.done():
        log.info("daemon.start_aborted")
        starting.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(starting), timeout=START_ABORT_S)
        return await _finish(daemon.stop(), daemon, force, 0)
    if starting.exception() is not None:
        await _finish(daemon.stop(), daemon, force, 1)
        starting.result()  # raises the start's error
    return await _finish(run_until_stopped(daemon, stop), daemon, force, None)


async def _finish(
    work: Awaitable[int | None], daemon: Daemon, force: asyncio.Event, status: int | None
) -> int:
    """Run ``work`` (serving or stopping) unless a second signal comes: then abort and exit
    with status 130 at once."""
    task = asyncio.ensure_future(work)
    forced = asyncio.create_task(force.wait())
    await asyncio.wait([task, forced], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        forced.cancel()
        result = task.result()
        return status if status is not None else int(result or 0)
    task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(task, timeout=1)
    await daemon.abort()
    # Leave now: what is left of the orderly shutdown must not hold the exit. Unfinished runs
    # keep their rows until their lease expires; then any replica takes them over.
    sys.stderr.flush()
    os._exit(130)


async def run_until_stopped(daemon: Daemon, stop: asyncio.Event) -> int:
    """Serve until ``stop`` is set (0), or until a side task ends (1); then stop the daemon.

    A side task that ends would silently stop a schedule or the watchdog: exiting non-zero
    lets systemd start a fresh process.
    """
    stopped = asyncio.create_task(stop.wait(), name="signals")
    done, _ = await asyncio.wait(
        [stopped, *daemon.side_tasks()], return_when=asyncio.FIRST_COMPLETED
    )
    status = 0
    for task in done:
        if task is not stopped:
            error = task.exception() if not task.cancelled() else None
            log.error("daemon.task_ended", task=task.get_name(), error=repr(error))
            status = 1
    stopped.cancel()
    await daemon.stop()
    return status
