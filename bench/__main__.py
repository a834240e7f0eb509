"""``python -m bench``: both benchmarks in one run, a table of ratios, and optionally JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import postgres, refresh, snapshots
from bench.report import as_json, table
from kontod import logs


@dataclass(frozen=True)
class Profile:
    """The sizes of one kind of run; any option given on the command line wins."""

    users: int
    refresh_users: int
    latency_ms: float


# 80 and 48 refresh users are full rounds of 8 users in flight: no last round half empty.
DEFAULT = Profile(users=20_000, refresh_users=80, latency_ms=50)
QUICK = Profile(users=2_000, refresh_users=48, latency_ms=20)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="kontod's jobs against the old per-user ways, side by side, as ratios.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a small run: {QUICK.users} users, {QUICK.refresh_users} refresh users,"
        f" {QUICK.latency_ms:g} ms per bank request",
    )
    parser.add_argument(
        "--users", type=_positive, help=f"users for the snapshot benchmark ({DEFAULT.users})"
    )
    parser.add_argument(
        "--batch-size", type=_positive, default=1000, help="kontod's snapshot batch (1000)"
    )
    parser.add_argument(
        "--refresh-users",
        type=_positive,
        help=f"users for the refresh benchmark ({DEFAULT.refresh_users})",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        help=f"sandbox bank latency per request, ms ({DEFAULT.latency_ms:g})",
    )
    parser.add_argument(
        "--concurrency", type=_positive, default=8, help="kontod's refresh concurrency (8)"
    )
    parser.add_argument(
        "--old-commit-per-user",
        action="store_true",
        help="run the old snapshot job with one transaction per user instead of one commit per"
        " statement, to see what is left once commits are not the cost",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def _memory_sizes(users: int) -> tuple[int, int]:
    """Two database sizes, 5x apart, for the traced passes: big enough for the old job's
    per-user memory to stand out of the ~256 KiB every socket read allocates, small enough to
    stay quick."""
    small = max(250, users // 40)
    return small, small * 5


def _progress(started: float) -> snapshots.Progress:
    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    return say


async def _server_version(admin_dsn: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        version: str = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return version


async def _run(
    admin_dsn: str, args: argparse.Namespace, profile: Profile
) -> tuple[str, snapshots.SnapshotResult, refresh.RefreshResult]:
    say = _progress(time.perf_counter())
    users = args.users or profile.users
    refresh_users = args.refresh_users or profile.refresh_users
    latency_ms = profile.latency_ms if args.latency_ms is None else args.latency_ms
    snap = await snapshots.run(
        admin_dsn,
        users,
        batch_size=args.batch_size,
        memory_users=_memory_sizes(users),
        commit_per_user=args.old_commit_per_user,
        progress=say,
    )
    fresh = await refresh.run(
        admin_dsn,
        refresh_users,
        latency=latency_ms / 1000,
        concurrency=args.concurrency,
        progress=say,
    )
    return await _server_version(admin_dsn), snap, fresh


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    profile = QUICK if args.quick else DEFAULT
    # Only the jobs' warnings (a user failing to refresh) are worth seeing here.
    logs.configure("console", "warning")
    started = time.perf_counter()
    with postgres.server() as (admin_dsn, where):
        print(f"PostgreSQL: {where}", file=sys.stderr, flush=True)
        version, snap, fresh = asyncio.run(_run(admin_dsn, args, profile))
    environment = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": version,
        "platform": platform.platform(),
        "profile": "quick" if args.quick else "default",
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(table(environment, snap, fresh))
    if args.json is not None:
        args.json.write_text(json.dumps(as_json(environment, snap, fresh), indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    # A benchmark whose two sides did not do the same work measured nothing.
    return 0 if snap.comparison.same and fresh.bounded.complete and fresh.serial.complete else 1


if __name__ == "__main__":
    sys.exit(main())
