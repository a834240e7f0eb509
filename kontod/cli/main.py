"""The ``kontod`` command: run, migrate, jobs run/next/pause/resume, runs, status, history, demo.

Exit status: 0 success, 1 failure (a failed run, an unhealthy report), 2 bad usage or a bad
setting (and, for ``status``, an unreachable daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import structlog

from kontod import __version__, db, jobs
from kontod.cli import commands
from kontod.config import ConfigError, Settings, load_settings
from kontod.konto import engines, tokens
from kontod.konto import schema as konto_schema
from kontod.konto.store import KontoSql, KontoUnavailable
from kontod.logs import configure, watch_loop
from kontod.ops import suspicion
from kontod.scheduler.contract import RunStatus, Trigger
from kontod.scheduler.runlist import STATUSES

log = structlog.get_logger("kontod.cli")
JOB_NAMES = jobs.NAMES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kontod", description="Runs and watches Konto's scheduled jobs."
    )
    p.add_argument("--version", action="version", version=f"kontod {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the daemon (schedules, HTTP, metrics)")
    sub.add_parser("migrate", help="apply the database migrations and exit")
    jobs_cmd = sub.add_parser("jobs", help="work with one job")
    jobs_sub = jobs_cmd.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    run_one = jobs_sub.add_parser("run", help="run one job now, in this process")
    run_one.add_argument("name", help=" or ".join(JOB_NAMES))
    run_one.add_argument("--reason", help="why, recorded with the run")
    upcoming = jobs_sub.add_parser("next", help="the next ticks of a job, local time and UTC")
    upcoming.add_argument("name")
    upcoming.add_argument("--count", type=int, default=10, help="how many (default 10)")
    upcoming.add_argument(
        "--from", dest="start", help="from this time instead of now (2026-03-28T12:00, local)"
    )
    pause = jobs_sub.add_parser("pause", help="skip the ticks of a job until it is resumed")
    pause.add_argument("name")
    pause.add_argument("--reason", required=True, help="why, shown to whoever looks next")
    pause.add_argument(
        "--until", help="when the pause ends by itself: 2026-03-02T08:00 (local), 2h, 1d"
    )
    resume = jobs_sub.add_parser("resume", help="end the pause of a job")
    resume.add_argument("name")
    runs_cmd = sub.add_parser("runs", help="the last runs of a job, from the database")
    runs_cmd.add_argument("name")
    runs_cmd.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    runs_cmd.add_argument("--status", choices=STATUSES, help="only runs with this status")
    status = sub.add_parser("status", help="show the health of a running daemon")
    status.add_argument("--url", help="base URL of the daemon (default: from KONTOD_LISTEN)")
    history = sub.add_parser("history", help="snapshot rows per date, from the database")
    history.add_argument("--days", type=int, default=7, help="how many days back (default 7)")
    demo = sub.add_parser("demo", help="demo data, a sandbox bank and the daemon, all local")
    demo.add_argument(
        "--konto",
        choices=("postgresql", "sqlite", "libsql"),
        default="postgresql",
        help="where the demo's Konto lives: beside kontod's tables in PostgreSQL (default), in"
        " a SQLite file made with the web app's own table definitions, or in that file served"
        " as a libSQL server on loopback",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(commands.visible(f"kontod: {exc}"), file=sys.stderr)
        return 2
    configure(settings.logging.format, settings.logging.level)
    try:
        return asyncio.run(_dispatch(args, settings))
    except (
        db.EmbeddedUnavailable,
        db.NoDatabase,
        konto_schema.KontoSchemaError,
        KontoUnavailable,
        ConfigError,
        tokens.WrongKey,
    ) as exc:
        print(commands.visible(f"kontod: {exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    watch_loop(asyncio.get_running_loop())
    if args.command == "run":
        from kontod.daemon import serve

        # An embedded database holds none of the web app's users: a daemon started on one by
        # mistake would snapshot nobody every night and look healthy. Refused before anything
        # starts, so that the one line saying why is all there is.
        why = db.refusal(settings, create=True)
        if why is not None:
            print(f"kontod: {why}", file=sys.stderr)
            return 2
        return await serve(settings)
    if args.command == "migrate":
        return await _migrate(settings)
    if args.command == "jobs":
        if args.name not in JOB_NAMES:
            print(
                f"kontod: no job named {args.name!r}; jobs: {', '.join(JOB_NAMES)}", file=sys.stderr
            )
            return 2
        if args.jobs_command == "next":
            return _next(settings, args.name, args.count, args.start)
        if args.jobs_command in ("pause", "resume"):
            return await _pause(settings, args)
        return await _run_job(settings, args.name, args.reason)
    if args.command == "runs":
        return await _runs(settings, args.name, args.limit, args.status)
    if args.command == "status":
        return await asyncio.to_thread(_status, settings, args.url)
    if args.command == "history":
        return await _history(settings, args.days)
    if args.command == "demo":
        from kontod.demo.run import demo

        return await demo(settings, args.konto)
    raise AssertionError(args.command)


def _database(settings: Settings) -> db.Database:
    """A migrated pool on the configured database, or on an embedded one that exists already
    (the demo's, a ``KONTOD_EMBEDDED=1`` daemon's): a one-shot command never creates one.
    Konto's tables are checked there when they are there (not when they are in a SQLite file
    or a libSQL server: ``_konto`` opens and checks that)."""
    return db.open(settings, check=None if settings.konto.location else konto_schema.load)


def _konto(settings: Settings) -> AbstractAsyncContextManager[KontoSql | None]:
    """Konto's SQLite-family database for a command that reads or writes Konto's tables,
    opened and its tables checked as the daemon does; None when they are in kontod's
    PostgreSQL. As there, the commands leave the token key to the refresh job's own check."""
    return engines.opened(settings.konto, None)


