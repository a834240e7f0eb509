"""The daemon: wires the database, the jobs, the runner, the history, the HTTP server and
systemd together.

Start-up order: database (embedded or not) -> migrations -> runner prepared -> HTTP bound ->
schedules started -> READY=1. A signal during start cancels it (no READY=1). Shutdown runs the
same steps backwards, each bounded in time, so that SIGTERM ends kontod within
``KONTOD_SHUTDOWN_TIMEOUT`` + 10 s even when the database does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime

import aiohttp
import asyncpg
import structlog
from aiohttp import web

from kontod import db, konto_schema, pings, schedule, suspicion, tokens
from kontod.board import Board
from kontod.config import Settings, redact_dsn
from kontod.history import History
from kontod.http import GUARD, GuardedSite, HttpLimits, build_app
from kontod.job import JobSpec
from kontod.jobs import declare_jobs
from kontod.metrics import Metrics
from kontod.retries import RetryPolicy
from kontod.runner import Runner, utcnow
from kontod.systemd import Notifier

log = structlog.get_logger("kontod.daemon")
HTTP_SHUTDOWN_S = 2.0  # open requests get this long once kontod stops
POOL_CLOSE_S = 2.0
START_ABORT_S = 5.0  # how long an aborted start may take to unwind


class Daemon:
    """One kontod process. ``start`` brings it up, ``stop`` takes it down."""

    def __init__(
        self,
        settings: Settings,
        *,
        jobs: Callable[[asyncpg.Pool, aiohttp.ClientSession, Metrics | None], list[JobSpec]]
        | None = None,
        clock: Callable[[], datetime] = utcnow,
        notifier: Notifier | None = None,
        on_migrated: Callable[[asyncpg.Pool], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.notifier = notifier or Notifier.from_env()
        self._jobs_factory = jobs
        self._on_migrated = on_migrated
        self.instance = settings.runner.instance
        self.embedded: db.EmbeddedPostgres | None = None
        self.pool: asyncpg.Pool | None = None
        self.http: aiohttp.ClientSession | None = None
        self.runner: Runner | None = None
        self.history: History | None = None
        self.board: Board | None = None
        self.pinger: pings.Pinger | None = None
        self.metrics: Metrics | None = None
        self.site_runner: web.AppRunner | None = None
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_watchdog = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        dsn = s.database.url
        if dsn is None:
            if not s.database.embedded:
                raise db.NoDatabase(db.run_without_url(s.database.state_dir))
            log.info("database.embedded", data_dir=str(s.database.state_dir / "pgdata"))
            self.embedded = db.EmbeddedPostgres(s.database.state_dir)
            dsn = await self.embedded.start()
        else:
            log.info("database.external", url=redact_dsn(dsn))
        # The snapshot workers hold a connection each for the whole run; the rest is left to
        # the refresh writes and the bookkeeping as before.
        self.pool = await db.create_pool(
            dsn, self.instance, max_size=db.POOL_SIZE + s.snapshots.workers - 1
        )
        async with self.pool.acquire() as conn:
            applied = await db.migrate(conn)
            await konto_schema.load(conn)  # KontoSchemaError: exit 2, naming the column
            if s.refresh.db_encryption_key is not None:
                await tokens.check_key(conn, s.refresh.db_encryption_key)  # WrongKey: exit 2
        if applied:
            log.info("database.migrated", applied=applied)
        if self._on_migrated is not None:
            await self._on_migrated(self.pool)

        self.http = aiohttp.ClientSession()
        metrics_ref: list[Metrics] = []

        def observe_request(endpoint: str, code: str, seconds: float) -> None:
            metrics_ref[0].provider_request(endpoint, code, seconds)

        if self._jobs_factory is not None:
            jobs = self._jobs_factory(self.pool, self.http, None)
        else:
            jobs = declare_jobs(s, self.pool, self.http, observe_request)
        self.history = History(
            self.pool,
            self.instance,
            lease_s=s.runner.lease.total_seconds(),
            history_days=s.runner.history_days,
        )
        self.runner = Runner(
            self.pool,
            jobs,
            s.runner.tz,
            self.instance,
            clock=self.clock,
            lease_s=s.runner.lease.total_seconds(),
            retry=RetryPolicy(s.runner.retry_attempts, s.runner.retry_delay),
            history=self.history,
        )
        self.metrics = Metrics(
            jobs, s.runner.tz, lambda: self.history.stats if self.history else {}, self.clock
        )
        metrics_ref.append(self.metrics)
        self.metrics.next_retry = self.runner.next_retry
        self.runner.events = self.metrics
        self.history.on_refresh(self._after_housekeeping)
        names = [spec.name for spec in jobs]
        self.board = Board(
            self.pool,
            jobs,
            s.runner.tz,
            suspicion.from_settings(names, s.suspicion.thresholds),
            self.clock,
        )
        self.pinger = pings.Pinger(
            self.http,
            pings.ping_urls(names, s.pings.urls, s.pings.base_url),
            observe=self.metrics.ping,
        )
        self.runner.observers += [self.board, self.pinger]
        self.metrics.watch_board(self.board)
        await self.runner.prepare()
        await self.board.refresh()
        self.metrics.latest_snapshot = self.history.latest_snapshot

        app = build_app(
            self.runner,
            self.metrics.registry,
            s.http.admin_token,
            self.clock,
            board=self.board,
            limits=HttpLimits(s.http.header_timeout, s.http.max_connections),
        )
        self.site_runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=HTTP_SHUTDOWN_S
        )
        await self.site_runner.setup()
        site = GuardedSite(self.site_runner, s.http.host, s.http.port, app[GUARD])
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else s.http.port
        log.info("http.listening", url=f"http://{s.http.host}:{self.port}")

        await self.runner.start()
        self._tasks.append(self.board.start())
        self._tasks.append(
            asyncio.create_task(self.notifier.run_watchdog(self._stop_watchdog), name="watchdog")
        )
        self.notifier.ready(self.status_line())

    def side_tasks(self) -> list[asyncio.Task[None]]:
        """The long-lived tasks that must never end while the daemon runs."""
        loops = self.runner.loops if self.runner is not None else []
        history = self.history.tasks if self.history is not None else []
        return [*loops, *history, *self._tasks]

    def status_line(self) -> str:
        """What systemd shows: the jobs scheduled and the next tick."""
        assert self.runner is not None
        now = self.clock()
        upcoming = [
            (schedule.next_tick(spec.schedule, self.settings.runner.tz, now), spec.name)
            for spec in self.runner.jobs.values()
            if not spec.not_configured
        ]
        if not upcoming:
            return "no job scheduled"
        when, name = min(upcoming)
        local = when.astimezone(self.settings.runner.tz).strftime("%Y-%m-%d %H:%M %Z")
        return f"{len(upcoming)} job(s) scheduled; next: {name} at {local}"

    def _after_housekeeping(self) -> None:
        assert self.history is not None
        if self.metrics is not None:
            self.metrics.latest_snapshot = self.history.latest_snapshot
        if self.runner is not None:
            self.notifier.status(self.status_line())

    async def _refresh_stats(self) -> None:
        """One housekeeping round now (tests use it instead of waiting for the next one)."""
        assert self.history is not None
        await self.history.housekeeping()

    async def stop(self) -> None:
        """Stop taking ticks, give running jobs the shutdown timeout, then close everything.

        Every step is bounded: the runs get the shutdown timeout and their outcomes a few
        seconds more, open HTTP requests 2 s, the pool 2 s before its connections are dropped.
        """
        self.notifier.stopping()
        timeout_s = self.settings.runner.shutdown_timeout.total_seconds()
        log.info("daemon.stopping", timeout_s=timeout_s)
        if self.runner is not None:
            await self.runner.stop(timeout_s)
        elif self.history is not None:
            await self.history.stop()
        if self.pinger is not None:
            await self.pinger.drain(pings.DRAIN_S)
        self._stop_watchdog.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.site_runner is not None:
            await self.site_runner.cleanup()
        if self.http is not None:
            await self.http.close()
        if self.pool is not None:
            await db.close_pool(self.pool, POOL_CLOSE_S)
        await self.stop_database()
        log.info("daemon.stopped")

    async def abort(self) -> None:
        """The quickest clean exit (a second signal): drop connections, stop the database."""
        if self.pool is not None:
            self.pool.terminate()
        await self.stop_database()

    async def stop_database(self) -> None:
        if self.embedded is not None:
            await self.embedded.stop()


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
