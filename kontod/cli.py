"""The ``kontod`` command: run, migrate, jobs run, status, history, demo.

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
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import structlog

from kontod import __version__, db
from kontod.config import ConfigError, Settings, load_settings
from kontod.logs import configure

log = structlog.get_logger("kontod.cli")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kontod", description="Runs and watches Konto's scheduled jobs."
    )
    p.add_argument("--version", action="version", version=f"kontod {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the daemon (schedules, HTTP, metrics)")
    sub.add_parser("migrate", help="apply the database migrations and exit")
    jobs = sub.add_parser("jobs", help="work with one job")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    run_one = jobs_sub.add_parser("run", help="run one job now, in this process")
    run_one.add_argument("name", help="daily-snapshots or refresh-stale-connections")
    status = sub.add_parser("status", help="show the health of a running daemon")
    status.add_argument("--url", help="base URL of the daemon (default: from KONTOD_LISTEN)")
    history = sub.add_parser("history", help="snapshot rows per date, from the database")
    history.add_argument("--days", type=int, default=7, help="how many days back (default 7)")
    sub.add_parser("demo", help="demo data, a sandbox bank and the daemon, all local")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"kontod: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_format, settings.log_level)
    try:
        return asyncio.run(_dispatch(args, settings))
    except (db.EmbeddedUnavailable, ConfigError) as exc:
        print(f"kontod: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "run":
        from kontod.daemon import serve

        return await serve(settings)
    if args.command == "migrate":
        return await _migrate(settings)
    if args.command == "jobs":
        return await _run_job(settings, args.name)
    if args.command == "status":
        return await asyncio.to_thread(_status, settings, args.url)
    if args.command == "history":
        return await _history(settings, args.days)
    if args.command == "demo":
        from kontod.demo import demo

        return await demo(settings)
    raise AssertionError(args.command)


@asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A migrated pool on the configured (or embedded) database, for one-shot commands."""
    embedded = None
    dsn = settings.database_url
    if dsn is None:
        embedded = db.EmbeddedPostgres(settings.state_dir)
        log.info("database.embedded", data_dir=str(embedded.data_dir))
        dsn = await embedded.start()
    try:
        pool = await db.create_pool(dsn, db.new_instance_name(), max_size=4)
        try:
            async with pool.acquire() as conn:
                applied = await db.migrate(conn)
            if applied:
                log.info("database.migrated", applied=applied)
            yield pool
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            await embedded.stop()


async def _migrate(settings: Settings) -> int:
    async with _database(settings):
        pass
    return 0


async def _run_job(settings: Settings, name: str) -> int:
    import aiohttp

    from kontod.jobs import declare_jobs
    from kontod.runner import Runner, Skipped

    async with _database(settings) as pool, aiohttp.ClientSession() as http:
        jobs = declare_jobs(settings, pool, http)
        names = [spec.name for spec in jobs]
        if name not in names:
            print(f"kontod: no job named {name!r}; jobs: {', '.join(names)}", file=sys.stderr)
            return 2
        instance = await pool.fetchval("SELECT current_setting('application_name')")
        runner = Runner(pool, jobs, settings.tz, instance)
        await runner.prepare()
        outcome = await runner.trigger(name, "manual")
        if isinstance(outcome, Skipped):
            print(f"kontod: {name} is already running", file=sys.stderr)
            return 1
        status = await outcome.task
        print(f"{name}: run {outcome.run_id} {status}")
        return 0 if status == "success" else 1


def _status(settings: Settings, url: str | None) -> int:
    base = (url or f"http://{settings.listen}").rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health/cron", timeout=10) as resp:  # noqa: S310
            report: dict[str, Any] = json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code != 503:
            print(f"kontod: {base}/health/cron answered HTTP {exc.code}", file=sys.stderr)
            return 2
        report = json.load(exc)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"kontod: cannot reach {base}/health/cron: {reason}", file=sys.stderr)
        return 2
    rows = [("JOB", "LAST STATUS", "LAST RUN", "NEXT RUN", "HEALTHY")]
    for job in report["jobs"]:
        rows.append(
            (
                job["name"],
                job["lastStatus"],
                job["lastRun"] or "-",
                job.get("nextRun") or "-",
                "yes" if job["healthy"] else f"NO: {job.get('reason') or ''}".strip(),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:4])) + "  " + r[4])
    print(f"overall: {report['status']}")
    return 0 if report["status"] == "healthy" else 1


async def _history(settings: Settings, days: int) -> int:
    if days < 1:
        print("kontod: --days must be at least 1", file=sys.stderr)
        return 2
    async with _database(settings) as pool:
        rows = await pool.fetch(
            """SELECT date, count(*) AS snapshot_rows, count(DISTINCT user_id) AS users
                 FROM patrimoine_snapshots
                WHERE date > (now() AT TIME ZONE $2)::date - $1::int
                GROUP BY date ORDER BY date DESC""",
            days,
            settings.timezone,
        )
    print(f"{'DATE':<12}{'ROWS':>8}{'USERS':>8}")
    for r in rows:
        print(f"{r['date'].isoformat():<12}{r['snapshot_rows']:>8}{r['users']:>8}")
    if not rows:
        print(f"(no snapshot in the last {days} days)")
    return 0
