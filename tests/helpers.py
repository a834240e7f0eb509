"""Small builders shared by the tests: job specs, runners on their own pools, users."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from kontod import db
from kontod.demo.lite import create_webapp_konto
from kontod.jobs import (
    AUDIT,
    ESTIMATIONS,
    REFRESH,
    SNAPSHOTS,
    audit,
    estimations,
    refresh,
    snapshots,
)
from kontod.scheduler.contract import JobBody, JobExports, JobSpec, RunContext
from kontod.scheduler.retries import RetryPolicy
from kontod.scheduler.runner import Runner, RunObserver, utcnow

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

WEBAPP_SCHEMA = """
CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE NOT NULL, name text,
    created_at text DEFAULT (now()::text));
CREATE TABLE bank_accounts (id serial PRIMARY KEY,
    user_id integer NOT NULL REFERENCES users(id) ON DELETE CASCADE, company_id integer,
    provider text, provider_account_id text, name text, custom_name text,
    balance double precision DEFAULT 0, hidden integer DEFAULT 0, last_sync text,
    type text DEFAULT 'checking',
    usage text DEFAULT 'personal', subtype text, currency text DEFAULT 'EUR');
CREATE TABLE assets (id serial PRIMARY KEY,
    user_id integer NOT NULL REFERENCES users(id) ON DELETE CASCADE, type text, name text,
    purchase_price double precision, current_value double precision, address text);
CREATE TABLE bank_connections (id serial PRIMARY KEY,
    user_id integer NOT NULL REFERENCES users(id) ON DELETE CASCADE, company_id integer,
    powens_connection_id text, powens_token text NOT NULL, powens_refresh_token text,
    status text DEFAULT 'pending', last_sync text);
CREATE TABLE transactions (id serial PRIMARY KEY,
    bank_account_id integer NOT NULL REFERENCES bank_accounts(id) ON DELETE CASCADE,
    date text, amount double precision, label text, category text, tx_hash text,
    UNIQUE (bank_account_id, tx_hash));
CREATE TABLE patrimoine_snapshots (id serial PRIMARY KEY, date text NOT NULL,
    user_id integer NOT NULL REFERENCES users(id) ON DELETE CASCADE, category text NOT NULL,
    total_value double precision NOT NULL, created_at text DEFAULT (now()::text),
    UNIQUE (date, user_id, category));
CREATE TABLE holding_snapshots (id serial PRIMARY KEY, date text NOT NULL,
    user_id integer NOT NULL REFERENCES users(id) ON DELETE CASCADE, holding_key text NOT NULL,
    kind text NOT NULL, ref_id integer, name text, type text, value double precision NOT NULL,
    UNIQUE (date, user_id, holding_key));
"""
"""Konto's tables exactly as its web app creates them: text dates, float money, 0/1 flags."""

SCHEMA_SQL = """
SELECT c.table_name::text, c.column_name::text, c.data_type::text, c.column_default::text,
       c.is_nullable::text
  FROM information_schema.columns c
 WHERE c.table_schema = 'public' AND c.table_name = ANY($1::text[])
 ORDER BY 1, 2
"""
INDEXES_SQL = """
SELECT tablename::text, indexname::text, indexdef::text FROM pg_indexes
 WHERE schemaname = 'public' AND tablename = ANY($1::text[]) ORDER BY 1, 2
"""
CONSTRAINTS_SQL = """
SELECT c.conrelid::regclass::text, c.conname::text, c.contype::text,
       pg_get_constraintdef(c.oid)::text
  FROM pg_constraint c
 WHERE c.conrelid = ANY(SELECT to_regclass(t)::oid FROM unnest($1::text[]) t)
 ORDER BY 1, 2
"""
TRIGGERS_SQL = """
SELECT t.tgrelid::regclass::text, t.tgname::text, pg_get_triggerdef(t.oid)::text,
       t.tgenabled::text
  FROM pg_trigger t
 WHERE NOT t.tgisinternal
   AND t.tgrelid = ANY(SELECT to_regclass(n)::oid FROM unnest($1::text[]) n)
 ORDER BY 1, 2
"""
KONTO_TABLES = [
    "users",
    "bank_accounts",
    "assets",
    "bank_connections",
    "transactions",
    "patrimoine_snapshots",
    "holding_snapshots",
]


async def konto_schema_of(db_: asyncpg.Pool | asyncpg.Connection) -> list[tuple[str, ...]]:
    """Every column (type, default, nullability), index, constraint (check, foreign key,
    unique, primary key, not null) and trigger of Konto's tables, each row led by its table."""
    columns = [tuple(r) for r in await db_.fetch(SCHEMA_SQL, KONTO_TABLES)]
    indexes = [tuple(r) for r in await db_.fetch(INDEXES_SQL, KONTO_TABLES)]
    constraints = [
        (r[0], "constraint", *r[1:]) for r in await db_.fetch(CONSTRAINTS_SQL, KONTO_TABLES)
    ]
    triggers = [(r[0], "trigger", *r[1:]) for r in await db_.fetch(TRIGGERS_SQL, KONTO_TABLES)]
    return columns + indexes + constraints + triggers


def quiet_schedule(now: datetime | None = None) -> str:
    """A yearly cron whose ticks are about six months from ``now`` either way.

    Its newest tick is far outside any catch-up window and its next one far ahead, in any zone
    and at any time of day: a daemon following it runs only what the test asks for.
    """
    now = utcnow() if now is None else now
    month = (now.month + 5) % 12 + 1
    return f"0 12 15 {month} *"


# What the real jobs declare, by name (see spec).
REAL_EXPORTS = {
    SNAPSHOTS: snapshots.EXPORTS,
    REFRESH: refresh.EXPORTS,
    ESTIMATIONS: estimations.EXPORTS,
    AUDIT: audit.EXPORTS,
}
# The DVF base URL of every test that gives none of its own: a loopback port nothing listens
# on, so that no test can reach the public files (tests/conftest.py sets it for subprocesses).
UNREACHABLE_DVF_URL = "http://127.0.0.1:9/geo-dvf/latest/csv"


def spec(
    name: str = "test-job",
    body: JobBody | None = None,
    *,
    schedule: str = "0 2 * * *",
    grace: float = 3600,
    max_runtime: float = 60,
    catchup: float = 20 * 3600,
    exports: JobExports | None = None,
) -> JobSpec:
    """A job spec for tests; one named like a real job declares what that job declares, as
    the platform knows the real jobs only by their declarations."""

    async def nothing(ctx: RunContext) -> None:
        ctx.counts["items_done"] += 1

    return JobSpec(
        name=name,
        schedule=schedule,
        body=body or nothing,
        grace=timedelta(seconds=grace),
        max_runtime=timedelta(seconds=max_runtime),
        catchup_window=timedelta(seconds=catchup),
        exports=exports if exports is not None else REAL_EXPORTS.get(name, JobExports()),
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
    observers: Sequence[RunObserver] = (),
) -> tuple[Runner, Events]:
    """A runner with a pool and an instance name of its own, as a kontod process has."""
    instance = db.new_instance_name()
    pool = await db.create_pool(dsn, instance, max_size=4)
    events = Events()
    runner = Runner(
        pool,
        jobs,
        tz,
        instance,
        events=events,
        clock=clock,
        lease_s=lease_s,
        retry=retry,
        observers=observers,
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


def webapp_konto(path: Path) -> Path:
    """A Konto SQLite file at ``path`` made with the web app's own table definitions, empty."""
    return create_webapp_konto(path)
