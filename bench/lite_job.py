"""One scheduled run of ``daily-snapshots`` on a Konto SQLite file, in a process of its own.

``python -m bench.lite_job --dsn … --konto /path/konto.db --tick 2026-01-01T02:00:00+00:00``
(or ``--libsql URL --token …``: the same file behind a libSQL server) runs the job as the daemon would with Konto's tables in that file: kontod's PostgreSQL (``--dsn``)
keeps the claim, the run row and the rates, the real ``Runner`` claims, runs and records the
run. Every write transaction the run makes on the file is timed (the file's write lock is held
for about that long).

It prints one JSON line: the run's id, status and counts, the write transactions' durations
(count, p50, p99, max, in seconds) and the process's peak resident memory (``VmHWM``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bench.job_process import memory_kib
from kontod import db
from kontod.config import KontoLocation
from kontod.jobs import SNAPSHOTS
from kontod.jobs import snapshots as snapshots_job
from kontod.konto.libsql import LibsqlKonto
from kontod.konto.sqlite import open_sqlite
from kontod.konto.store import Engine, Fence, KontoSql, Result, Row, Statement, Value
from kontod.logs import configure
from kontod.scheduler.contract import JobSpec
from kontod.scheduler.runner import Runner, Skipped

PARIS = ZoneInfo("Europe/Paris")


class TimedKonto:
    """A KontoSql that times each write transaction of the one it wraps."""

    def __init__(self, inner: KontoSql) -> None:
        self.inner = inner
        self.writes: list[float] = []

    @property
    def engine(self) -> Engine:
        return self.inner.engine

    @property
    def location(self) -> KontoLocation:
        return self.inner.location

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        return await self.inner.read(sql, params)

    async def write(self, steps: Sequence[Statement], fence: Fence | None) -> list[Result]:
        started = time.perf_counter()
        try:
            return await self.inner.write(steps, fence)
        finally:
            self.writes.append(time.perf_counter() - started)

    async def advance_fence(self, fence: Fence) -> None:
        await self.inner.advance_fence(fence)

    async def close(self) -> None:
        await self.inner.close()


def _quantiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    cuts = (
        statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    )
    return {"count": len(values), "p50": cuts[49], "p99": cuts[98], "max": max(values)}


async def _run(args: argparse.Namespace) -> Any:
    configure("console", "warning")
    dsn, tick, batch = args.dsn, args.tick, args.batch_size
    instance = db.new_instance_name()
    pool = await db.create_pool(dsn, instance, max_size=3)
    inner: KontoSql
    if args.libsql:
        inner = LibsqlKonto(args.libsql, args.token, busy_timeout=30)
    else:
        inner = open_sqlite(str(args.konto), busy_timeout=30)
    konto = TimedKonto(inner)
    try:
        spec = JobSpec(
            name=SNAPSHOTS,
            schedule="0 2 * * *",
            body=snapshots_job.make_body(pool, PARIS, batch, konto=konto),
            grace=timedelta(hours=1),
            max_runtime=timedelta(hours=2),
            catchup_window=timedelta(days=3650),
            exports=snapshots_job.EXPORTS,
        )
        runner = Runner(pool, [spec], PARIS, instance)
        await runner.prepare()
        try:
            outcome = await runner.trigger(SNAPSHOTS, "schedule", tick)
            if isinstance(outcome, Skipped):
                return {"skipped": outcome.reason}
            status = await outcome.task
        finally:
            await runner.stop(10)
        return {
            "run_id": outcome.run_id,
            "status": status,
            "writes": _quantiles(konto.writes),
            **memory_kib(),
        }
    finally:
        await konto.close()
        await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lite_job")
    parser.add_argument("--dsn", required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--konto", type=Path, help="Konto's SQLite file")
    where.add_argument("--libsql", help="a libSQL server's URL (Hrana over HTTP)")
    parser.add_argument("--token", help="the libSQL server's token")
    parser.add_argument("--tick", required=True, type=datetime.fromisoformat)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    result = asyncio.run(_run(args))
    print(json.dumps(result), flush=True)
    return 0 if result.get("status") == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
