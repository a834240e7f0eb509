"""The refresh job on a Konto in the web app's SQLite database, against the PostgreSQL path.

The same Konto data goes into a SQLite file made with the web app's own table definitions and
into a PostgreSQL database with the web app's column types; both paths run against the same
sandbox bank at the same instant, each under a real claim, and must leave the same rows. Each
test runs on both engines: the file itself, and the file behind a libSQL server (the Hrana
sandbox).
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import structlog
from structlog.testing import capture_logs

from kontod import db
from kontod.demo.sandbox import DemoTransaction, demo_accounts, demo_transactions, token_for
from kontod.jobs import REFRESH, refresh_lite
from kontod.jobs.refresh import make_body
from kontod.jobs.refresh_lite import read_time
from kontod.konto import lite_schema, tokens
from kontod.konto.schema import iso_text
from kontod.konto.store import Fence, KontoSql
from kontod.scheduler import runs
from kontod.scheduler.contract import ClaimLost, Connection, JobBody, RunContext
from tests.helpers import WEBAPP_SCHEMA, webapp_konto
from tests.konto_engines import ENGINES, konto_on
from tests.sandbox_helpers import Bank, fast_client, powens_user

KEY = bytes.fromhex("5f" * 16 + "a3" * 16)
INSTANCE = "test-refresh-lite"
DAY = timedelta(days=1)
WEEK = 7 * DAY
KONTO_TABLES = ("users", "companies", "bank_accounts", "bank_connections", "transactions")


@dataclass
class Konto:
    """Konto's SQLite file, kontod's engine on it, and kontod's own PostgreSQL beside."""

    path: Path
    db: KontoSql
    pool: asyncpg.Pool


@pytest.fixture(params=ENGINES)
async def konto(
    request: pytest.FixtureRequest, tmp_path: Path, pool: asyncpg.Pool
) -> AsyncIterator[Konto]:
    """Konto's file through each engine in turn: the file itself, and behind a libSQL server."""
    path = webapp_konto(tmp_path / "konto.db")
    async with konto_on(str(request.param), path) as engine:
        await lite_schema.create_missing(engine)
        yield Konto(path, engine, pool)


