"""refresh-stale-connections against a bank that answers every request after a fixed latency.

M stale users are seeded to match the sandbox bank's demo data (the five Powens accounts of
``demo_accounts(n)``, never synced, no transaction; one ``active`` connection with the token
``sandbox-user-<n>``). The job is wired exactly as the daemon wires it (``declare_jobs`` with
settings read from an environment: the sandbox's URL, ``KONTOD_REFRESH_CONCURRENCY``, and
``KONTOD_PROVIDER_RATE`` set far above what any pass asks for, so that the rate limit is not
what is measured), and runs on a fresh copy of the seeded database at each concurrency.

With L seconds per request, R requests and concurrency c, no implementation can finish before
R * L / c; the share of that ideal a pass reaches is the figure of merit. The old job's way,
one user at a time, runs on a smaller set of users (it is c = 1: R * L at best).

The sandbox runs in a process of its own (``bench/sandbox_process.py``). Its capacity is
measured first with no latency (as many requests as it can answer, 64 at a time, and the CPU
seconds it spent on them), and its CPU time is read during each pass, so the report shows how
far it was from being the bottleneck.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import structlog

from bench.state import ROOT, create_database, drop_database, with_database, working_copy
from kontod import db
from kontod.config import load_settings
from kontod.demo.sandbox import demo_accounts, token_for
from kontod.jobs import REFRESH, declare_jobs
from kontod.scheduler.contract import RunContext

# Far above the most any pass asks for (64 users in flight, 50 ms each: 1 280 requests/s).
PROVIDER_RATE = "100000"

SEED_USERS_SQL = """
INSERT INTO users (id, email, name)
SELECT u, 'bench' || u || '@example.org', 'User ' || u FROM unnest($1::bigint[]) u
"""
SEED_ACCOUNTS_SQL = """
INSERT INTO bank_accounts (user_id, provider, provider_account_id, name, balance)
SELECT user_id, 'powens', pid, name, 0
  FROM unnest($1::bigint[], $2::text[], $3::text[]) AS t (user_id, pid, name)
"""
SEED_CONNECTIONS_SQL = """
INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)
SELECT user_id, user_id::text, token, 'active'
  FROM unnest($1::bigint[], $2::text[]) AS t (user_id, token)
"""
# What a complete pass leaves: no Powens account that was never synced.
NEVER_SYNCED_SQL = (
    "SELECT count(*) FROM bank_accounts WHERE provider = 'powens' AND last_sync IS NULL"
)


@dataclass(frozen=True)
class RefreshPass:
    """One run of the job at one concurrency."""

    concurrency: int
    users: int
    latency_s: float
    seconds: float
    requests: int
    max_in_flight: int
    failed: int
    never_synced_after: int
    sandbox_cpu_seconds: float
    # The CPU time of this process, which runs the job (and nothing else during the pass).
    job_cpu_seconds: float

    @property
    def ideal_seconds(self) -> float:
        """What latency alone costs: every request waits, ``concurrency`` at a time."""
        return self.requests * self.latency_s / self.concurrency

    @property
    def share_of_ideal(self) -> float:
        return self.ideal_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.failed == 0 and self.never_synced_after == 0 and self.requests > 0

    @property
    def sandbox_busy(self) -> float:
        """The share of one core the sandbox used during the pass."""
        return self.sandbox_cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def job_busy(self) -> float:
        """The share of one core the job's process used during the pass."""
        return self.job_cpu_seconds / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Capacity:
    """What the sandbox answers with no latency, 64 requests at a time."""

    requests: int
    seconds: float
    cpu_seconds: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RefreshResult:
    users: int
    latency_s: float
    capacity: Capacity
    passes: list[RefreshPass] = field(default_factory=list)
    serial: RefreshPass | None = None


class SandboxProcess:
    """The client side of ``bench.sandbox_process``: its API URL, counters and latency."""

    def __init__(self, base_url: str, http: aiohttp.ClientSession) -> None:
        self.base_url = base_url
        self.root = base_url.removesuffix("/2.0")
        self.http = http

    async def reset(self, latency: float) -> None:
        async with self.http.post(f"{self.root}/bench/reset", params={"latency": latency}) as r:
            r.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.root}/bench/stats") as r:
            r.raise_for_status()
            found: dict[str, Any] = await r.json()
            return found


