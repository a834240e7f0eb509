"""``python -m bench.run_table``: the history reads on a large run table.

Fills ``kontod_runs`` with a million finished runs (two jobs, one run a minute each, some
failed), then measures what a replica does with it: the stats statement the history runs every
lease/3 (and after each run), ``GET /health/cron`` against a real daemon over loopback HTTP, and
one pruning pass. The stats statement must be index look-ups only: its plan is checked for a
sequential scan of the run table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from bench import postgres
from kontod import logs
from kontod.config import Settings
from kontod.daemon import Daemon
from kontod.ops.systemd import Notifier
from kontod.scheduler import runs

JOBS = ("daily-snapshots", "refresh-stale-connections")

FILL_SQL = """
INSERT INTO kontod_runs (job, trigger, scheduled_for, attempt, started_at, finished_at, status,
                         error, counts, instance, heartbeat_at, lease_until)
SELECT job, 'schedule', at, 1, at, at + interval '2 seconds',
       CASE WHEN i % 50 = 0 THEN 'error' ELSE 'success' END,
       CASE WHEN i % 50 = 0 THEN 'RuntimeError: bench' END,
       '{"users": 1000}', 'bench', at, at + interval '30 seconds'
  FROM unnest($1::text[]) AS job,
       generate_series(1, $2) AS i,
       LATERAL (SELECT now() - make_interval(mins => $2 - i + 1)) AS t(at)
"""


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ms = sorted(s * 1000 for s in seconds)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        return cls(round(statistics.median(ms), 3), round(p99, 3), round(ms[-1], 3))


@dataclass(frozen=True)
class RunTableResult:
    rows: int
    fill_s: float
    stats_query: Latency
    health_cron: Latency
    stats_plan_seq_scan: bool
    prune_s: float
    pruned: int


async def fill(pool: asyncpg.Pool, rows: int) -> None:
    per_job = rows // len(JOBS)
    await pool.execute("INSERT INTO kontod_jobs (name) SELECT unnest($1::text[])", list(JOBS))
    await pool.execute(FILL_SQL, list(JOBS), per_job)
    await pool.execute(
        """UPDATE kontod_jobs j SET runs = c.n, errors = c.e
             FROM (SELECT job, count(*) AS n, count(*) FILTER (WHERE status <> 'success') AS e
                     FROM kontod_runs GROUP BY job) c
            WHERE j.name = c.job"""
    )
    await pool.execute("VACUUM ANALYZE kontod_runs")


async def stats_plan_has_seq_scan(pool: asyncpg.Pool) -> bool:
    """Whether the stats statement's plan reads the run table sequentially."""
    plan = await pool.fetch("EXPLAIN " + runs.JOB_STATS_SQL)
    return any("Seq Scan on kontod_runs" in r[0] for r in plan)


async def time_stats(pool: asyncpg.Pool, n: int) -> Latency:
    took = []
    for _ in range(n):
        began = time.perf_counter()
        await runs.job_stats(pool)
        took.append(time.perf_counter() - began)
    return Latency.of(took)


async def time_health(dsn: str, n: int) -> Latency:
    settings = Settings().replace(
        database={"url": dsn, "state_dir": Path("/nonexistent")},
        http={"listen": ("127.0.0.1", 0)},
        runner={"timezone": "UTC"},
        logging={"format": "json", "level": "error"},
        snapshots={"schedule": "0 12 1 1 *"},  # no run during the measurement
    )
    daemon = Daemon(settings, notifier=Notifier.from_env({}))
    await daemon.start()
    took = []
    try:
        url = f"http://127.0.0.1:{daemon.port}/health/cron"
        async with aiohttp.ClientSession() as http:
            for _ in range(n):
                began = time.perf_counter()
                async with http.get(url) as resp:
                    await resp.read()
                took.append(time.perf_counter() - began)
    finally:
        await daemon.stop()
    return Latency.of(took)


async def measure(admin_dsn: str, rows: int = 1_000_000, requests: int = 500) -> RunTableResult:
    """Fill a fresh database with ``rows`` runs and time the history reads on it."""
    async with postgres.migrated_database(admin_dsn) as name:
        dsn = postgres.with_database(admin_dsn, name)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        assert pool is not None
        try:
            began = time.perf_counter()
            await fill(pool, rows)
            fill_s = time.perf_counter() - began
            seq_scan = await stats_plan_has_seq_scan(pool)
            stats = await time_stats(pool, requests)
            health = await time_health(dsn, requests)
            began = time.perf_counter()
            pruned = await runs.prune(pool, 90, 100)
            prune_s = time.perf_counter() - began
        finally:
            await pool.close()
    return RunTableResult(
        rows=rows,
        fill_s=round(fill_s, 1),
        stats_query=stats,
        health_cron=health,
        stats_plan_seq_scan=seq_scan,
        prune_s=round(prune_s, 2),
        pruned=pruned,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_table", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="runs in the table")
    parser.add_argument("--requests", type=int, default=500, help="timed reads of each kind")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    logs.configure("json", "error")
    with postgres.server() as (admin_dsn, where):
        print(f"server: {where}", file=sys.stderr)
        result = asyncio.run(measure(admin_dsn, args.rows, args.requests))
    data = dataclasses.asdict(result)
    print(
        f"{result.rows:,} runs (filled in {result.fill_s} s)\n"
        f"  stats statement: p50 {result.stats_query.p50_ms} ms, p99 {result.stats_query.p99_ms}"
        f" ms{' (SEQUENTIAL SCAN)' if result.stats_plan_seq_scan else ', index look-ups only'}\n"
        f"  GET /health/cron: p50 {result.health_cron.p50_ms} ms,"
        f" p99 {result.health_cron.p99_ms} ms\n"
        f"  pruning: {result.pruned:,} runs deleted in {result.prune_s} s"
    )
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    ok = not result.stats_plan_seq_scan and result.health_cron.p99_ms < 50
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
