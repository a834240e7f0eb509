"""The refresh job against the real PostgreSQL of the suite and the sandbox bank over loopback."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import aiohttp
import asyncpg
import pytest
import structlog
from structlog.testing import capture_logs

from kontod import db
from kontod.config import Settings
from kontod.job import JobBody, RunContext
from kontod.jobs import REFRESH, declare_jobs
from kontod.jobs.refresh import RefreshFailed, make_body
from kontod.powens import PowensClient
from kontod.sandbox import Fault, Sandbox, demo_accounts, demo_transactions, token_for
from tests import pg
from tests.helpers import LEGACY_TABLES
from tests.sandbox_helpers import Bank, fast_client, seed_user

WEEK = timedelta(days=7)


def new_ctx(run_id: int = 1) -> RunContext:
    """A run context as the runner builds it; make it inside capture_logs() to see its lines."""
    return RunContext(
        run_id=run_id,
        job=REFRESH,
        trigger="manual",
        scheduled_for=None,
        started_at=datetime.now(UTC),
        log=structlog.get_logger().bind(job=REFRESH, run_id=run_id),
    )


def body_for(
    pool: asyncpg.Pool, client: PowensClient, *, concurrency: int = 4, stale_after: timedelta = WEEK
) -> JobBody:
    return make_body(pool, client, stale_after=stale_after, concurrency=concurrency)


async def run(body: JobBody) -> RunContext:
    ctx = new_ctx()
    await body(ctx)
    return ctx


async def accounts_of(pool: asyncpg.Pool, user: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        """SELECT provider_account_id, balance, last_sync, type, usage, subtype
             FROM bank_accounts WHERE user_id = $1 ORDER BY provider_account_id::bigint""",
        user,
    )


async def connection(pool: asyncpg.Pool, connection_id: int | None) -> asyncpg.Record:
    row = await pool.fetchrow(
        """SELECT status, last_refresh_at, last_refresh_error, last_refresh_error_at
             FROM bank_connections WHERE id = $1""",
        connection_id,
    )
    assert row is not None
    return row


def outcomes(ctx: RunContext) -> tuple[int, int, int]:
    return ctx.counts["items_refreshed"], ctx.counts["items_failed"], ctx.counts["items_skipped"]


async def test_happy_path_updates_accounts_and_imports_transactions(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    await seed_user(pool, 2)
    before = datetime.now(UTC)

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (2, 0, 0)
    assert ctx.counts["users"] == 2
    assert ctx.counts["stale_accounts"] == 10
    assert ctx.counts["accounts_updated"] == 10
    assert ctx.counts["transactions_inserted"] == 30
    assert ctx.counts["stale_accounts_after"] == 0
    rows = await accounts_of(pool, 1)
    assert [r["balance"] for r in rows] == [a.balance for a in demo_accounts(1)]
    assert [(r["type"], r["usage"], r["subtype"]) for r in rows] == [
        ("checking", "personal", None),
        ("savings", "personal", None),
        ("investment", "personal", "stocks"),
        ("loan", "personal", None),
        ("checking", "professional", None),
    ]
    assert all(r["last_sync"] >= before - timedelta(seconds=5) for r in rows)
    txs = await pool.fetch(
        """SELECT t.provider_transaction_id, t.date, t.amount, t.label, t.category
             FROM transactions t JOIN bank_accounts a ON a.id = t.bank_account_id
            WHERE a.provider_account_id = '1' ORDER BY t.provider_transaction_id"""
    )
    assert [tuple(r) for r in txs] == [
        (str(t.id), t.date, t.value, t.wording, t.category) for t in demo_transactions(1)
    ]
    row = await connection(pool, conn_1)
    assert row["status"] == "active"
    assert row["last_refresh_at"] is not None
    assert row["last_refresh_error"] is None
    assert row["last_refresh_error_at"] is None


async def test_only_stale_accounts_bring_their_users_in(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    now = datetime.now(UTC)
    await seed_user(pool, 1, last_sync=now - timedelta(days=1), with_transactions=True)
    await seed_user(pool, 2, last_sync=now - timedelta(days=8), with_transactions=True)

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert (ctx.counts["users"], ctx.counts["stale_accounts"]) == (1, 5)
    assert outcomes(ctx) == (1, 0, 0)
    assert bank.sandbox.requests_by_token[token_for(1)] == 0
    # Accounts with transactions already are not asked for more.
    assert bank.sandbox.requests["transactions"] == 0
    assert [r["balance"] for r in await accounts_of(pool, 2)] == [
        a.balance for a in demo_accounts(2)
    ]
    assert ctx.counts["transactions_inserted"] == 0


async def test_transient_failures_are_retried_within_the_run(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    await seed_user(pool, 2)
    bank.sandbox.behave(token_for(1), Fault(status=500, times=1))
    bank.sandbox.behave(token_for(2), Fault(status=429, retry_after="0.2", times=1))

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (2, 0, 0)
    assert bank.sandbox.requests["accounts"] == 4


async def test_a_revoked_token_is_recorded_on_its_connection_and_others_go_on(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    conn_2 = await seed_user(pool, 2)
    bank.sandbox.behave(token_for(2), Fault(status=401))
    body = body_for(pool, fast_client(http, bank.url))

    ctx = await run(body)

    assert outcomes(ctx) == (1, 1, 0)
    row = await connection(pool, conn_2)
    assert row["status"] == "active"  # the web app's column, untouched
    assert "HTTP 401" in row["last_refresh_error"]
    assert "invalidToken" in row["last_refresh_error"]
    assert row["last_refresh_error_at"] is not None
    assert row["last_refresh_at"] == row["last_refresh_error_at"]
    assert all(r["last_sync"] is None for r in await accounts_of(pool, 2))
    assert ctx.counts["stale_accounts_after"] == 5

    # Once the token works again, the next run clears the recorded failure.
    bank.sandbox.behave(token_for(2))
    ctx = await run(body)
    assert outcomes(ctx) == (1, 0, 0)
    assert (await connection(pool, conn_2))["last_refresh_error"] is None


async def test_a_hang_is_cut_by_the_timeout_and_the_user_fails(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    conn_2 = await seed_user(pool, 2)
    bank.sandbox.behave(token_for(2), Fault(kind="hang"))

    ctx = await run(body_for(pool, fast_client(http, bank.url, timeout=0.3, attempts=2)))

    assert outcomes(ctx) == (1, 1, 0)
    error = (await connection(pool, conn_2))["last_refresh_error"]
    assert error == "accounts: no answer within 0.3 s after 2 attempt(s)"


async def test_a_transactions_failure_keeps_the_balances_and_fails_the_user(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    await seed_user(pool, 2)
    bank.sandbox.behave(token_for(1), Fault(status=404, endpoint="transactions"))

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 1, 0)
    assert ctx.counts["accounts_updated"] == 10
    assert [r["balance"] for r in await accounts_of(pool, 1)] == [
        a.balance for a in demo_accounts(1)
    ]
    assert (
        "transactions of account 1: HTTP 404"
        in (await connection(pool, conn_1))["last_refresh_error"]
    )


async def test_users_without_an_active_connection_are_skipped(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    pending = await seed_user(pool, 2, status="pending")
    await seed_user(pool, 3, status=None)

    with capture_logs() as logs:
        ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 0, 2)
    assert bank.sandbox.requests_by_token[token_for(2)] == 0
    assert (await connection(pool, pending))["last_refresh_at"] is None
    skipped = [e for e in logs if e["event"] == "refresh.user_skipped"]
    assert sorted(e["user_id"] for e in skipped) == [2, 3]
    assert {e["reason"] for e in skipped} == {"no_active_connection"}

    # User 1 is fresh now: a run with only skipped users has nothing failed, so it succeeds.
    ctx = await run(body_for(pool, fast_client(http, bank.url)))
    assert outcomes(ctx) == (0, 0, 2)
    assert ctx.counts["stale_accounts_after"] == 10


async def test_the_token_of_a_working_connection_is_preferred(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    good = await seed_user(pool, 1)
    bad = await pool.fetchval(
        """INSERT INTO bank_connections (user_id, powens_token, status, last_refresh_error)
           VALUES (1, 'revoked-token', 'active', 'accounts: HTTP 401') RETURNING id"""
    )

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 0, 0)
    assert bank.sandbox.requests_by_token["revoked-token"] == 0
    assert (await connection(pool, good))["last_refresh_at"] is not None
    assert (await connection(pool, bad))["last_refresh_at"] is None


async def test_a_reimport_adds_no_duplicate(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    # Latency makes both runs pick the accounts up before either inserts: they import the
    # same 15 transactions, and the unique provider id keeps one copy of each.
    bank.sandbox.behave(token_for(1), latency=0.05)
    client = fast_client(http, bank.url)
    first, second = new_ctx(1), new_ctx(2)

    await asyncio.gather(body_for(pool, client)(first), body_for(pool, client)(second))

    assert bank.sandbox.requests["transactions"] == 10
    assert first.counts["transactions_inserted"] + second.counts["transactions_inserted"] == 15
    assert await pool.fetchval("SELECT count(*) FROM transactions") == 15
    assert (
        await pool.fetchval(
            "SELECT count(DISTINCT (bank_account_id, provider_transaction_id)) FROM transactions"
        )
        == 15
    )


async def test_concurrency_bound_holds_at_the_server(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    for user in range(1, 13):
        await seed_user(
            pool, user, last_sync=datetime(2020, 1, 1, tzinfo=UTC), with_transactions=True
        )
    bank.sandbox.default.latency = 0.05

    ctx = await run(body_for(pool, fast_client(http, bank.url), concurrency=3))

    assert outcomes(ctx) == (12, 0, 0)
    assert bank.sandbox.requests["accounts"] == 12
    assert 2 <= bank.sandbox.max_in_flight <= 3

    # With a bound of one, the users go strictly one after the other.
    await pool.execute("UPDATE bank_accounts SET last_sync = NULL WHERE user_id <= 4")
    bank.sandbox.max_in_flight = 0
    ctx = await run(body_for(pool, fast_client(http, bank.url), concurrency=1))
    assert outcomes(ctx) == (4, 0, 0)
    assert bank.sandbox.max_in_flight == 1


async def test_amounts_given_as_strings_are_stored_exactly(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    bank.sandbox.behave(token_for(1), amounts_as_strings=True)

    await run(body_for(pool, fast_client(http, bank.url)))

    assert [r["balance"] for r in await accounts_of(pool, 1)] == [
        a.balance for a in demo_accounts(1)
    ]
    amounts = await pool.fetch(
        """SELECT t.amount FROM transactions t JOIN bank_accounts a ON a.id = t.bank_account_id
            WHERE a.provider_account_id = '4' ORDER BY t.provider_transaction_id"""
    )
    assert [r["amount"] for r in amounts] == [t.value for t in demo_transactions(4)]
    assert all(r["amount"].as_tuple().exponent == -2 for r in amounts)


async def test_classification_uses_the_local_company(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1, company_id=77)
    accounts = [
        {"id": 1, "name": "Compte", "balance": 1},
        {"id": 2, "name": "Livret jeune", "balance": "2.5", "usage": "ASSO"},
        {"id": 3, "name": "Assurance or investi", "type": "lifeinsurance", "usage": "PRIV"},
    ]
    bank.sandbox.behave(
        token_for(1), Fault(status=200, endpoint="accounts", body={"accounts": accounts})
    )

    await run(body_for(pool, fast_client(http, bank.url)))

    rows = await accounts_of(pool, 1)
    assert [(r["balance"], r["type"], r["usage"], r["subtype"]) for r in rows[:3]] == [
        (Decimal(1), "checking", "professional", None),
        (Decimal("2.5"), "savings", "professional", None),
        (Decimal(0), "investment", "personal", "gold"),
    ]
    assert [r["last_sync"] for r in rows[3:]] == [None, None]


async def test_failures_are_logged_with_ids_and_never_the_token(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conns = [await seed_user(pool, user) for user in (1, 2, 3, 4)]
    echo = {"code": "invalidToken", "description": f"bad token {token_for(2)}", "message": "x"}
    bank.sandbox.behave(token_for(2), Fault(status=401, body=echo))
    bank.sandbox.behave(token_for(3), Fault(kind="malformed"))
    bank.sandbox.behave(token_for(4), Fault(status=503))

    with capture_logs() as logs:
        ctx = await run(body_for(pool, fast_client(http, bank.url, attempts=2)))

    assert outcomes(ctx) == (1, 3, 0)
    failed = {e["user_id"]: e for e in logs if e["event"] == "refresh.user_failed"}
    assert sorted(failed) == [2, 3, 4]
    assert failed[2]["connection_id"] == conns[1]
    assert (failed[2]["kind"], failed[2]["status"]) == ("auth", 401)
    assert failed[3]["kind"] == "bad_response"
    assert (failed[4]["kind"], failed[4]["status"]) == ("unavailable", 503)
    assert all(e["log_level"] == "warning" for e in failed.values())
    assert all(e.get("job") == REFRESH for e in logs)
    shown = repr(logs)
    for user in (1, 2, 3, 4):
        assert token_for(user) not in shown
    stored = {
        r["id"]: r["last_refresh_error"]
        for r in await pool.fetch("SELECT id, last_refresh_error FROM bank_connections")
    }
    assert stored[conns[0]] is None
    assert stored[conns[1]].startswith("accounts: HTTP 401 (invalidToken: bad token ***)")
    assert stored[conns[2]].startswith("accounts: the answer is not valid JSON")
    assert stored[conns[3]].startswith("accounts: HTTP 503")


async def test_every_user_failing_fails_the_run(
    pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    conns = [await seed_user(pool, user) for user in (1, 2)]
    async with Sandbox().serve() as url:
        pass  # the provider is down: nothing listens there any more
    ctx = new_ctx()

    with pytest.raises(RefreshFailed, match=r"all 2 users .* failed .* connection failed"):
        await body_for(pool, fast_client(http, url, attempts=2))(ctx)

    assert outcomes(ctx) == (0, 2, 0)
    assert ctx.counts["stale_accounts_after"] == 10
    for conn_id in conns:
        assert "connection failed" in (await connection(pool, conn_id))["last_refresh_error"]


async def test_an_unreachable_database_fails_the_run(
    admin_dsn: str, bank: Bank, http: aiohttp.ClientSession
) -> None:
    missing = await asyncpg.create_pool(
        pg.with_database(admin_dsn, "kontod_no_such_database"), min_size=0, max_size=1
    )
    assert missing is not None
    try:
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await run(body_for(missing, fast_client(http, bank.url)))
    finally:
        await missing.close()
    assert bank.sandbox.requests["accounts"] == 0


async def test_declared_job_is_idle_without_a_provider_and_works_with_one(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    [idle] = [j for j in declare_jobs(Settings(), pool) if j.name == REFRESH]
    assert idle.not_configured is not None
    assert "KONTOD_POWENS_URL" in idle.not_configured
    ctx = new_ctx()
    await idle.body(ctx)
    assert ctx.counts == {}
    assert bank.sandbox.requests.total() == 0

    seen: list[tuple[str, str, float]] = []
    settings = dataclasses.replace(Settings(), powens_url=bank.url, refresh_concurrency=2)
    [refresh] = [
        j
        for j in declare_jobs(settings, pool, http, lambda *call: seen.append(call))
        if j.name == REFRESH
    ]
    ctx = new_ctx()
    await refresh.body(ctx)

    assert refresh.not_configured is None
    assert outcomes(ctx) == (1, 0, 0)
    assert [(endpoint, code) for endpoint, code, _ in seen].count(("transactions", "200")) == 5


async def test_migration_keeps_existing_connections_and_transactions(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        # Konto's tables as the web app made them, with the duplicates the old job left.
        await conn.execute(LEGACY_TABLES)
        await conn.execute(
            """
            CREATE TABLE bank_connections (id integer PRIMARY KEY, user_id integer,
                company_id integer, powens_connection_id text, powens_token text NOT NULL,
                powens_refresh_token text, status text DEFAULT 'pending', last_sync timestamptz);
            CREATE TABLE transactions (id serial PRIMARY KEY, bank_account_id integer,
                date date, amount real, label text, category text, tx_hash text);
            INSERT INTO users VALUES (1, 'a@example.org', 'A', now());
            INSERT INTO bank_accounts (id, user_id, provider, provider_account_id, balance)
                VALUES (1, 1, 'powens', '1', 10);
            INSERT INTO bank_connections (id, user_id, powens_token, status)
                VALUES (1, 1, 'tok', 'active');
            INSERT INTO transactions (bank_account_id, date, amount, label)
                VALUES (1, '2026-01-01', -1.5, 'dup'), (1, '2026-01-01', -1.5, 'dup');
            """
        )
        await db.migrate(conn)
        assert await conn.fetchval("SELECT count(*) FROM transactions") == 2
        row = await conn.fetchrow(
            "SELECT status, last_refresh_at, last_refresh_error FROM bank_connections"
        )
        assert tuple(row or ()) == ("active", None, None)
    finally:
        await conn.close()