@asynccontextmanager
async def sandbox_process() -> AsyncIterator[str]:
    """Start the sandbox in a process of its own; yield its API base URL; stop it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.sandbox_process",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the sandbox process exited before it was listening")
        yield line.decode().strip()
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def seed(conn: asyncpg.Connection, users: int) -> None:
    """Sandbox users 1..``users`` with their stale accounts and an active connection each."""
    ids = list(range(1, users + 1))
    accounts = [a for u in ids for a in demo_accounts(u)]
    async with conn.transaction():
        await conn.execute(SEED_USERS_SQL, ids)
        await conn.execute(
            SEED_ACCOUNTS_SQL,
            [a.user for a in accounts],
            [str(a.id) for a in accounts],
            [a.name for a in accounts],
        )
        await conn.execute(SEED_CONNECTIONS_SQL, ids, [token_for(u) for u in ids])
    await conn.execute("VACUUM ANALYZE")


async def measure_capacity(sandbox: SandboxProcess, token: str, requests: int) -> Capacity:
    """Requests answered per second with no latency, 64 in flight, and their CPU seconds."""
    await sandbox.reset(0.0)
    before = (await sandbox.stats())["cpu_seconds"]
    todo = iter(range(requests))

    async def client() -> None:
        for _ in todo:
            async with sandbox.http.get(
                f"{sandbox.base_url}/users/me/accounts",
                headers={"Authorization": f"Bearer {token}"},
            ) as r:
                await r.read()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(64)))
    seconds = time.perf_counter() - started
    after = (await sandbox.stats())["cpu_seconds"]
    return Capacity(requests, seconds, after - before)


async def one_pass(
    dsn: str, sandbox: SandboxProcess, users: int, concurrency: int, latency: float
) -> RefreshPass:
    """The job as the daemon declares it, at ``concurrency``, over every seeded user."""
    settings = load_settings(
        {
            "KONTOD_DATABASE_URL": dsn,
            "KONTOD_POWENS_URL": sandbox.base_url,
            "KONTOD_REFRESH_CONCURRENCY": str(concurrency),
            "KONTOD_PROVIDER_RATE": PROVIDER_RATE,
            "KONTOD_TIMEZONE": "UTC",
        }
    )
    await sandbox.reset(latency)
    pool = await db.create_pool(dsn, db.new_instance_name())
    try:
        async with aiohttp.ClientSession() as http:
            spec = next(s for s in declare_jobs(settings, pool, http) if s.name == REFRESH)
            ctx = RunContext(
                run_id=1,
                job=REFRESH,
                trigger="manual",
                scheduled_for=None,
                started_at=datetime.now(UTC),
                log=structlog.get_logger("bench.refresh"),
            )
            before = await sandbox.stats()
            cpu_before = _cpu_seconds()
            started = time.perf_counter()
            await spec.body(ctx)
            seconds = time.perf_counter() - started
            job_cpu = _cpu_seconds() - cpu_before
            after = await sandbox.stats()
        never_synced = await pool.fetchval(NEVER_SYNCED_SQL)
    finally:
        await pool.close()
    return RefreshPass(
        concurrency=concurrency,
        users=users,
        latency_s=latency,
        seconds=seconds,
        requests=after["requests"] - before["requests"],
        max_in_flight=after["max_in_flight"],
        failed=ctx.counts["items_failed"],
        never_synced_after=never_synced,
        sandbox_cpu_seconds=after["cpu_seconds"] - before["cpu_seconds"],
        job_cpu_seconds=job_cpu,
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(
    admin_dsn: str,
    users: int,
    *,
    latency: float,
    concurrencies: tuple[int, ...],
    serial_users: int,
    capacity_requests: int,
    progress: Any,
) -> RefreshResult:
    """Seed once; measure the sandbox's capacity, then each concurrency, then one at a time."""
    seeded = {}
    for size in sorted({users, serial_users}):
        name = f"kontod_bench_refresh_{size}_{int(time.time())}"
        await create_database(admin_dsn, name)
        seeded[size] = name
    try:
        for size, name in seeded.items():
            conn = await asyncpg.connect(with_database(admin_dsn, name))
            try:
                await db.migrate(conn)
                await seed(conn, size)
            finally:
                await conn.close()
        async with sandbox_process() as base_url, aiohttp.ClientSession() as http:
            sandbox = SandboxProcess(base_url, http)
            progress(f"refresh: sandbox capacity, {capacity_requests} requests with no latency")
            capacity = await measure_capacity(sandbox, token_for(1), capacity_requests)
            result = RefreshResult(users, latency, capacity)
            for slots in concurrencies:
                progress(f"refresh: {users} users at concurrency {slots}")
                async with working_copy(admin_dsn, seeded[users]) as dsn:
                    result.passes.append(await one_pass(dsn, sandbox, users, slots, latency))
            progress(f"refresh: {serial_users} users one at a time (the old job's way)")
            async with working_copy(admin_dsn, seeded[serial_users]) as dsn:
                result.serial = await one_pass(dsn, sandbox, serial_users, 1, latency)
    finally:
        for name in seeded.values():
            await drop_database(admin_dsn, name)
    return result