@pytest.fixture
async def webapp_pool(empty_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """PostgreSQL with Konto's tables as the web app's types make them, and kontod's beside."""
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(WEBAPP_SCHEMA)
        # As in the web app's SQLite tables, where user_id came later by ALTER TABLE.
        await conn.execute("ALTER TABLE bank_accounts ALTER COLUMN user_id DROP NOT NULL")
        await db.migrate(conn)
    finally:
        await conn.close()
    created = await asyncpg.create_pool(empty_dsn, min_size=1, max_size=4)
    assert created is not None
    try:
        yield created
    finally:
        await created.close()


# The Konto both paths start from: table -> (columns, rows). Ids are given so that both
# databases number them alike; transactions get theirs from each database.
Seed = dict[str, tuple[tuple[str, ...], list[tuple[object, ...]]]]


def seed_data(now: datetime) -> Seed:
    """Six users: 1 (encrypted token; two rows the web app imported, one of them changed at
    the bank since), 2 (plaintext token, never synced, a company account), 3 (a token Powens
    rejects), 4 (fresh: SQLite's own time format), 5 (the bank needs the user; one account's
    last_sync unreadable), 6 (no active connection); and an account with no user. Each of
    user 4's accounts holds its first transaction (an account without any is stale)."""
    accounts: list[tuple[object, ...]] = []
    for user in (1, 2, 3, 4, 5, 6):
        for n, a in enumerate(demo_accounts(user)):
            last_sync: object = "2026-01-01T00:00:00.000Z"
            if user == 2:
                last_sync = None
            if user == 4:
                last_sync = (now - timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")
            if user == 5 and n == 0:
                last_sync = "not a time"
            company = 1 if user == 2 and n == 4 else None
            accounts.append((a.id, user, company, "powens", str(a.id), a.name, 0.1, last_sync))
    accounts.append((9001, None, None, "powens", "9001", "from before users", 0.1, None))
    first, second, *_ = demo_transactions(1)
    return {
        "users": (("id", "email"), [(u, f"u{u}@example.org") for u in (1, 2, 3, 4, 5, 6)]),
        "companies": (("id", "user_id", "name"), [(1, 2, "Acme SARL")]),
        "bank_accounts": (
            (
                "id",
                "user_id",
                "company_id",
                "provider",
                "provider_account_id",
                "name",
                "balance",
                "last_sync",
            ),
            accounts,
        ),
        "bank_connections": (
            ("id", "user_id", "powens_connection_id", "powens_token", "status"),
            [
                (1, 1, "1", tokens.encrypt(token_for(1), KEY), "active"),
                (2, 2, "2", token_for(2), "active"),
                (3, 3, "3", "revoked-token-of-user-3", "active"),
                (4, 4, "4", token_for(4), "active"),
                (5, 5, "5", token_for(5), "active"),
                (7, 6, "6", token_for(6), "inactive"),
            ],
        ),
        "transactions": (
            ("bank_account_id", "date", "amount", "label", "category", "tx_hash"),
            [
                # The bank renamed this one since the web app imported it: updated, not doubled.
                (1, first.date.isoformat(), float(first.value), "OLD LABEL", None,
                 f"powens_{first.id}"),
                # This one is as the bank has it: left alone.
                (1, second.date.isoformat(), float(second.value), second.wording,
                 None, f"powens_{second.id}"),
                *[(a.id, t.date.isoformat(), float(t.value), t.wording, None,
                   f"powens_{t.id}") for a in demo_accounts(4) for t in demo_transactions(a.id)[:1]],
            ],
        ),
    }  # fmt: skip


def seed_sqlite(path: Path, seed: Seed) -> None:
    with sqlite3.connect(path) as conn:
        for table, (columns, rows) in seed.items():
            marks = ", ".join("?" for _ in columns)
            conn.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                rows,
            )
    conn.close()


async def seed_postgres(pool: asyncpg.Pool, seed: Seed) -> None:
    for table, (columns, rows) in seed.items():
        if table == "companies":
            continue  # the web app's PostgreSQL tables keep company_id without the table
        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        await pool.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
            rows,
        )


async def claimed(pool: asyncpg.Pool, at: datetime) -> RunContext:
    """A run context holding a real claim in ``pool``'s run table, fenced as the runner does."""
    run_id = await runs.claim(pool, REFRESH, "manual", None, 1, INSTANCE, 60)
    assert run_id is not None
    ctx = RunContext(
        run_id=run_id,
        job=REFRESH,
        trigger="manual",
        scheduled_for=None,
        started_at=at,
        log=structlog.get_logger().bind(job=REFRESH, run_id=run_id),
    )

    async def fence(conn: Connection) -> None:
        if not await runs.fence(conn, run_id, INSTANCE, 60_000, 20_000):
            raise ClaimLost(f"run {run_id} no longer holds its lease")

    ctx.fence = fence
    return ctx


async def run_claimed(pool: asyncpg.Pool, body: JobBody, at: datetime) -> RunContext:
    """One run under a claim, finished in the run table like the runner does."""
    ctx = await claimed(pool, at)
    try:
        await body(ctx)
    finally:
        await runs.finish(pool, ctx.run_id, INSTANCE, "success", None, ctx.counts)
    return ctx


def lite_body(
    k: Konto, bank: Bank, http: aiohttp.ClientSession, stale_after: timedelta = WEEK
) -> JobBody:
    return make_body(
        k.pool,
        fast_client(http, bank.url),
        stale_after=stale_after,
        concurrency=2,
        key=KEY,
        konto=k.db,
    )


