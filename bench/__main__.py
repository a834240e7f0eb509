"""``python -m bench``: the snapshot job at scale, the refresh job, the daemon; a report and JSON."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import dataset, lite, refresh, report, scale, service, state
from kontod import logs
from kontod.demo import rates_sandbox

RESULTS = state.ROOT / "bench" / "results"
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"
PG_SETTINGS = ("shared_buffers", "work_mem", "max_wal_size", "synchronous_commit", "fsync")


@dataclass(frozen=True)
class Profile:
    """The sizes of one kind of run; options given on the command line win."""

    name: str
    sizes: tuple[int, ...]
    history_days: int
    repetitions: int
    old_up_to: int
    refresh_users: int
    serial_users: int
    latency_ms: float
    capacity_requests: int
    rate: float
    idle_load_s: float
    idle_cpu_s: float
    run_table_rows: int
    # The SQLite Konto (bench/lite.py): sizes, days of history, users of the web app's loop.
    lite_sizes: tuple[int, ...]
    lite_history_days: int
    lite_old_sample: int
    # Measure every template in place (else only those a working copy does not fit beside).
    in_place: bool = False


FULL = Profile(
    name="full",
    sizes=(10_000, 100_000, 1_000_000),
    history_days=30,
    repetitions=3,
    old_up_to=100_000,
    refresh_users=2000,
    serial_users=100,
    latency_ms=50,
    capacity_requests=5000,
    rate=20,
    idle_load_s=15,
    idle_cpu_s=60,
    run_table_rows=1_000_000,
    lite_sizes=(10_000, 100_000),
    lite_history_days=7,
    lite_old_sample=lite.OLD_SAMPLE,
)
QUICK = Profile(
    name="quick",
    sizes=(2_000,),
    history_days=3,
    repetitions=2,
    old_up_to=2_000,
    refresh_users=96,
    serial_users=8,
    latency_ms=20,
    capacity_requests=500,
    rate=20,
    idle_load_s=2,
    idle_cpu_s=5,
    run_table_rows=10_000,
    lite_sizes=(1_000,),
    lite_history_days=2,
    lite_old_sample=20,
    # So that CI runs the in-place path, and its putting back of the template, every time.
    in_place=True,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="kontod's jobs against PostgreSQL's own floor, the ideal refresh and the"
        " old jobs; the daemon's latency and footprint.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI (well under 2 min)")
    p.add_argument(
        "--sizes", type=_sizes, help="users of each snapshot data set, e.g. 10000,100000"
    )
    p.add_argument("--history-days", type=int, help="days of snapshot history in the tables")
    p.add_argument("--repetitions", type=int, help="passes of each snapshot variant")
    p.add_argument("--batch-size", type=int, default=1000, help="kontod's snapshot batch (1000)")
    p.add_argument(
        "--snapshot-workers",
        type=int,
        default=scale.DEFAULT_WORKERS,
        help=f"KONTOD_SNAPSHOT_WORKERS of the kontod runs ({scale.DEFAULT_WORKERS})",
    )
    p.add_argument("--old-up-to", type=int, help="largest size the old per-user job runs on")
    p.add_argument("--refresh-users", type=int, help="stale users of the refresh benchmark")
    p.add_argument("--no-refresh", action="store_true", help="leave the refresh benchmark out")
    p.add_argument("--no-daemon", action="store_true", help="leave the daemon benchmark out")
    p.add_argument(
        "--lite-sizes", type=_sizes, help="users of each SQLite Konto data set, e.g. 10000,100000"
    )
    p.add_argument("--no-lite", action="store_true", help="leave the SQLite Konto out")
    p.add_argument(
        "--lite-only",
        action="store_true",
        help="the SQLite Konto alone: no PostgreSQL snapshot sizes, refresh, daemon, run table",
    )
    p.add_argument(
        "--in-place",
        action="store_true",
        help="measure each template itself, then put it back (no working copy)",
    )
    p.add_argument("--json", type=Path, help="where the JSON goes (full run: bench/results/)")
    p.add_argument(
        "--readme",
        type=Path,
        help="replace the performance table of this page (docs/performance.md)",
    )
    return p


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected numbers such as 10000,100000"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be at least 1")
    return sizes


def _say(started: float) -> scale.Progress:
    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    return say


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        total_kib = int(f.readline().split()[1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=state.ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(total_kib / 1024 / 1024, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit,
    }


async def _server_facts(admin_dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        version = await conn.fetchval("SHOW server_version")
        settings = {name: await conn.fetchval(f"SHOW {name}") for name in PG_SETTINGS}
    finally:
        await conn.close()
    return {"postgresql": version, "postgresql_settings": settings}


async def _drop_stale_templates(admin_dsn: str, progress: scale.Progress) -> None:
    """Templates of an older data shape can never be measured again: free their disk."""
    current = dataset.shape_fingerprint()
    for name in await state.stale_templates(admin_dsn, set()):
        if not name.endswith(current):
            progress(f"dropping template {name}: generated from an older data shape")
            await state.drop_database(admin_dsn, name)


async def _run(admin_dsn: str, args: argparse.Namespace, p: Profile) -> report.Results:
    say = _say(time.perf_counter())
    on_sqlite = [] if args.no_lite else await _lite(admin_dsn, args, p, say)
    if args.lite_only:
        return report.Results({}, [], None, None, {}, lite=on_sqlite)
    await _drop_stale_templates(admin_dsn, say)
    rates = rates_sandbox.RateSandbox()
    async with rates.serve() as rates_root:
        snapshots, svc, skipped = await _snapshots(admin_dsn, args, p, rates, rates_root, say)
    fresh = None
    if not args.no_refresh:
        fresh = await refresh.run(
            admin_dsn,
            args.refresh_users or p.refresh_users,
            latency=p.latency_ms / 1000,
            concurrencies=report.TARGET_CONCURRENCIES,
            serial_users=p.serial_users,
            capacity_requests=p.capacity_requests,
            progress=say,
        )
    run_table = await _run_table(admin_dsn, p.run_table_rows, say)
    return report.Results({}, snapshots, fresh, svc, run_table, skipped, on_sqlite)


async def _lite(
    admin_dsn: str, args: argparse.Namespace, p: Profile, say: scale.Progress
) -> list[lite.LiteResult]:
    """The snapshot on a Konto SQLite file at each of its sizes (bench/lite.py)."""
    found = []
    for users in args.lite_sizes or p.lite_sizes:
        found.append(
            await lite.measure(
                admin_dsn,
                users,
                history_days=p.lite_history_days,
                repetitions=args.repetitions or p.repetitions,
                batch_size=args.batch_size,
                old_sample=p.lite_old_sample,
                progress=say,
            )
        )
    return found


async def _snapshots(
    admin_dsn: str,
    args: argparse.Namespace,
    p: Profile,
    rates: rates_sandbox.RateSandbox,
    rates_root: str,
    say: scale.Progress,
) -> tuple[list[scale.ScaleResult], service.ServiceResult | None, list[dict[str, Any]]]:
    """Every size's snapshot variants; the daemon's figures on the largest."""
    sizes = args.sizes or p.sizes
    days = args.history_days or p.history_days
    reps = args.repetitions or p.repetitions
    old_up_to = p.old_up_to if args.old_up_to is None else args.old_up_to
    snapshots: list[scale.ScaleResult] = []
    svc: service.ServiceResult | None = None
    skipped: list[dict[str, Any]] = []
    in_place: dict[int, str] = {}
    for users in sizes:
        # The days the passes write: kontod's and the floor's of each repetition, the old
        # job's where it runs, the daemon's run on the largest size.
        written = 2 * _repetitions(users, reps, args) + (users <= old_up_to) + (users == max(sizes))
        too_big, here = await _room(admin_dsn, users, days, written)
        if too_big is not None:
            say(f"snapshots: {users} users skipped: {too_big}")
            skipped.append({"users": users, "reason": too_big})
        elif here:
            in_place[users] = "the disk cannot hold a working copy beside it"
        elif args.in_place:
            in_place[users] = "--in-place"
        elif p.in_place:
            in_place[users] = f"the {p.name} run measures in place, so that CI runs that path"
    measured = [u for u in sizes if u not in {k["users"] for k in skipped}]
    for users in measured:
        async with scale.working_data(
            admin_dsn, users, days, say, in_place=in_place.get(users)
        ) as data:
            old = users <= old_up_to
            snapshots.append(
                await scale.measure(
                    data,
                    repetitions=_repetitions(users, reps, args),
                    batch_size=args.batch_size,
                    workers=args.snapshot_workers,
                    rates=rates,
                    rates_root=rates_root,
                    old=old,
                    old_note=None
                    if old
                    else f"not run above {old_up_to} users (one pass would take"
                    f" about {users * 0.0025 / 60:.0f} min at 2.5 ms per user)",
                    progress=say,
                )
            )
            # The daemon's figures come from the largest size measured.
            if users == max(measured) and not args.no_daemon:
                svc = await service.run(
                    data.dsn,
                    users,
                    batch_size=args.batch_size,
                    workers=args.snapshot_workers,
                    rates=rates,
                    rates_root=rates_root,
                    rate=p.rate,
                    idle_load_s=p.idle_load_s,
                    idle_cpu_s=p.idle_cpu_s,
                    progress=say,
                )
    return snapshots, svc, skipped


# From this size on, two repetitions unless --repetitions says otherwise: each pass of a
# million users takes minutes.
LARGE = 1_000_000
LARGE_REPETITIONS = 2


def _repetitions(users: int, reps: int, args: argparse.Namespace) -> int:
    if users >= LARGE and args.repetitions is None:
        return min(reps, LARGE_REPETITIONS)
    return reps


async def _room(admin_dsn: str, users: int, days: int, written: int) -> tuple[str | None, bool]:
    """Whether a size fits on this disk: (why not, or None; whether to measure the template in
    place because a working copy does not fit beside it)."""
    free = state.free_bytes()
    if free is None:
        return None, False
    size = dataset.estimated_bytes(users, days)
    cached = await state.database_exists(
        admin_dsn, state.template_name(users, days, dataset.shape_fingerprint())
    )
    # The template unless it is cached; the ``written`` days the passes add; room for the WAL.
    template = 0 if cached else size
    grows = dataset.estimated_bytes(users, written) - dataset.estimated_bytes(users, 0)
    wal = 4 * 2**30
    if free >= template + size + grows + wal:
        return None, False
    if free >= template + grows + wal:
        return None, True
    return (
        f"needs about {(template + grows + wal) / 2**30:.0f} GiB free for its data set and"
        f" the days the passes write ({size / 2**30:.0f} GiB of data set), {free / 2**30:.0f}"
        " GiB free",
        False,
    )


async def _run_table(admin_dsn: str, rows: int, progress: scale.Progress) -> dict[str, Any]:
    """``/health/cron`` on a run table of ``rows`` runs, by ``bench/run_table.py`` when present."""
    try:
        module = importlib.import_module("bench.run_table")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.run_table":
            raise
        return {"p99_ms": None, "note": "bench/run_table.py is not in this tree"}
    progress(f"run table: /health/cron with {rows} runs in the table")
    result = await module.measure(admin_dsn, rows)
    found: dict[str, Any] = dataclasses.asdict(result)
    health = found["health_cron"]
    return {
        "rows": rows,
        "p50_ms": health["p50_ms"],
        "p99_ms": health["p99_ms"],
        "max_ms": health["max_ms"],
        "note": "" if rows >= 1_000_000 else f"{rows} rows, not 10^6",
        "details": found,
    }


def replace_readme_section(readme: Path, table: str, command: str) -> None:
    """Put the latest report between the Performance section's markers."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_BEGIN} … {README_END} markers to replace")
    block = f"{README_BEGIN}\nReproduce with `{command}`.\n\n{table}\n{README_END}"
    pattern = re.escape(README_BEGIN) + r".*?" + re.escape(README_END)
    readme.write_text(re.sub(pattern, lambda _: block, text, count=1, flags=re.DOTALL))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    p = QUICK if args.quick else FULL
    logs.configure("console", "warning")
    started = time.perf_counter()
    load_before = _load()
    environment: dict[str, Any] = {**_machine(), "profile": p.name, "load_before": load_before}
    environment["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    environment["command"] = "python -m bench " + " ".join(argv or sys.argv[1:])
    with state.server() as (admin_dsn, where):
        print(f"PostgreSQL: {where}", file=sys.stderr, flush=True)
        environment["server"] = where.split(" (")[0]

        async def both() -> report.Results:
            facts = await _server_facts(admin_dsn)
            found = await _run(admin_dsn, args, p)
            found.environment = {**environment, **facts}
            return found

        results = asyncio.run(both())
    results.environment.update(
        load_after=_load(),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        wall_seconds=round(time.perf_counter() - started, 1),
    )
    table = report.markdown(results)
    print(table)
    requested = () if args.lite_only else args.sizes or p.sizes
    lite_requested = () if args.no_lite else args.lite_sizes or p.lite_sizes
    failed = report.failures(results, requested, lite_requested)
    target = args.json
    if target is None and not args.quick:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = RESULTS / f"{stamp}-{p.name}.json"
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report.as_json(results, failed), indent=2, default=str) + "\n")
        print(f"results written to {target}", file=sys.stderr)
    if args.readme is not None:
        replace_readme_section(args.readme, table, results.environment["command"])
    # A benchmark that skipped a size, whose sides did not produce the same rows, whose re-run
    # of an unchanged day wrote, or that left users unrefreshed, measured less than it says:
    # that fails, after the report is written; a slow figure never does.
    for reason in failed:
        print(f"bench: FAILED: {reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
