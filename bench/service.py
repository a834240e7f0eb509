"""The daemon itself: how fast it is ready, what it costs idle, how it answers during a long run.

``kontod run`` starts as a process of its own on an external database (the benchmark's working
copy), listening on a free loopback port with a manual-trigger token, with its snapshot schedule
set to once a year, two days ago, so that only the benchmark starts a run.

- **Start to ready**: from the process's start to the first ``GET /health`` answered 200.
- **Idle**: resident memory (``VmRSS``) once ready, and the CPU seconds (user + system, from
  ``/proc/<pid>/stat``) it spends over an idle stretch, per minute.
- **Latency**: a load generator requests ``/metrics`` and ``/health/cron`` at a steady rate
  each (open loop: every request is due at a fixed time and its latency counts from then, so a
  stalled server cannot hide behind requests that were never sent), first idle, then while
  ``daily-snapshots`` runs, started by ``POST /jobs/daily-snapshots/run``.
- **After the run**: resident memory, and the peak (``VmHWM``) of the whole life of the process.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg

from bench.job_process import memory_kib
from bench.scale import DEFAULT_WORKERS, job_environment
from bench.state import ROOT
from kontod.demo import rates_sandbox

ENDPOINTS = ("/metrics", "/health/cron")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RUN_STATUS_SQL = "SELECT status FROM kontod_runs WHERE id = $1"


@dataclass(frozen=True)
class Latencies:
    """Latencies of one endpoint under steady load, in seconds."""

    requests: int
    errors: int
    # From the time each request was due; and from the time it was actually sent, which
    # leaves out any delay of the load generator itself (the two differ when it lagged).
    seconds: list[float] = field(repr=False)
    service_seconds: list[float] = field(repr=False)

    def quantile(self, q: float) -> float | None:
        return _quantile(self.seconds, q)

    @property
    def p50(self) -> float | None:
        return self.quantile(0.5)

    @property
    def p99(self) -> float | None:
        return self.quantile(0.99)

    @property
    def max(self) -> float | None:
        return max(self.seconds) if self.seconds else None


@dataclass
class ServiceResult:
    users: int
    rate_per_endpoint: float
    start_to_ready_s: float
    idle_rss_kib: int
    idle_cpu_window_s: float
    idle_cpu_seconds: float
    idle: dict[str, Latencies]
    during_run: dict[str, Latencies]
    run_seconds: float
    run_status: str
    after_run_rss_kib: int
    peak_rss_kib: int

    @property
    def idle_cpu_per_minute(self) -> float:
        return self.idle_cpu_seconds * 60 / self.idle_cpu_window_s


def quiet_schedule(now: datetime) -> str:
    """A yearly schedule whose last tick was two days ago: nothing to catch up, nothing due."""
    day = now - timedelta(days=2)
    return f"0 2 {day.day} {day.month} *"


def _quantile(values: list[float], q: float) -> float | None:
    """The nearest-rank quantile ``q`` of ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name, in parentheses, may hold spaces: count fields after it.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def load(
    http: aiohttp.ClientSession, base: str, rate: float, done: Callable[[], bool]
) -> dict[str, Latencies]:
    """Request every endpoint ``rate`` times a second until ``done()``; latencies by endpoint."""
    interval = 1 / rate
    found: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
    served: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
    errors: dict[str, int] = dict.fromkeys(ENDPOINTS, 0)
    pending: set[asyncio.Task[None]] = set()

    async def one(endpoint: str, due: float) -> None:
        sent = time.perf_counter()
        try:
            async with http.get(base + endpoint) as r:
                await r.read()
                if r.status not in (200, 503):
                    errors[endpoint] += 1
        except aiohttp.ClientError:
            errors[endpoint] += 1
            return
        now = time.perf_counter()
        found[endpoint].append(now - due)
        served[endpoint].append(now - sent)

    start = time.perf_counter()
    n = 0
    while not done():
        due = start + n * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        for endpoint in ENDPOINTS:
            task = asyncio.create_task(one(endpoint, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        n += 1
    if pending:
        await asyncio.gather(*pending)
    return {
        e: Latencies(len(found[e]) + errors[e], errors[e], found[e], served[e]) for e in ENDPOINTS
    }


async def run(
    dsn: str,
    users: int,
    *,
    batch_size: int,
    workers: int = DEFAULT_WORKERS,
    rates: rates_sandbox.RateSandbox,
    rates_root: str,
    rate: float,
    idle_load_s: float,
    idle_cpu_s: float,
    progress: Callable[[str], None],
) -> ServiceResult:
    rates.ecb_day = datetime.now(UTC).date()
    port = _free_port()
    token = secrets.token_hex(16)
    env = job_environment(dsn, batch_size, rates_root, workers)
    env.update(
        KONTOD_LISTEN=f"127.0.0.1:{port}",
        KONTOD_ADMIN_TOKEN=token,
        KONTOD_SNAPSHOT_SCHEDULE=quiet_schedule(datetime.now(UTC)),
        KONTOD_LOG_LEVEL="warning",
    )
    base = f"http://127.0.0.1:{port}"
    progress(f"daemon: starting kontod run on the {users}-user copy")
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod",
        "run",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
        ) as http:
            ready = await _wait_ready(http, base, proc)
            start_to_ready = ready - started
            await asyncio.sleep(2)
            idle_rss = memory_kib(proc.pid)["VmRSS"]
            progress(f"daemon: idle CPU over {idle_cpu_s:g} s")
            cpu_before = cpu_seconds(proc.pid)
            await asyncio.sleep(idle_cpu_s)
            idle_cpu = cpu_seconds(proc.pid) - cpu_before
            progress(
                f"daemon: idle latency, {rate:g} requests/s per endpoint for {idle_load_s:g} s"
            )
            until = time.perf_counter() + idle_load_s
            idle = await load(http, base, rate, lambda: time.perf_counter() >= until)
            progress("daemon: latency while daily-snapshots runs")
            async with http.post(
                f"{base}/jobs/daily-snapshots/run", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                r.raise_for_status()
                run_id = (await r.json())["runId"]
            run_started = time.perf_counter()
            status = _watch_run(dsn, run_id)
            during = await load(http, base, rate, lambda: status.done())
            run_seconds = time.perf_counter() - run_started
            after = memory_kib(proc.pid)
    finally:
        if proc.returncode is None:
            proc.terminate()
        _, err = await proc.communicate()
    if proc.returncode not in (0, None):
        raise RuntimeError(f"kontod run exited {proc.returncode}: {err.decode()[-2000:]}")
    return ServiceResult(
        users=users,
        rate_per_endpoint=rate,
        start_to_ready_s=start_to_ready,
        idle_rss_kib=idle_rss,
        idle_cpu_window_s=idle_cpu_s,
        idle_cpu_seconds=idle_cpu,
        idle=idle,
        during_run=during,
        run_seconds=run_seconds,
        run_status=await status,
        after_run_rss_kib=after["VmRSS"],
        peak_rss_kib=after["VmHWM"],
    )


async def _wait_ready(
    http: aiohttp.ClientSession, base: str, proc: asyncio.subprocess.Process
) -> float:
    """The moment ``/health`` first answers 200."""
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"kontod run exited {proc.returncode} before it was ready")
        try:
            async with http.get(f"{base}/health") as r:
                if r.status == 200:
                    return time.perf_counter()
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.005)
    raise RuntimeError("kontod run was not ready within 60 s")


def _watch_run(dsn: str, run_id: int) -> asyncio.Task[str]:
    """A task that ends with the run's status once it is no longer running (read from the table)."""

    async def watch() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            while True:
                status: str = await conn.fetchval(RUN_STATUS_SQL, run_id)
                if status != "running":
                    return status
                await asyncio.sleep(0.25)
        finally:
            await conn.close()

    return asyncio.create_task(watch())


def summary(latencies: dict[str, Latencies]) -> dict[str, Any]:
    return {
        endpoint: {
            "requests": v.requests,
            "errors": v.errors,
            "p50_ms": _ms(v.p50),
            "p99_ms": _ms(v.p99),
            "max_ms": _ms(v.max),
            "mean_ms": _ms(statistics.fmean(v.seconds) if v.seconds else None),
            "from_sending_p99_ms": _ms(_quantile(v.service_seconds, 0.99)),
            "from_sending_max_ms": _ms(max(v.service_seconds) if v.service_seconds else None),
        }
        for endpoint, v in latencies.items()
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)