def pg_body(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession, stale_after: timedelta = WEEK
) -> JobBody:
    return make_body(
        pool, fast_client(http, bank.url), stale_after=stale_after, concurrency=2, key=KEY
    )


ACCOUNTS_SQL = """SELECT id, balance, last_sync, type, usage, subtype, currency
                    FROM bank_accounts ORDER BY id"""
TRANSACTIONS_SQL = """SELECT bank_account_id, tx_hash, date, amount, label, category
                        FROM transactions ORDER BY bank_account_id, tx_hash NULLS FIRST"""


def sqlite_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        rows = [tuple(r) for r in conn.execute(sql)]
    conn.close()
    return rows


async def pg_rows(pool: asyncpg.Pool, sql: str) -> list[tuple[object, ...]]:
    return [tuple(r) for r in await pool.fetch(sql)]


async def kontod_rows(pool: asyncpg.Pool) -> list[list[tuple[object, ...]]]:
    """kontod's own records of connections and accounts (PostgreSQL in both set-ups); the
    sandbox numbers its answers, so a quoted request id is left out."""
    connections = [
        tuple(re.sub(r"request_id \d+", "request_id n", v) if isinstance(v, str) else v for v in r)
        for r in await pg_rows(pool, "SELECT * FROM kontod_connections ORDER BY connection_id")
    ]
    return [
        connections,
        await pg_rows(pool, "SELECT * FROM kontod_accounts ORDER BY bank_account_id"),
    ]


