"""The ``kontod`` command: run, migrate, jobs list/run/next/pause/resume, runs, status, history,
reconcile transactions, doctor, demo.

Only ``run`` and ``demo`` (the daemons) log what they do; the other commands print their
answer on stdout and log nothing below a warning unless ``--verbose`` is given.

Exit status: 0 success, 1 failure (a failed run, an unhealthy report), 2 bad usage or a bad
setting (and, for ``status``, an unreachable daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import structlog

from kontod import __version__, db, jobs
from kontod.cli import commands, listing, times
from kontod.config import ConfigError, Settings, load_settings
from kontod.konto import engines, tokens
from kontod.konto import schema as konto_schema
from kontod.konto.store import KontoSql, KontoUnavailable
from kontod.logs import configure, watch_loop
from kontod.ops import suspicion
from kontod.scheduler.contract import JobSpec, RunStatus, Trigger, settle
from kontod.scheduler.runlist import STATUSES

log = structlog.get_logger("kontod.cli")
JOB_NAMES = jobs.NAMES
# The commands that keep logging at KONTOD_LOG_LEVEL: they are the daemon.
DAEMONS = ("run", "demo")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kontod", description="Runs and watches Konto's scheduled jobs."
    )
    p.add_argument("--version", action="version", version=f"kontod {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log at KONTOD_LOG_LEVEL on stderr (by default a command logs warnings only)",
    )
    # --verbose is taken after the command too (kontod runs -v); SUPPRESS keeps one given
    # before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the daemon (schedules, HTTP, metrics)")
    sub.add_parser("migrate", help="apply the database migrations and exit", parents=[verbose])
    jobs_cmd = sub.add_parser("jobs", help="list the jobs, or work with one")
    jobs_sub = jobs_cmd.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    every = jobs_sub.add_parser(
        "list", help="schedule, next tick, pause and health of every job", parents=[verbose]
    )
    every.add_argument("--json", action="store_true", help="everything, as JSON")
    run_one = jobs_sub.add_parser("run", help="run one job now, in this process", parents=[verbose])
    run_one.add_argument("name", help=" or ".join(JOB_NAMES))
    run_one.add_argument("--reason", help="why, recorded with the run")
    run_one.add_argument("-q", "--quiet", action="store_true", help="no progress, the outcome only")
    upcoming = jobs_sub.add_parser(
        "next", help="the next ticks of a job, local time and UTC", parents=[verbose]
    )
    upcoming.add_argument("name")
    upcoming.add_argument("--count", type=int, default=10, help="how many (default 10)")
    upcoming.add_argument(
        "--from", dest="start", help="from this time instead of now (2026-03-28T12:00, local)"
    )
    pause = jobs_sub.add_parser(
        "pause", help="skip the ticks of a job until it is resumed", parents=[verbose]
    )
    pause.add_argument("name")
    pause.add_argument("--reason", required=True, help="why, shown to whoever looks next")
    pause.add_argument(
        "--until", help="when the pause ends by itself: 2026-03-02T08:00 (local), 2h, 1d"
    )
    resume = jobs_sub.add_parser("resume", help="end the pause of a job", parents=[verbose])
    resume.add_argument("name")
    runs_cmd = sub.add_parser(
        "runs", help="the last runs, of every job or of one, from the database", parents=[verbose]
    )
    runs_cmd.add_argument("name", nargs="?", metavar="JOB", help="only this job's runs")
    runs_cmd.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    # kontod runs show ID: one run in full (a job is never named "show").
    runs_cmd.add_argument(
        "run_id", nargs="?", metavar="ID", help="kontod runs show ID: that run in full"
    )
    runs_cmd.add_argument("--status", choices=STATUSES, help="only runs with this status")
    runs_cmd.add_argument("--json", action="store_true", help="everything, in full, as JSON")
    status = sub.add_parser("status", help="show the health of a running daemon", parents=[verbose])
    status.add_argument("--url", help="base URL of the daemon (default: from KONTOD_LISTEN)")
    history = sub.add_parser(
        "history", help="snapshot rows per date, from the database", parents=[verbose]
    )
    history.add_argument("--days", type=int, default=7, help="how many days back (default 7)")
    reconcile = sub.add_parser("reconcile", help="repair what an earlier kontod left in Konto")
    reconcile_sub = reconcile.add_subparsers(
        dest="reconcile_command", required=True, metavar="WHAT"
    )
    twins = reconcile_sub.add_parser(
        "transactions",
        help="remove unkeyed twins of the web app's keyed transactions",
        parents=[verbose],
    )
    twins.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    twins.add_argument("--json", action="store_true", help="the report as JSON")
    doctor = sub.add_parser(
        "doctor",
        help="check Konto, kontod and the providers before and after the switch",
        parents=[verbose],
    )
    doctor.add_argument("--json", action="store_true", help="the checks as JSON")
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
    configure(settings.logging.format, _log_level(args, settings.logging.level))
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


def _log_level(args: argparse.Namespace, configured: str) -> str:
    """The daemons and ``--verbose`` log at the configured level; the other commands log
    only what is wrong, so that their output is their answer."""
    if args.command in DAEMONS or args.verbose:
        return configured
    level = max(logging.WARNING, logging.getLevelNamesMapping()[configured.upper()])
    return logging.getLevelName(level).lower()


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
    if args.command == "runs" and (args.name == "show" or args.run_id is not None):
        return await _show_run(settings, args.name, args.run_id)
    if args.command == "migrate":
        return await _migrate(settings)
    if args.command == "jobs":
        if args.jobs_command == "list":
            return await _jobs_list(settings, args.json)
        if args.name not in JOB_NAMES:
            print(
                f"kontod: no job named {args.name!r}; jobs: {', '.join(JOB_NAMES)}", file=sys.stderr
            )
            return 2
        if args.jobs_command == "next":
            return _next(settings, args.name, args.count, args.start)
        if args.jobs_command in ("pause", "resume"):
            return await _pause(settings, args)
        return await _run_job(settings, args.name, args.reason, args.quiet)
    if args.command == "runs":
        return await _runs(settings, args.name, args.limit, args.status, args.json)
    if args.command == "status":
        return await asyncio.to_thread(_status, settings, args.url)
    if args.command == "history":
        return await _history(settings, args.days)
    if args.command == "doctor":
        from kontod.cli import doctor
        from kontod.konto.store import KontoError

        try:
            checks = await doctor.diagnose(settings)
        except KontoError as exc:  # a read that failed after Konto's database answered
            print(commands.visible(f"kontod: doctor: {exc}"), file=sys.stderr)
            return 2
        doctor.print_checks(checks, args.json)
        return doctor.RANK[doctor.worst(checks)]
    if args.command == "reconcile":
        return await _reconcile(settings, args.dry_run, args.json)
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


async def _run_job(
    settings: Settings, name: str, reason: str | None = None, quiet: bool = False
) -> int:
    import aiohttp

    from kontod.ops import pings
    from kontod.scheduler import pauses
    from kontod.scheduler.runner import Runner, Skipped, utcnow

    async with (
        _database(settings) as pool,
        _konto(settings) as konto,
        aiohttp.ClientSession() as http,
    ):
        specs = await settle(jobs.declare_jobs(settings, pool, http, konto=konto))
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
            if not quiet:
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


async def _runs(
    settings: Settings, name: str | None, limit: int, status: str | None, as_json: bool
) -> int:
    from kontod.scheduler.runner import utcnow

    if name is not None and name not in JOB_NAMES:
        print(f"kontod: no job named {name!r}; jobs: {', '.join(JOB_NAMES)}", file=sys.stderr)
        return 2
    if not 1 <= limit <= 1000:
        print("kontod: --limit must be from 1 to 1000", file=sys.stderr)
        return 2
    async with _database(settings) as pool, _declared(settings, pool) as specs:
        populations = suspicion.populations(specs)
        await listing.print_runs(
            pool, name, limit, status, settings.runner.tz, utcnow(), populations, as_json
        )
    return 0


@contextlib.asynccontextmanager
async def _declared(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[list[JobSpec]]:
    """The jobs as the settings declare them, to read their schedules and exports; the HTTP
    session a configured provider needs is opened, never used."""
    import aiohttp

    async with _konto(settings) as konto, aiohttp.ClientSession() as http:
        yield await settle(jobs.declare_jobs(settings, pool, http, konto=konto))


async def _jobs_list(settings: Settings, as_json: bool) -> int:
    from kontod.scheduler.runner import utcnow

    async with _database(settings) as pool, _declared(settings, pool) as specs:
        limits = suspicion.from_settings(
            suspicion.populations(specs), settings.suspicion.thresholds
        )
        await listing.print_jobs(pool, specs, settings.runner.tz, utcnow(), limits, as_json)
    return 0


def _next(settings: Settings, name: str, count: int, start: str | None) -> int:
    from kontod.scheduler import instants
    from kontod.scheduler.runner import utcnow

    if not 1 <= count <= 1000:
        print("kontod: --count must be from 1 to 1000", file=sys.stderr)
        return 2
    now = utcnow()
    if start is not None:
        try:
            now = instants.parse_time(start, settings.runner.tz)
        except ValueError as exc:
            print(commands.visible(f"kontod: --from {exc}"), file=sys.stderr)
            return 2
    expr = jobs.schedules(settings)[name]
    commands.print_next(name, expr, settings.runner.tz, now, count)
    return 0


async def _pause(settings: Settings, args: argparse.Namespace) -> int:
    from kontod.scheduler import instants, pauses
    from kontod.scheduler.runner import utcnow

    now = utcnow()
    tz = settings.runner.tz
    until = None
    if args.jobs_command == "pause" and args.until:
        try:
            until = instants.parse_until(args.until, tz, now)
        except ValueError as exc:
            print(
                commands.visible(f"kontod: --until {times.within(str(exc), tz)}"), file=sys.stderr
            )
            return 2
    async with _database(settings) as pool:
        if args.jobs_command == "resume":
            await commands.resume_job(pool, args.name, now)
            return 0
        try:
            await commands.pause_job(pool, args.name, args.reason, until, tz, now)
        except ValueError as exc:
            print(commands.visible(f"kontod: {times.within(str(exc), tz)}"), file=sys.stderr)
            return 2
        except pauses.AlreadyPaused as exc:  # it says since when, as the table would
            print(commands.visible(f"kontod: {times.within(str(exc), tz)}"), file=sys.stderr)
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
    tz = settings.runner.tz
    rows: list[tuple[str, ...]] = [("JOB", "LAST STATUS", "LAST RUN", "NEXT RUN", "HEALTHY")]
    for job in report["jobs"]:
        cells = (
            job["name"],
            job["lastStatus"],
            times.text(times.parse(job["lastRun"]), tz),
            times.text(times.parse(job.get("nextRun")), tz),
            times.within(_health_cell(job), tz),
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


async def _reconcile(settings: Settings, dry_run: bool, as_json: bool) -> int:
    """``kontod reconcile transactions``, on whichever engine holds Konto's tables."""
    from kontod.cli.reconcile import print_report
    from kontod.konto import reconcile
    from kontod.konto.engines import open_konto
    from kontod.konto.store import KontoError

    try:
        konto = open_konto(settings.konto)
        if konto is not None:
            # The records of what was removed live in kontod's own database.
            try:
                async with db.open(settings) as pool:
                    report = await reconcile.reconcile_lite(konto, pool, dry_run)
            finally:
                await konto.close()
        else:
            async with _database(settings) as pool:
                report = await reconcile.reconcile_pg(pool, dry_run)
    except KontoError as exc:
        print(commands.visible(f"kontod: reconcile transactions: {exc}"), file=sys.stderr)
        return 2
    print_report(report, dry_run, as_json)
    return 0


async def _show_run(settings: Settings, first: str | None, raw: str | None) -> int:
    """``kontod runs show ID``; ``kontod runs JOB ID`` is refused."""
    from kontod.cli.show import print_run
    from kontod.scheduler.runlist import parse_run_id
    from kontod.scheduler.runner import utcnow

    if first != "show":
        print(commands.visible(f"kontod: runs: unexpected {raw!r}"), file=sys.stderr)
        return 2
    if raw is None:
        print("kontod: runs show needs the id of a run: kontod runs show ID", file=sys.stderr)
        return 2
    try:
        run_id = parse_run_id(raw)
    except ValueError as exc:
        print(commands.visible(f"kontod: runs show: {exc}"), file=sys.stderr)
        return 2
    async with _database(settings) as pool:
        found = await print_run(pool, run_id, settings.runner.tz, utcnow())
    if not found:
        print(f"kontod: no run with id {run_id}", file=sys.stderr)
        return 1
    return 0