async def _migrate(settings: Settings) -> int:
    """kontod's migrations, and the two tables kontod adds to a SQLite-family Konto."""
    async with _database(settings), _konto(settings):
        pass
    return 0


async def _run_job(settings: Settings, name: str, reason: str | None = None) -> int:
    import aiohttp

    from kontod.ops import pings
    from kontod.scheduler import pauses
    from kontod.scheduler.runner import Runner, Skipped, utcnow

    async with (
        _database(settings) as pool,
        _konto(settings) as konto,
        aiohttp.ClientSession() as http,
    ):
        specs = jobs.declare_jobs(settings, pool, http, konto=konto)
        names = [spec.name for spec in specs]
        follow = commands.Follow()
        pinger = pings.Pinger(
            http, pings.ping_urls(names, settings.pings.urls, settings.pings.base_url)
        )
        runner = Runner(
            pool,
            specs,
            settings.runner.tz,
            settings.runner.instance,
            lease_s=settings.runner.lease.total_seconds(),
            observers=[follow, pinger],
        )
        await runner.prepare()
        held = await pauses.current(pool, name, utcnow())
        if held is not None:
            print(
                commands.visible(
                    f"note: {name} is paused by {held.by} ({held.reason}); running it anyway"
                ),
                file=sys.stderr,
            )
        try:
            outcome = await runner.trigger(
                name, Trigger.MANUAL, requested_by=commands.requester(), reason=reason
            )
            if isinstance(outcome, Skipped):
                print(f"kontod: {name} is already running", file=sys.stderr)
                return 1
            await commands.show_progress(follow, outcome.task, sys.stdout, utcnow)
            status = await outcome.task
        finally:
            await runner.stop(settings.runner.shutdown_timeout.total_seconds())
            await pinger.drain(pings.DRAIN_S)
        note = ""
        if status == RunStatus.SUCCESS:
            limits = suspicion.from_settings(
                suspicion.populations(specs), settings.suspicion.thresholds
            )
            verdict = (await suspicion.latest(pool, limits)).get(name)
            if verdict is not None and verdict.suspicious and verdict.run_id == outcome.run_id:
                note = f" (suspicious: {verdict.reason})"
        print(f"{name}: run {outcome.run_id} {status}{note}")
        return 0 if status == RunStatus.SUCCESS else 1


async def _runs(settings: Settings, name: str, limit: int, status: str | None) -> int:
    from kontod.scheduler.runner import utcnow

    if name not in JOB_NAMES:
        print(f"kontod: no job named {name!r}; jobs: {', '.join(JOB_NAMES)}", file=sys.stderr)
        return 2
    if not 1 <= limit <= 1000:
        print("kontod: --limit must be from 1 to 1000", file=sys.stderr)
        return 2
    async with _database(settings) as pool:
        await commands.print_runs(pool, name, limit, status, settings.runner.tz, utcnow())
    return 0