def table_info(path: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(path) as conn:
        info = {
            t: [tuple(r) for r in conn.execute(f"PRAGMA table_info({t})")] for t in KONTO_TABLES
        }
        info["indexes"] = [tuple(r) for r in conn.execute("SELECT * FROM sqlite_schema")]
    conn.close()
    return info


@pytest.mark.parametrize("chunk", [refresh_lite.READ_CHUNK, 7])
async def test_both_engines_refresh_to_the_same_rows_and_counts(
    konto: Konto,
    webapp_pool: asyncpg.Pool,
    bank: Bank,
    http: aiohttp.ClientSession,
    chunk: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Scans of a few rows a read, to go through the chunked reads of a large Konto too.
    monkeypatch.setattr(refresh_lite, "READ_CHUNK", chunk)
    now = datetime.now(UTC)
    seed = seed_data(now)
    seed_sqlite(konto.path, seed)
    await seed_postgres(webapp_pool, seed)
    old = now.replace(microsecond=0) - 30 * DAY  # Powens' times are to the second
    powens_user(bank, 5).connections[0].state = "SCARequired"
    for account in powens_user(bank, 5).accounts:
        account.last_update = old  # still stale: the bank needs the user
    powens_user(bank, 1).account(5).last_update = old  # bank data old
    powens_user(bank, 2).account(1002).last_update = None  # never synced at all
    # Gone at the bank: kontod remembers it, and the account is no longer stale.
    powens_user(bank, 2).account(1003).deleted = now - timedelta(days=3)
    powens_user(bank, 1).account(4).disabled = now - timedelta(days=3)
    schema_before = table_info(konto.path)

    lite = await run_claimed(konto.pool, lite_body(konto, bank, http), now)
    pg = await run_claimed(webapp_pool, pg_body(webapp_pool, bank, http), now)

    assert dict(lite.counts) == dict(pg.counts)
    counts = lite.counts
    assert (counts["users"], counts["items_refreshed"], counts["items_failed"]) == (6, 3, 1)
    assert counts["items_skipped"] == 2  # user 6, and the account with no user
    assert (counts["accounts_deleted"], counts["accounts_disabled"]) == (1, 1)
    # Users 1, 2, 5, less the web app's two and the two accounts gone at the bank.
    assert counts["transactions_inserted"] == 3 * 3 * 5 - 2 - 2 * 3
    assert counts["transactions_updated"] == 1
    assert counts["connections_needing_user"] == 1
    assert counts["connections_state.token_rejected"] == 1
    assert {k: n for k, n in counts.items() if k.startswith("stale_accounts_after.")} == {
        "stale_accounts_after.token_rejected": 5,
        "stale_accounts_after.no_connection": 6,
        "stale_accounts_after.needs_user": 5,
        "stale_accounts_after.bank_data_old": 1,
        "stale_accounts_after.never_synced": 1,
        "stale_accounts_after.provider_error": 0,
        "stale_accounts_after.no_transactions": 0,
    }
    # Konto's rows: the same values, each of its column's own type, to the last bit.
    lite_accounts = sqlite_rows(konto.path, ACCOUNTS_SQL)
    assert lite_accounts == await pg_rows(webapp_pool, ACCOUNTS_SQL)
    lite_txs = sqlite_rows(konto.path, TRANSACTIONS_SQL)
    assert lite_txs == await pg_rows(webapp_pool, TRANSACTIONS_SQL)
    assert await kontod_rows(konto.pool) == await kontod_rows(webapp_pool)
    # What those rows are: the bank's balances as floats; last_sync the time of kontod's fetch,
    # as the web app writes it (JavaScript's toISOString, in its text column).
    user_1 = {a.id: a for a in demo_accounts(1) if a.id != 4}  # 4: disabled, left as it was
    assert [(r[1], r[2]) for r in lite_accounts if r[0] in user_1] == [
        (float(a.balance), iso_text(now)) for a in user_1.values()
    ]
    # The bank data's own time is kontod's: in kontod_accounts, and account 5 stays stale by it.
    bank_times = {
        r["bank_account_id"]: r["powens_last_update"]
        for r in await konto.pool.fetch("SELECT * FROM kontod_accounts")
    }
    assert [bank_times[a] for a in user_1] == [
        bank.sandbox.synced_at if a != 5 else old for a in user_1
    ]
    assert [r[1:3] for r in lite_accounts if r[0] == 4] == [(0.1, "2026-01-01T00:00:00.000Z")]
    assert [r[3:6] for r in lite_accounts if r[0] in {a.id for a in demo_accounts(2)}][-1] == (
        "checking",
        "professional",
        None,
    )
    first = demo_transactions(1)[0]
    assert [r for r in lite_txs if r[1] == f"powens_{first.id}"] == [
        (1, f"powens_{first.id}", first.date.isoformat(), float(first.value), first.wording,
         None)
    ]  # fmt: skip
    # The web app's rules for the same Powens answer: usage by the company alone (Powens' ORGA
    # ignored), no category (category.name, which Powens does not send).
    assert [r[4] for r in lite_accounts if r[0] == demo_accounts(1)[4].id] == ["personal"]
    assert {r[5] for r in lite_txs} == {None}
    assert table_info(konto.path) == schema_before

    # Everything is stale an hour later: nothing new at the bank, nothing written twice; only
    # user 4, fresh until now, has transactions to import (all but the five it holds).
    later = now + timedelta(hours=1)
    lite_2 = await run_claimed(konto.pool, lite_body(konto, bank, http, timedelta(0)), later)
    pg_2 = await run_claimed(webapp_pool, pg_body(webapp_pool, bank, http, timedelta(0)), later)
    assert dict(lite_2.counts) == dict(pg_2.counts)
    assert (lite_2.counts["transactions_inserted"], lite_2.counts["transactions_updated"]) == (
        10,
        0,
    )
    user_4 = {a.id for a in demo_accounts(4)}
    assert [r for r in sqlite_rows(konto.path, TRANSACTIONS_SQL) if r[0] not in user_4] == [
        r for r in lite_txs if r[0] not in user_4
    ]
    assert sqlite_rows(konto.path, TRANSACTIONS_SQL) == await pg_rows(webapp_pool, TRANSACTIONS_SQL)
    assert sqlite_rows(konto.path, ACCOUNTS_SQL) == await pg_rows(webapp_pool, ACCOUNTS_SQL)
    assert await kontod_rows(konto.pool) == await kontod_rows(webapp_pool)
    assert table_info(konto.path) == schema_before


async def test_transactions_without_a_date_or_an_amount_are_skipped_on_both_engines(
    konto: Konto, webapp_pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    now = datetime.now(UTC)
    seed = seed_data(now)
    seed_sqlite(konto.path, seed)
    await seed_postgres(webapp_pool, seed)
    undated, unvalued, whole = powens_user(bank, 2).transactions[1001]
    undated.date, unvalued.value = None, None

    lite = await run_claimed(konto.pool, lite_body(konto, bank, http), now)
    pg = await run_claimed(webapp_pool, pg_body(webapp_pool, bank, http), now)

    assert dict(lite.counts) == dict(pg.counts)
    assert lite.counts["transactions_incomplete_skipped"] == 2
    # User 2's write went through (Konto's NOT NULL columns would have refused all of it).
    hashes = "SELECT tx_hash FROM transactions WHERE bank_account_id = 1001"
    assert sqlite_rows(konto.path, hashes) == [(f"powens_{whole.id}",)]
    assert sqlite_rows(konto.path, TRANSACTIONS_SQL) == await pg_rows(webapp_pool, TRANSACTIONS_SQL)
    for pool in (konto.pool, webapp_pool):
        row = await pool.fetchrow("SELECT * FROM kontod_connections WHERE connection_id = 2")
        assert row is not None and row["error_kind"] is None


async def test_a_just_linked_account_without_transactions_is_filled_at_the_next_run(
    konto: Konto, webapp_pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    # As the web app's bank callback leaves them: last_sync = now, no transaction.
    now = datetime.now(UTC)
    seed = seed_data(now)
    just_now = iso_text(now - timedelta(minutes=1))
    seed["bank_accounts"] = (
        seed["bank_accounts"][0],
        [(*a[:7], just_now) for a in seed["bank_accounts"][1] if a[1] == 4],
    )
    seed["transactions"] = (seed["transactions"][0], [])
    seed_sqlite(konto.path, seed)
    await seed_postgres(webapp_pool, seed)
    empty = demo_accounts(4)[2].id
    powens_user(bank, 4).transactions[empty] = []  # none at the bank either

    lite = await run_claimed(konto.pool, lite_body(konto, bank, http), now)
    pg = await run_claimed(webapp_pool, pg_body(webapp_pool, bank, http), now)

    assert dict(lite.counts) == dict(pg.counts)
    assert (lite.counts["users"], lite.counts["stale_accounts"]) == (1, 5)
    assert lite.counts["transactions_inserted"] == 4 * 3
    assert sqlite_rows(konto.path, TRANSACTIONS_SQL) == await pg_rows(webapp_pool, TRANSACTIONS_SQL)
    # The account the bank has no transaction for stays stale, and says why.
    assert lite.counts["stale_accounts_after"] == 1
    assert lite.counts["stale_accounts_after.no_transactions"] == 1


async def test_rows_the_old_web_app_job_imported_are_adopted_not_doubled(
    konto: Konto, webapp_pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    now = datetime.now(UTC)
    seed = seed_data(now)
    columns, _ = seed["transactions"]
    txs = powens_user(bank, 1).transactions
    # Account 2: two Powens transactions alike, three rows alike (the old job's doubles).
    twin = txs[2][1]
    twin.date, twin.value, twin.wording = txs[2][0].date, txs[2][0].value, txs[2][0].wording
    # Account 3: a transaction Powens gives without an id.
    txs[3][2].id = None
    nameless = demo_transactions(3)[2]

    # As the web app's refresh job imported them: no tx_hash, no category.
    def old_row(t: DemoTransaction) -> tuple[object, ...]:
        return (t.account_id, t.date.isoformat(), float(t.value), t.wording, None, None)

    first, alike = demo_transactions(1)[:2], demo_transactions(2)[0]
    old = [old_row(t) for t in first] + [old_row(alike)] * 3 + [old_row(nameless)]
    seed["transactions"] = (columns, old)
    seed_sqlite(konto.path, seed)
    await seed_postgres(webapp_pool, seed)

    lite = await run_claimed(konto.pool, lite_body(konto, bank, http), now)
    pg = await run_claimed(webapp_pool, pg_body(webapp_pool, bank, http), now)

    assert dict(lite.counts) == dict(pg.counts)
    # Two of account 1, two of the three alike (two Powens transactions), the id-less one.
    assert lite.counts["transactions_adopted"] == 2 + 2 + 1
    rows = sqlite_rows(konto.path, TRANSACTIONS_SQL)
    assert rows == await pg_rows(webapp_pool, TRANSACTIONS_SQL)
    per_account = Counter(r[0] for r in rows if r[0] in (1, 2, 3))
    assert per_account == {1: 3, 2: 3 + 1, 3: 3}  # the old job's third double stays
    assert [r for r in rows if r[1] is None] == [(2, None, *old_row(alike)[1:4], None)]
    # The web app's key for a transaction without an id (the value as JavaScript prints it).
    value = format(nameless.value, "f").rstrip("0").rstrip(".")
    fallback = f"3|{nameless.date.isoformat()}|{value}|{nameless.wording.strip()}"
    expected = "powens_f_" + hashlib.sha256(fallback.encode()).hexdigest()[:20]
    assert [r[1] for r in rows if r[0] == 3 and r[2] == nameless.date.isoformat()] == [expected]

    # The bank's data moves: every transaction is asked again, and none is inserted.
    later = now + timedelta(hours=1)
    for account in powens_user(bank, 1).accounts:
        account.last_update = later.replace(microsecond=0)
    lite_2 = await run_claimed(konto.pool, lite_body(konto, bank, http, timedelta(0)), later)
    pg_2 = await run_claimed(webapp_pool, pg_body(webapp_pool, bank, http, timedelta(0)), later)
    assert dict(lite_2.counts) == dict(pg_2.counts)
    assert bank.sandbox.requests_by_endpoint_token[("transactions", token_for(1))] == 4 * 5
    assert (lite_2.counts["transactions_inserted"], lite_2.counts["transactions_adopted"]) == (0, 0)
    assert sqlite_rows(konto.path, TRANSACTIONS_SQL) == rows


async def test_a_refused_write_fails_its_connection_alone(
    konto: Konto, bank: Bank, http: aiohttp.ClientSession
) -> None:
    now = datetime.now(UTC)
    seed = seed_data(now)
    columns, rows = seed["transactions"]
    seed["transactions"] = (columns, [r for r in rows if r[0] != 1])  # user 4's kept: fresh
    seed_sqlite(konto.path, seed)
    # User 1 has a second bank, seen through user 2's Powens data and token.
    with sqlite3.connect(konto.path) as conn:
        conn.execute("UPDATE bank_connections SET status = 'inactive' WHERE user_id = 2")
        conn.execute(
            """INSERT INTO bank_connections (id, user_id, powens_connection_id, powens_token,
                                             status) VALUES (6, 1, '2', ?, 'active')""",
            (token_for(2),),
        )
        conn.execute("UPDATE bank_accounts SET user_id = 1, name = 'other bank' WHERE user_id = 2")
    conn.close()

    async def web_app_deletes_an_account(token: str, endpoint: str) -> None:
        # The web app deletes an account of the second bank while kontod reads it: its
        # transactions now point at nothing, and SQLite refuses them (foreign keys are on).
        if token == token_for(2) and endpoint == "transactions":
            with sqlite3.connect(konto.path) as web_app:
                web_app.execute("DELETE FROM bank_accounts WHERE id = 1001")
            web_app.close()

    bank.sandbox.on_request = web_app_deletes_an_account
    with capture_logs() as logs:
        ctx = await run_claimed(konto.pool, lite_body(konto, bank, http), now)

    assert (ctx.counts["items_refreshed"], ctx.counts["items_failed"]) == (1, 2)
    assert ctx.counts["connections_failed"] == 2  # user 3's rejected token, the refused part
    balances = {
        r[0]: r[1] for r in sqlite_rows(konto.path, "SELECT id, balance FROM bank_accounts")
    }
    assert [balances[a.id] for a in demo_accounts(1)] == [
        float(a.balance) for a in demo_accounts(1)
    ]
    assert {balances[a.id] for a in demo_accounts(2) if a.id != 1001} == {0.1}
    assert sqlite_rows(
        konto.path, "SELECT count(*) FROM transactions WHERE bank_account_id BETWEEN 1001 AND 1005"
    ) == [(0,)]
    assert ctx.counts["transactions_inserted"] == 15 + 15  # user 1's first bank, user 5
    [failed] = [e for e in logs if e["event"] == "refresh.connection_write_failed"]
    assert (failed["connection_id"], failed["kind"]) == (6, "database")
    row = await konto.pool.fetchrow("SELECT * FROM kontod_connections WHERE connection_id = 6")
    assert row is not None and row["error_kind"] == "database"
    assert "FOREIGN KEY" in row["error"]
    ok = await konto.pool.fetchrow("SELECT * FROM kontod_connections WHERE connection_id = 1")
    assert ok is not None and ok["error_kind"] is None
    # kontod remembers the accounts of the part that was written, not those of the refused one.
    kept = {r[0] for r in await pg_rows(konto.pool, "SELECT * FROM kontod_accounts")}
    assert kept == {a.id for u in (1, 5) for a in demo_accounts(u)}


async def test_bank_data_written_but_not_recorded_is_not_doubled_by_the_next_run(
    konto: Konto, bank: Bank, http: aiohttp.ClientSession
) -> None:
    # As if kontod died between a user's Konto transaction and its PostgreSQL record: the
    # record of user 2's connection is refused, so nothing of user 2 is recorded.
    now = datetime.now(UTC)
    seed = seed_data(now)
    seed["bank_connections"] = (seed["bank_connections"][0], seed["bank_connections"][1][:2])
    seed_sqlite(konto.path, seed)
    await konto.pool.execute(
        "ALTER TABLE kontod_connections ADD CONSTRAINT lost CHECK (connection_id <> 2)"
    )
    user_2 = {a.id for a in demo_accounts(2)}
    count_2 = "SELECT count(*) FROM transactions WHERE bank_account_id BETWEEN 1001 AND 1005"

    with capture_logs() as logs:
        first = await run_claimed(konto.pool, lite_body(konto, bank, http), now)

    assert (first.counts["items_refreshed"], first.counts["items_failed"]) == (1, 1)
    assert sqlite_rows(konto.path, count_2) == [(15,)]
    [lost] = [e for e in logs if e["event"] == "refresh.record_failed"]
    assert lost["user_id"] == 2 and "lost" in lost["error"]
    kept = {r[0] for r in await pg_rows(konto.pool, "SELECT bank_account_id FROM kontod_accounts")}
    assert not kept & user_2

    await konto.pool.execute("ALTER TABLE kontod_connections DROP CONSTRAINT lost")
    second = await run_claimed(
        konto.pool, lite_body(konto, bank, http, timedelta(0)), now + timedelta(hours=1)
    )

    assert (second.counts["items_refreshed"], second.counts["items_failed"]) == (2, 0)
    assert (second.counts["transactions_inserted"], second.counts["transactions_updated"]) == (
        0,
        0,
    )
    assert bank.sandbox.requests_by_endpoint_token[("transactions", token_for(2))] == 10
    assert sqlite_rows(konto.path, count_2) == [(15,)]
    kept = {r[0] for r in await pg_rows(konto.pool, "SELECT bank_account_id FROM kontod_accounts")}
    assert user_2 <= kept


async def test_a_takeover_mid_run_stops_the_older_run_before_its_next_write(
    konto: Konto, bank: Bank, http: aiohttp.ClientSession
) -> None:
    now = datetime.now(UTC)
    seed_sqlite(konto.path, seed_data(now))
    ctx = await claimed(konto.pool, now)

    async def newer_run_takes_over(token: str, endpoint: str) -> None:
        await konto.db.advance_fence(Fence(REFRESH, ctx.run_id + 1))

    bank.sandbox.on_request = newer_run_takes_over
    body = make_body(
        konto.pool,
        fast_client(http, bank.url),
        stale_after=WEEK,
        concurrency=1,
        key=KEY,
        konto=konto.db,
    )
    with pytest.raises(ClaimLost, match="a newer run took the job over"):
        await body(ctx)

    assert sqlite_rows(konto.path, "SELECT count(*) FROM transactions") == [(2 + 5,)]  # seeded
    assert {r[0] for r in sqlite_rows(konto.path, "SELECT balance FROM bank_accounts")} == {0.1}
    assert await konto.pool.fetchval("SELECT count(*) FROM kontod_accounts") == 0


async def test_a_key_that_opens_no_stored_token_fails_the_run(
    konto: Konto, bank: Bank, http: aiohttp.ClientSession
) -> None:
    seed_sqlite(konto.path, seed_data(datetime.now(UTC)))
    rows = await konto.db.read(tokens.LITE_KEY_SAMPLE_SQL, (tokens.KEY_CHECK_SAMPLE,))
    assert tokens.check_key_rows([str(r[0]) for r in rows], KEY) == 1
    body = make_body(
        konto.pool,
        fast_client(http, bank.url),
        stale_after=WEEK,
        concurrency=1,
        key=bytes(32),
        konto=konto.db,
    )
    with pytest.raises(tokens.WrongKey, match="none of the 1 stored bank tokens"):
        await run_claimed(konto.pool, body, datetime.now(UTC))
    assert bank.sandbox.requests_by_token == {}


TIME_TEXTS = [
    "2026-11-30T08:15:00.123Z",  # the web app's toISOString
    "2026-11-30 08:15:00",  # SQLite's datetime('now')
    "2026-11-30",
    "  2026-11-30T08:15:00Z  ",
    "2026-11-30t08:15:00z",
    "2026-11-30T08:15",
    "2026-11-30T08:15:00+02:00",
    "2026-11-30T08:15:00-0530",
    "2026-11-30T08:15:00+02",
    "2026-11-30 08:15:00 +01:00",
    "2026-11-30T08:15:00.1234565Z",
    "2026-11-30T08:15:59.9999996Z",
    "infinity",
    "-Infinity",
    "epoch",
    "2026-02-30",
    "2026-11-30T25:00:00",
    "2026-11-30x08:15",
    "2026-W49-1",
    "",
    "   ",
    "yesterday-ish",
    "30/11/2026",
]


async def test_konto_text_times_read_as_on_postgresql_or_not_at_all(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("SET TimeZone = 'UTC'")
        pg = [
            r["t"]
            for r in await conn.fetch(
                "SELECT kontod_try_timestamptz(t)::text AS t FROM unnest($1::text[]) t",
                TIME_TEXTS,
            )
        ]
        mine = []
        for text in TIME_TEXTS:
            value = read_time(text)
            mine.append(
                None
                if value is None
                else await conn.fetchval("SELECT $1::timestamptz::text", value)
                if value.year not in (1, 9999)
                else {1: "-infinity", 9999: "infinity"}[value.year]
            )
    # Never a time PostgreSQL would not read, or reads otherwise; the web app's forms read.
    assert [m for m, p in zip(mine, pg, strict=True) if m is not None and m != p] == []
    assert all(m is not None for m in mine[:12]), json.dumps(
        dict(zip(TIME_TEXTS, mine, strict=False))
    )
