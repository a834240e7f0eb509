"""refresh-stale-connections: kontod's job body at its bounded concurrency against one user at a time.

Both passes run the same code (``kontod.jobs.refresh.make_body``) against the sandbox bank with
a fixed latency per request, each on a fresh copy of the same seeded database, so the only
difference is the number of users in flight. The old job refreshed one user at a time (defect 8
on the reference page); concurrency 1 stands for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import structlog

from bench.postgres import copy_of, migrated_database, settle, with_database
from kontod import db
from kontod.job import RunContext
from kontod.jobs.refresh import make_body
from kontod.powens import PowensClient
from kontod.sandbox import (
    ACCOUNTS_PER_USER,
    TRANSACTIONS_PER_ACCOUNT,
    Sandbox,
    demo_accounts,
    token_for,
)

STALE_AFTER = timedelta(days=7)

# Sandbox users 1..M, each with the five Powens accounts the sandbox serves (never synced, no
# transaction, so all stale) and one active connection holding the user's sandbox token.
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
ANALYZE_SQL = "VACUUM ANALYZE users, bank_accounts, bank_connections, transactions"


@dataclass(frozen=True)
class RefreshPass:
    """One run of the job body at one concurrency."""

    concurrency: int
    seconds: float
    users: int
    refreshed: int
    failed: int
    accounts_updated: int
    transactions_inserted: int
    stale_after: int
    requests: int
    max_in_flight: int

    @property
    def users_per_second(self) -> float:
        return self.refreshed / self.seconds if self.seconds > 0 else float("inf")

    @property
    def complete(self) -> bool:
        """Every user refreshed: all accounts updated, every transaction imported once."""
        return (
            self.failed == 0
            and self.refreshed == self.users
            and self.accounts_updated == self.users * ACCOUNTS_PER_USER
            and self.transactions_inserted
            == self.users * ACCOUNTS_PER_USER * TRANSACTIONS_PER_ACCOUNT
            and self.stale_after == 0
        )


@dataclass(frozen=True)
class RefreshResult:
    users: int
    latency_s: float
    requests_per_user: int
    bounded: RefreshPass
    serial: RefreshPass

    @property
    def speedup(self) -> float:
        if self.bounded.seconds <= 0:
            return float("inf")
        return self.serial.seconds / self.bounded.seconds

    @property
    def ceiling(self) -> float:
        """The speed-up if only latency counted: users over the rounds of users in flight."""
        return self.users / math.ceil(self.users / self.bounded.concurrency)


Progress = Callable[[str], None]


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
    await conn.execute(ANALYZE_SQL)


async def _one_pass(
    dsn: str, base_url: str, sandbox: Sandbox, concurrency: int, users: int
) -> RefreshPass:
    sandbox.requests.clear()
    sandbox.max_in_flight = 0
    # The daemon's own pool size and HTTP session, so the pass is what production would do.
    pool = await db.create_pool(dsn, db.new_instance_name())
    try:
        async with aiohttp.ClientSession() as http:
            body = make_body(
                pool, PowensClient(http, base_url), stale_after=STALE_AFTER, concurrency=concurrency
            )
            ctx = RunContext(
                run_id=1,
                job="refresh-stale-connections",
                trigger="manual",
                scheduled_for=None,
                started_at=datetime.now(UTC),
                log=structlog.get_logger("bench.refresh"),
            )
            async with pool.acquire() as conn:
                await settle(conn)
            started = time.perf_counter()
            await body(ctx)
            seconds = time.perf_counter() - started
    finally:
        await pool.close()
    return RefreshPass(
        concurrency=concurrency,
        seconds=seconds,
        users=users,
        refreshed=ctx.counts["items_refreshed"],
        failed=ctx.counts["items_failed"],
        accounts_updated=ctx.counts["accounts_updated"],
        transactions_inserted=ctx.counts["transactions_inserted"],
        stale_after=ctx.counts["stale_accounts_after"],
        requests=sum(sandbox.requests.values()),
        max_in_flight=sandbox.max_in_flight,
    )


async def run(
    admin_dsn: str,
    users: int,
    *,
    latency: float = 0.05,
    concurrency: int = 8,
    progress: Progress = lambda _: None,
) -> RefreshResult:
    """Seed ``users`` stale sandbox users once; refresh them at ``concurrency``, then at 1."""
    sandbox = Sandbox(latency=latency)
    async with migrated_database(admin_dsn) as template, sandbox.serve() as base_url:
        progress(f"refresh: seeding {users} users with stale Powens accounts")
        conn = await asyncpg.connect(with_database(admin_dsn, template))
        try:
            await seed(conn, users)
        finally:
            await conn.close()
        passes: list[RefreshPass] = []
        for slots in (concurrency, 1):
            async with copy_of(admin_dsn, template) as name:
                progress(f"refresh: concurrency {slots}, {latency * 1000:g} ms per request")
                passes.append(
                    await _one_pass(with_database(admin_dsn, name), base_url, sandbox, slots, users)
                )
    bounded, serial = passes
    return RefreshResult(
        users=users,
        latency_s=latency,
        requests_per_user=1 + ACCOUNTS_PER_USER,
        bounded=bounded,
        serial=serial,
    )