def _next(settings: Settings, name: str, count: int, start: str | None) -> int:
    from kontod.scheduler.runner import utcnow

    if not 1 <= count <= 1000:
        print("kontod: --count must be from 1 to 1000", file=sys.stderr)
        return 2
    now = utcnow()
    if start is not None:
        try:
            now = commands.parse_time(start, settings.runner.tz)
        except ValueError as exc:
            print(commands.visible(f"kontod: --from {exc}"), file=sys.stderr)
            return 2
    expr = jobs.schedules(settings)[name]
    commands.print_next(name, expr, settings.runner.tz, now, count)
    return 0


async def _pause(settings: Settings, args: argparse.Namespace) -> int:
    from kontod.scheduler import pauses
    from kontod.scheduler.runner import utcnow

    now = utcnow()
    until = None
    if args.jobs_command == "pause" and args.until:
        try:
            until = commands.parse_until(args.until, settings.runner.tz, now)
        except ValueError as exc:
            print(commands.visible(f"kontod: {exc}"), file=sys.stderr)
            return 2
    async with _database(settings) as pool:
        if args.jobs_command == "resume":
            await commands.resume_job(pool, args.name, now)
            return 0
        try:
            await commands.pause_job(pool, args.name, args.reason, until, settings.runner.tz, now)
        except ValueError as exc:
            print(commands.visible(f"kontod: {exc}"), file=sys.stderr)
            return 2
        except pauses.AlreadyPaused as exc:
            print(commands.visible(f"kontod: {exc}"), file=sys.stderr)
            return 1
    return 0


def _status(settings: Settings, url: str | None) -> int:
    base = (url or f"http://{settings.http.address}").rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health/cron", timeout=10) as resp:  # noqa: S310
            report: dict[str, Any] = json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code != 503:
            print(
                commands.visible(f"kontod: {base}/health/cron answered HTTP {exc.code}"),
                file=sys.stderr,
            )
            return 2
        report = json.load(exc)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            commands.visible(f"kontod: cannot reach {base}/health/cron: {reason}"), file=sys.stderr
        )
        return 2
    # What a daemon answers is data too: escaped before it reaches the terminal.
    rows: list[tuple[str, ...]] = [("JOB", "LAST STATUS", "LAST RUN", "NEXT RUN", "HEALTHY")]
    for job in report["jobs"]:
        cells = (
            job["name"],
            job["lastStatus"],
            job["lastRun"] or "-",
            job.get("nextRun") or "-",
            _health_cell(job),
        )
        rows.append(tuple(commands.visible(str(cell)) for cell in cells))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:4])) + "  " + r[4])
    print(commands.visible(f"overall: {report['status']}"))
    return 0 if report["status"] == "healthy" else 1


def _health_cell(job: dict[str, Any]) -> str:
    if not job["healthy"]:
        return f"NO: {job.get('reason') or ''}".strip()
    if job.get("paused"):
        return f"yes, paused by {job.get('pausedBy')}: {job.get('pausedReason')}"
    if job.get("suspicious"):
        return f"yes, but suspicious: {job.get('suspiciousReason')}"
    return "yes"


async def _history(settings: Settings, days: int) -> int:
    if days < 1:
        print("kontod: --days must be at least 1", file=sys.stderr)
        return 2
    from kontod.jobs.snapshots import daily_totals, daily_totals_in

    async with _database(settings) as pool, _konto(settings) as konto:
        if konto is None:
            rows = await daily_totals(pool, days, settings.runner.timezone)
        else:
            rows = await daily_totals_in(konto, days, settings.runner.timezone)
    # The sum of the users' totals, in the base currency the snapshots are written in.
    print(f"{'DATE':<12}{'ROWS':>8}{'USERS':>8}{'TOTAL ' + settings.rates.base_currency:>20}")
    for r in rows:
        total = f"{r.total or 0:,.2f}"
        print(f"{r.day.isoformat():<12}{r.snapshot_rows:>8}{r.users:>8}{total:>20}")
    if not rows:
        print(f"(no snapshot in the last {days} days)")
    return 0
