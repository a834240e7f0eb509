"""The daemon: wires the database, the jobs, the runner, the HTTP server and systemd together.

Start-up order: database (embedded or not) -> migrations -> runner prepared -> HTTP bound ->
schedules started -> READY=1. Shutdown runs the same steps backwards, each bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from datetime import datetime

import aiohttp
import asyncpg
import structlog
from aiohttp import web

from kontod import db, konto_schema, pings, runs, schedule, suspicion
from kontod.board import Board
from kontod.config import Settings, redact_dsn
from kontod.http import build_app
from kontod.job import JobSpec
from kontod.jobs import declare_jobs
from kontod.metrics import Metrics
from kontod.runner import Runner, utcnow
from kontod.systemd import Notifier

log = structlog.get_logger("kontod.daemon")
STATS_EVERY_S = 15.0


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
        self.instance = db.new_instance_name()
        self.embedded: db.EmbeddedPostgres | None = None
        self.pool: asyncpg.Pool | None = None
        self.http: aiohttp.ClientSession | None = None
        self.runner: Runner | None = None
        self.metrics: Metrics | None = None
        self.board: Board | None = None
        self.pinger: pings.Pinger | None = None
        self.site_runner: web.AppRunner | None = None
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_watchdog = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        dsn = s.database_url
        if dsn is None:
            log.info("database.embedded", data_dir=str(s.state_dir / "pgdata"))
            self.embedded = db.EmbeddedPostgres(s.state_dir)
            dsn = await self.embedded.start()
        else:
            log.info("database.external", url=redact_dsn(dsn))
        self.pool = await db.create_pool(dsn, self.instance)
        async with self.pool.acquire() as conn:
            applied = await db.migrate(conn)
            await konto_schema.load(conn)  # KontoSchemaError: exit 2, naming the column
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
        self.runner = Runner(self.pool, jobs, s.tz, self.instance, clock=self.clock)
        self.metrics = Metrics(
            jobs, s.tz, lambda: self.runner.stats if self.runner else {}, self.clock
        )
        metrics_ref.append(self.metrics)
        self.runner.events = self.metrics
        names = [spec.name for spec in jobs]
        self.board = Board(self.pool, jobs, s.tz, suspicion.from_settings(names, s.suspicious))
        self.pinger = pings.Pinger(
            self.http,
            pings.ping_urls(names, s.ping_urls, s.ping_base_url),
            observe=self.metrics.ping,
        )
        self.runner.observers += [self.board, self.pinger]
        self.metrics.watch_board(self.board)
        await self.runner.prepare()
        await self._refresh_stats()

        app = build_app(
            self.runner, self.metrics.registry, s.admin_token, self.clock, board=self.board
        )
        self.site_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.site_runner.setup()
        site = web.TCPSite(self.site_runner, s.listen_host, s.listen_port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else s.listen_port
        log.info("http.listening", url=f"http://{s.listen_host}:{self.port}")

        await self.runner.start()
        self._tasks.append(asyncio.create_task(self._stats_loop(), name="stats"))
        self._tasks.append(
            asyncio.create_task(self.notifier.run_watchdog(self._stop_watchdog), name="watchdog")
        )
        self.notifier.ready(self.status_line())

    def side_tasks(self) -> list[asyncio.Task[None]]:
        """The long-lived tasks that must never end while the daemon runs."""
        loops = self.runner.loops if self.runner is not None else []
        return [*loops, *self._tasks]

    def status_line(self) -> str:
        """What systemd shows: the jobs scheduled and the next tick."""
        assert self.runner is not None
        now = self.clock()
        upcoming = [
            (schedule.next_tick(spec.schedule, self.settings.tz, now), spec.name)
            for spec in self.runner.jobs.values()
            if not spec.not_configured
        ]
        if not upcoming:
            return "no job scheduled"
        when, name = min(upcoming)
        local = when.astimezone(self.settings.tz).strftime("%Y-%m-%d %H:%M %Z")
        return f"{len(upcoming)} job(s) scheduled; next: {name} at {local}"

    async def _refresh_stats(self) -> None:
        assert self.runner is not None
        assert self.metrics is not None
        assert self.pool is not None
        try:
            await self.runner.reap()
        except Exception as exc:  # the next refresh tries again
            log.warning("stats.reap_failed", error=f"{type(exc).__name__}: {exc}")
        await self.runner.refresh_stats()
        if self.board is not None:
            await self.board.refresh(self.clock(), force=True)
        try:
            self.metrics.latest_snapshot = await runs.latest_snapshot_date(self.pool)
        except Exception as exc:  # the metric keeps its last value; the next refresh retries
            log.warning("stats.snapshot_date_failed", error=f"{type(exc).__name__}: {exc}")

    async def _stats_loop(self) -> None:
        # Other replicas write runs too; re-reading the table keeps this cache current.
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            await self._refresh_stats()
            self.notifier.status(self.status_line())

    async def stop(self) -> None:
        """Stop taking ticks, give running jobs the shutdown timeout, then close everything."""
        self.notifier.stopping()
        log.info("daemon.stopping", timeout_s=self.settings.shutdown_timeout)
        if self.runner is not None:
            await self.runner.stop(self.settings.shutdown_timeout)
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.pool.close(), timeout=5)
        if self.embedded is not None:
            await self.embedded.stop()
        log.info("daemon.stopped")


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; a second signal exits at once. Returns the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("daemon.forced_exit", signal=signal.Signals(signum).name)
            # The user asked twice: leave now, the next start marks unfinished runs.
            import os

            os._exit(130)
        log.info("daemon.signal", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    daemon = Daemon(settings)
    try:
        await daemon.start()
    except BaseException:
        await daemon.stop()
        raise
    return await run_until_stopped(daemon, stop)


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
