"""Small builders shared by the tests: job specs, runners on their own pools, users."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from kontod import db
from kontod.job import JobBody, JobSpec, RunContext
from kontod.retries import RetryPolicy
from kontod.runner import Runner, utcnow

PARIS = ZoneInfo("Europe/Paris")

LEGACY_TABLES = """
CREATE TABLE users (id integer PRIMARY KEY, email text, name text,
                    created_at timestamptz DEFAULT now());
CREATE TABLE bank_accounts (id integer PRIMARY KEY, user_id integer REFERENCES users,
    company_id integer, provider text, provider_account_id text, name text,
    balance double precision, hidden integer DEFAULT 0, last_sync timestamptz,
    type text, usage text, subtype text, currency text DEFAULT 'EUR');
"""
"""Konto's users and bank_accounts as an older deployment made them: floats and 0/1 flags."""


def spec(
    name: str = "test-job",
    body: JobBody | None = None,
    *,
    schedule: str = "0 2 * * *",
    grace: float = 3600,
    max_runtime: float = 60,
    catchup: float = 20 * 3600,
) -> JobSpec:
    async def nothing(ctx: RunContext) -> None:
        ctx.counts["items_done"] += 1

    return JobSpec(
        name=name,
        schedule=schedule,
        body=body or nothing,
        grace=timedelta(seconds=grace),
        max_runtime=timedelta(seconds=max_runtime),
        catchup_window=timedelta(seconds=catchup),
    )


class Events:
    """A RunEvents that remembers what happened."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, str]] = []
        self.skipped: Counter[tuple[str, str]] = Counter()

    def run_finished(
        self, job: str, status: str, duration_s: float, counts: Mapping[str, int]
    ) -> None:
        self.finished.append((job, status))

    def tick_skipped(self, job: str, reason: str) -> None:
        self.skipped[(job, reason)] += 1


async def runner_on(
    dsn: str,
    jobs: list[JobSpec],
    *,
    tz: ZoneInfo = PARIS,
    clock: Callable[[], datetime] = utcnow,
    lease_s: float = 30.0,
    retry: RetryPolicy | None = None,
) -> tuple[Runner, Events]:
    """A runner with a pool and an instance name of its own, as a kontod process has."""
    instance = db.new_instance_name()
    pool = await db.create_pool(dsn, instance, max_size=4)
    events = Events()
    runner = Runner(
        pool, jobs, tz, instance, events=events, clock=clock, lease_s=lease_s, retry=retry
    )
    return runner, events


async def close(runner: Runner, grace_s: float = 5) -> None:
    await runner.stop(grace_s)
    await runner.pool.close()


async def add_user(
    db_: asyncpg.Pool | asyncpg.Connection,
    *,
    accounts: list[tuple[str | None, str, bool]] = (),  # type: ignore[assignment]
    assets: list[tuple[str | None, str | None, str | None]] = (),  # type: ignore[assignment]
    user_id: int | None = None,
) -> int:
    """A user with (type, balance, hidden) accounts and (type, purchase, current) assets."""
    uid: int = await db_.fetchval(
        "INSERT INTO users (id, email) VALUES (coalesce($1, nextval(pg_get_serial_sequence("
        "'users', 'id'))), 'u' || clock_timestamp()::text || random()::text) RETURNING id",
        user_id,
    )
    for typ, balance, hidden in accounts:
        await db_.execute(
            "INSERT INTO bank_accounts (user_id, name, type, balance, hidden)"
            " VALUES ($1, 'acc', $2, $3, $4)",
            uid,
            typ,
            Decimal(balance),
            hidden,
        )
    for typ, purchase, current in assets:
        await db_.execute(
            "INSERT INTO assets (user_id, name, type, purchase_price, current_value)"
            " VALUES ($1, 'asset', $2, $3, $4)",
            uid,
            typ,
            None if purchase is None else Decimal(purchase),
            None if current is None else Decimal(current),
        )
    return uid


async def snapshot_rows(db_: asyncpg.Pool, user_id: int, day: Any) -> dict[str, Decimal]:
    rows = await db_.fetch(
        "SELECT category, total_value FROM patrimoine_snapshots WHERE user_id = $1 AND date = $2",
        user_id,
        day,
    )
    return {r["category"]: r["total_value"] for r in rows}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 20, every: float = 0.05
) -> None:
    """Poll ``check`` until it holds; fail the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(every)
