"""The refresh job against the real PostgreSQL of the suite and the sandbox bank over loopback."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import pytest
import structlog
from structlog.testing import capture_logs

from kontod.config import Settings, load_settings
from kontod.demo.sandbox import (
    Fault,
    Sandbox,
    SandboxTransaction,
    demo_accounts,
    demo_transactions,
    token_for,
)
from kontod.jobs import REFRESH, declare_jobs
from kontod.jobs.refresh import EXPORTS, RefreshFailed, make_body, needs_user_hold
from kontod.konto.tokens import WrongKey, encrypt
from kontod.ops.metrics import JobExportsCollector, new_registry
from kontod.providers.powens import PowensClient
from kontod.scheduler.contract import ClaimLost, Connection, JobBody, RunContext
from kontod.scheduler.runs import JobStats
from tests import pg
from tests.sandbox_helpers import (
    Bank,
    answer_raw,
    fast_client,
    powens_user,
    raw_accounts,
    raw_transactions,
    seed_user,
)

WEEK = timedelta(days=7)
KEY = bytes(range(32))


def new_ctx(run_id: int = 1, *, at: datetime | None = None) -> RunContext:
    """A run context as the runner builds it; make it inside capture_logs() to see its lines."""
    return RunContext(
        run_id=run_id,
        job=REFRESH,
        trigger="manual",
        scheduled_for=None,
        started_at=at or datetime.now(UTC),
        log=structlog.get_logger().bind(job=REFRESH, run_id=run_id),
    )


def body_for(
    pool: asyncpg.Pool,
    client: PowensClient,
    *,
    concurrency: int = 4,
    stale_after: timedelta = WEEK,
    key: bytes | None = None,
) -> JobBody:
    return make_body(pool, client, stale_after=stale_after, concurrency=concurrency, key=key)


async def run(body: JobBody, *, at: datetime | None = None) -> RunContext:
    ctx = new_ctx(at=at)
    await body(ctx)
    return ctx


async def accounts_of(pool: asyncpg.Pool, user: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        """SELECT provider_account_id, balance, last_sync, type, usage, subtype, currency
             FROM bank_accounts WHERE user_id = $1 ORDER BY provider_account_id::bigint""",
        user,
    )


async def kontod_connection(pool: asyncpg.Pool, connection_id: int | None) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT * FROM kontod_connections WHERE connection_id = $1", connection_id
    )
    assert row is not None
    return row


async def tx_hashes(pool: asyncpg.Pool, provider_account_id: str) -> list[str]:
    rows = await pool.fetch(
        """SELECT t.tx_hash FROM transactions t JOIN bank_accounts a ON a.id = t.bank_account_id
            WHERE a.provider_account_id = $1 ORDER BY t.tx_hash""",
        provider_account_id,
    )
    return [r["tx_hash"] for r in rows]


def outcomes(ctx: RunContext) -> tuple[int, int, int]:
    return ctx.counts["items_refreshed"], ctx.counts["items_failed"], ctx.counts["items_skipped"]


async def test_happy_path_writes_the_bank_data_and_its_own_time(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    await seed_user(pool, 2)

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (2, 0, 0)
    assert ctx.counts["users"] == 2
    assert ctx.counts["stale_accounts"] == 10
    assert ctx.counts["accounts_updated"] == 10
    assert ctx.counts["transactions_inserted"] == 30
    assert ctx.counts["stale_accounts_after"] == 0
    assert (ctx.progress_done, ctx.progress_expected) == (2, 2)
    rows = await accounts_of(pool, 1)
    assert [r["balance"] for r in rows] == [a.balance for a in demo_accounts(1)]
    assert [(r["type"], r["usage"], r["subtype"]) for r in rows] == [
        ("checking", "personal", None),
        ("savings", "personal", None),
        ("investment", "personal", "stocks"),
        ("loan", "personal", None),
        ("checking", "personal", None),  # Powens' ORGA: the web app's rule ignores it
    ]
    # last_sync as the web app writes it: the time of the fetch. The bank data's own time (when
    # Powens got it from the bank) is kontod's, in kontod_accounts.
    assert {r["last_sync"] for r in rows} == {ctx.started_at}
    bank_times = await pool.fetch("SELECT DISTINCT powens_last_update FROM kontod_accounts")
    assert [r["powens_last_update"] for r in bank_times] == [bank.sandbox.synced_at]
    assert {r["currency"] for r in rows} == {"EUR"}
    txs = await pool.fetch(
        """SELECT t.tx_hash, t.date, t.amount, t.label, t.category
             FROM transactions t JOIN bank_accounts a ON a.id = t.bank_account_id
            WHERE a.provider_account_id = '1' ORDER BY t.tx_hash"""
    )
    assert [tuple(r) for r in txs] == [
        # No category: the web app's rule (category.name, a field Powens does not send).
        (f"powens_{t.id}", t.date, t.value, t.wording, None)
        for t in demo_transactions(1)
    ]
    row = await kontod_connection(pool, conn_1)
    assert (row["error_kind"], row["powens_state"], row["held_until"]) == (None, None, None)
    assert row["powens_last_update"] == bank.sandbox.synced_at
    assert row["last_success_at"] == row["last_attempt_at"] == ctx.started_at
    assert len(row["token_fingerprint"]) == 64
    assert token_for(1) not in repr(dict(row))
    assert await pool.fetchval("SELECT count(*) FROM kontod_accounts") == 10
    assert await pool.fetchval("SELECT status FROM bank_connections WHERE id = $1", conn_1) == (
        "active"
    )
    # What the requests asked for: every account, whole pages.
    assert bank.sandbox.requests == {"connections": 2, "accounts": 2, "transactions": 10}
    queries = {path.rsplit("/", 1)[-1]: query for path, query in bank.sandbox.queries}
    assert queries["accounts"] == {"all": "true"}
    assert queries["transactions"] == {"limit": "1000", "all": "true"}


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
    assert [r["balance"] for r in await accounts_of(pool, 2)] == [
        a.balance for a in demo_accounts(2)
    ]
    assert ctx.counts["transactions_inserted"] == 15


async def test_a_second_refresh_asks_only_for_what_changed_and_inserts_nothing(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    # Every account is stale at every run: only Powens' last_update decides what to import.
    body = body_for(pool, fast_client(http, bank.url), stale_after=timedelta(seconds=1))
    first = await run(body)
    assert first.counts["transactions_inserted"] == 15

    second = await run(body)
    assert (second.counts["transactions_inserted"], second.counts["transactions_updated"]) == (
        0,
        0,
    )
    assert bank.sandbox.requests["transactions"] == 5  # none asked the second time
    assert await pool.fetchval("SELECT count(*) FROM transactions") == 15

    # The bank brings one new transaction: only what changed since the last import is asked.
    user = powens_user(bank, 1)
    later = bank.sandbox.synced_at + timedelta(minutes=30)
    user.account(1).last_update = later
    user.transactions[1].append(
        SandboxTransaction(9001, 1, date(2026, 11, 30), Decimal("-9.99"), "CB CAFE", None, later)
    )
    bank.sandbox.queries.clear()
    third = await run(body)
    assert third.counts["transactions_inserted"] == 1
    assert bank.sandbox.requests["transactions"] == 6
    [(_, query)] = [q for q in bank.sandbox.queries if q[0].endswith("/transactions")]
    assert query["last_update"] == bank.sandbox.synced_at.strftime("%Y-%m-%d %H:%M:%S")
    assert "powens_9001" in await tx_hashes(pool, "1")
    row = await pool.fetchrow("SELECT category FROM transactions WHERE tx_hash = 'powens_9001'")
    assert row is not None and row["category"] is None


async def test_paging_over_2500_transactions_imports_each_once(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    user = powens_user(bank, 1)
    user.transactions[1] = [
        SandboxTransaction(
            50_000 + n,
            1,
            date(2026, 1, 1) + timedelta(days=n % 300),
            Decimal(n) / 100,
            f"OP {n}",
            "groceries",
            bank.sandbox.synced_at,
        )
        for n in range(2500)
    ]

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 0, 0)
    paths = [path for path, _ in bank.sandbox.queries if path.endswith("/1/transactions")]
    assert len(paths) == 3  # 1000 + 1000 + 500, following _links.next
    assert ctx.counts["transactions_inserted"] == 2500 + 12
    assert len(set(await tx_hashes(pool, "1"))) == 2500
    assert await pool.fetchval("SELECT count(*) FROM transactions") == 2512


async def test_a_transaction_the_web_app_imported_is_not_imported_again(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    [tx, *_] = demo_transactions(1)
    await pool.execute(
        """INSERT INTO transactions (bank_account_id, date, amount, label, category, tx_hash)
           SELECT id, $1, $2, $3, $4, $5 FROM bank_accounts WHERE provider_account_id = '1'""",
        tx.date,
        tx.value,
        tx.wording,
        None,
        f"powens_{tx.id}",
    )

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert (ctx.counts["transactions_inserted"], ctx.counts["transactions_updated"]) == (14, 0)
    assert await tx_hashes(pool, "1") == sorted(f"powens_{t.id}" for t in demo_transactions(1))


async def test_rows_the_old_web_app_job_imported_are_adopted_not_doubled(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    txs = powens_user(bank, 1).transactions[1]
    txs[2].id = None  # Powens gave this one no id
    # As the web app's refresh job imported them: no tx_hash, no category.
    await pool.executemany(
        """INSERT INTO transactions (bank_account_id, date, amount, label)
           SELECT id, $1, $2, $3 FROM bank_accounts WHERE provider_account_id = '1'""",
        [(t.date, t.value, t.wording) for t in txs],
    )
    body = body_for(pool, fast_client(http, bank.url), stale_after=timedelta(seconds=1))

    ctx = await run(body)

    assert ctx.counts["transactions_adopted"] == 3
    assert ctx.counts["transactions_inserted"] == 12
    hashes = await tx_hashes(pool, "1")
    assert len(hashes) == 3
    assert {f"powens_{txs[0].id}", f"powens_{txs[1].id}"} < set(hashes)
    assert [h for h in hashes if h.startswith("powens_f_")] != []

    # The bank's data moves: every transaction is asked again, none inserted.
    powens_user(bank, 1).account(1).last_update = bank.sandbox.synced_at + timedelta(hours=1)
    ctx = await run(body)
    assert (ctx.counts["transactions_inserted"], ctx.counts["transactions_adopted"]) == (0, 0)
    assert await tx_hashes(pool, "1") == hashes


async def test_coming_transactions_wait_for_booking_and_deleted_ones_go(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    user = powens_user(bank, 1)
    pending, booked, _ = user.transactions[1]
    pending.coming = True
    body = body_for(pool, fast_client(http, bank.url), stale_after=timedelta(seconds=1))

    ctx = await run(body)
    assert ctx.counts["transactions_coming_skipped"] == 1
    assert f"powens_{pending.id}" not in await tx_hashes(pool, "1")

    # Booked a day later, with its final amount; another one deleted by Powens.
    later = bank.sandbox.synced_at + timedelta(hours=1)
    pending.coming, pending.value, pending.last_update = False, Decimal("-12.34"), later
    booked.deleted, booked.last_update = later, later
    user.account(1).last_update = later
    ctx = await run(body)

    assert ctx.counts["transactions_inserted"] == 1
    assert ctx.counts["transactions_deleted"] == 1
    hashes = await tx_hashes(pool, "1")
    assert f"powens_{pending.id}" in hashes and f"powens_{booked.id}" not in hashes
    amount = await pool.fetchval(
        "SELECT amount FROM transactions WHERE tx_hash = $1", f"powens_{pending.id}"
    )
    assert amount == Decimal("-12.34")


async def test_a_just_linked_account_without_transactions_is_filled_at_the_next_run(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    # As the web app's bank callback leaves them: last_sync = now, no transaction.
    now = datetime.now(UTC)
    await seed_user(pool, 1, last_sync=now - timedelta(minutes=1))

    ctx = await run(body_for(pool, fast_client(http, bank.url)), at=now)

    assert (ctx.counts["users"], ctx.counts["stale_accounts"]) == (1, 5)
    assert ctx.counts["transactions_inserted"] == 15
    assert ctx.counts["stale_accounts_after"] == 0
    assert len(await tx_hashes(pool, "1")) == 3


async def test_transactions_without_a_date_or_an_amount_are_skipped_and_counted(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    undated, unvalued, whole = powens_user(bank, 1).transactions[1]
    undated.date, unvalued.value = None, None

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    # Konto's NOT NULL columns would have refused the user's whole write.
    assert outcomes(ctx) == (1, 0, 0)
    assert ctx.counts["transactions_incomplete_skipped"] == 2
    assert ctx.counts["transactions_inserted"] == 13
    assert await tx_hashes(pool, "1") == [f"powens_{whole.id}"]
    assert (await kontod_connection(pool, 1))["error_kind"] is None


async def test_a_connection_needing_the_user_stays_stale_and_is_left_alone(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    await seed_user(pool, 2)
    user = powens_user(bank, 1)
    old = datetime.now(UTC).replace(microsecond=0) - timedelta(days=20)
    user.connections[0].state = "SCARequired"
    user.connections[0].error_message = "Renew your consent"
    user.connections[0].last_update = old
    for account in user.accounts:
        account.last_update = old
    body = body_for(pool, fast_client(http, bank.url))
    now = datetime.now(UTC)

    ctx = await run(body, at=now)

    # Powens answered with its stored (old) data: written as it is, fetched now (last_sync, as
    # the web app writes it), and still stale by the bank data's own time, which kontod keeps.
    assert outcomes(ctx) == (2, 0, 0)
    assert ctx.counts["connections_needing_user"] == 1
    assert {r["last_sync"] for r in await accounts_of(pool, 1)} == {now}
    kept = await pool.fetch(
        """SELECT DISTINCT k.powens_last_update FROM kontod_accounts k
             JOIN bank_accounts a ON a.id = k.bank_account_id WHERE a.user_id = 1"""
    )
    assert [r["powens_last_update"] for r in kept] == [old]
    assert [r["balance"] for r in await accounts_of(pool, 1)] == [
        a.balance for a in demo_accounts(1)
    ]
    assert ctx.counts["stale_accounts_after"] == 5
    assert ctx.counts["stale_accounts_after.needs_user"] == 5
    assert ctx.counts["connections_state.SCARequired"] == 1
    assert ctx.counts["connections_state.ok"] == 1
    row = await kontod_connection(pool, conn_1)
    assert (row["powens_state"], row["powens_error_message"]) == (
        "SCARequired",
        "Renew your consent",
    )
    assert row["held_until"] == now + needs_user_hold(1)

    # The state reaches /metrics, from the run's stored counts.
    stats = {REFRESH: JobStats(last_counts=dict(ctx.counts))}
    registry = new_registry()
    JobExportsCollector(registry, {REFRESH: EXPORTS}, ZoneInfo("UTC"), lambda: stats, dict)
    sample = registry.get_sample_value
    assert sample("kontod_provider_connections", {"state": "SCARequired"}) == 1
    assert sample("kontod_provider_connections", {"state": "wrongpass"}) == 0
    assert sample("kontod_refresh_stale_accounts", {"reason": "needs_user"}) == 5

    # The next runs do not ask again: not the next one, nor the one after.
    asked = bank.sandbox.requests_by_token[token_for(1)]
    for hours in (6, 12):
        ctx = await run(body, at=now + timedelta(hours=hours))
        assert ctx.counts["connections_held"] == 1
        assert outcomes(ctx) == (0, 0, 1)
        assert ctx.counts["stale_accounts_after.needs_user"] == 5
    assert bank.sandbox.requests_by_token[token_for(1)] == asked

    # After the back-off it is asked once more, and then left alone twice as long.
    ctx = await run(body, at=now + timedelta(days=1, hours=1))
    assert ctx.counts["connections_called"] == 1
    row = await kontod_connection(pool, conn_1)
    assert (row["needs_user_streak"], row["held_until"]) == (
        2,
        now + timedelta(days=1, hours=1) + needs_user_hold(2),
    )


def test_the_needs_user_back_off_doubles_up_to_a_week() -> None:
    assert [needs_user_hold(n).days for n in (1, 2, 3, 4, 5, 40)] == [1, 2, 4, 7, 7, 7]


async def test_a_null_balance_keeps_the_previous_one(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    await pool.execute("UPDATE bank_accounts SET balance = 42.5 WHERE provider_account_id = '2'")
    user = powens_user(bank, 1)
    user.account(2).balance = None

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert ctx.counts["balances_null_kept"] == 1
    rows = {r["provider_account_id"]: r for r in await accounts_of(pool, 1)}
    assert rows["2"]["balance"] == Decimal("42.5")
    assert rows["2"]["last_sync"] == ctx.started_at
    assert rows["1"]["balance"] == demo_accounts(1)[0].balance
    assert await pool.fetchval(
        """SELECT null_balance_at FROM kontod_accounts k JOIN bank_accounts a
               ON a.id = k.bank_account_id WHERE a.provider_account_id = '2'"""
    ) == (ctx.started_at)


async def test_deleted_and_disabled_accounts_are_recorded_left_and_not_asked_again(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    await pool.execute(
        "UPDATE bank_accounts SET balance = 7 WHERE provider_account_id IN ('2', '3')"
    )
    user = powens_user(bank, 1)
    user.account(2).deleted = bank.sandbox.synced_at
    user.account(3).disabled = bank.sandbox.synced_at
    body = body_for(pool, fast_client(http, bank.url), stale_after=timedelta(seconds=1))

    ctx = await run(body)

    assert (ctx.counts["accounts_deleted"], ctx.counts["accounts_disabled"]) == (1, 1)
    assert ctx.counts["accounts_updated"] == 3
    rows = {r["provider_account_id"]: r for r in await accounts_of(pool, 1)}
    assert (rows["2"]["balance"], rows["2"]["last_sync"]) == (Decimal(7), None)
    assert (rows["3"]["balance"], rows["3"]["last_sync"]) == (Decimal(7), None)
    flags = await pool.fetch(
        """SELECT a.provider_account_id, k.deleted_at IS NOT NULL AS deleted,
                  k.disabled_at IS NOT NULL AS disabled
             FROM kontod_accounts k JOIN bank_accounts a ON a.id = k.bank_account_id
            ORDER BY a.provider_account_id"""
    )
    assert [tuple(r) for r in flags] == [
        ("1", False, False),
        ("2", True, False),
        ("3", False, True),
        ("4", False, False),
        ("5", False, False),
    ]
    asked = {p for p, _ in bank.sandbox.queries if p.endswith("/transactions")}
    assert not any(p.endswith(("/2/transactions", "/3/transactions")) for p in asked)
    # Deleted and disabled accounts are never stale, and not asked for at the next run.
    assert ctx.counts["stale_accounts_after"] == 3
    await pool.execute("UPDATE bank_accounts SET last_sync = NULL")
    bank.sandbox.queries.clear()
    ctx = await run(body)
    assert ctx.counts["stale_accounts"] == 3
    asked = {p for p, _ in bank.sandbox.queries if p.endswith("/transactions")}
    assert not any(p.endswith(("/2/transactions", "/3/transactions")) for p in asked)


async def test_a_foreign_currency_is_stored(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    user = powens_user(bank, 1)
    user.account(1).currency = "USD"
    user.account(5).currency = "CHF"

    await run(body_for(pool, fast_client(http, bank.url)))

    assert [r["currency"] for r in await accounts_of(pool, 1)] == [
        "USD",
        "EUR",
        "EUR",
        "EUR",
        "CHF",
    ]


async def test_a_rejected_token_is_not_sent_again_until_the_database_holds_a_new_one(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    conn_2 = await seed_user(pool, 2)
    await pool.execute(
        "UPDATE bank_connections SET powens_token = 'revoked-2' WHERE id = $1", conn_2
    )
    body = body_for(pool, fast_client(http, bank.url))

    ctx = await run(body)

    assert outcomes(ctx) == (1, 1, 0)
    row = await kontod_connection(pool, conn_2)
    assert row["error_kind"] == "token_rejected"
    assert "HTTP 401" in row["error"] and "invalidToken" in row["error"]
    assert row["held_until"] == ctx.started_at + WEEK  # KONTOD_TOKEN_HOLD's default
    assert ctx.counts["stale_accounts_after.token_rejected"] == 5
    assert ctx.counts["connections_state.token_rejected"] == 1

    ctx = await run(body)
    assert bank.sandbox.requests_by_token["revoked-2"] == 1
    assert (outcomes(ctx), ctx.counts["connections_held"]) == ((0, 0, 1), 1)

    # The web app stores a new token (the user reconnected): it is used at the next run.
    await pool.execute(
        "UPDATE bank_connections SET powens_token = $2 WHERE id = $1", conn_2, token_for(2)
    )
    ctx = await run(body)
    assert outcomes(ctx) == (1, 0, 0)
    row = await kontod_connection(pool, conn_2)
    assert (row["error_kind"], row["held_until"]) == (None, None)
    assert [r["balance"] for r in await accounts_of(pool, 2)] == [
        a.balance for a in demo_accounts(2)
    ]


async def test_a_403_is_a_setup_error(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    bank.sandbox.behave(token_for(1), Fault(status=403, endpoint="accounts"))

    with capture_logs() as logs, pytest.raises(RefreshFailed):
        await run(body_for(pool, fast_client(http, bank.url)))

    row = await kontod_connection(pool, conn_1)
    assert (row["error_kind"], row["error_code"], row["held_until"]) == (
        "setup_error",
        "forbidden",
        None,
    )
    kinds = await pool.fetch("SELECT error_kind FROM kontod_connections")
    assert Counter(r["error_kind"] for r in kinds) == {"setup_error": 1}
    [failed] = [e for e in logs if e["event"] == "refresh.connection_failed"]
    assert (failed["kind"], failed["status"], failed["code"]) == ("setup_error", 403, "forbidden")


async def test_encrypted_tokens_are_decrypted_and_never_sent_without_a_key(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    await seed_user(pool, 2)  # plaintext, from before encryption
    await pool.execute(
        "UPDATE bank_connections SET powens_token = $2 WHERE id = $1",
        conn_1,
        encrypt(token_for(1), KEY),
    )

    ctx = await run(body_for(pool, fast_client(http, bank.url)))  # no key
    assert outcomes(ctx) == (1, 1, 0)
    assert bank.sandbox.requests_by_token[token_for(1)] == 0
    assert (
        sum(bank.sandbox.requests_by_token.values()) == bank.sandbox.requests_by_token[token_for(2)]
    )
    assert (await kontod_connection(pool, conn_1))["error_kind"] == "token_encrypted_no_key"

    ctx = await run(body_for(pool, fast_client(http, bank.url), key=KEY))
    assert outcomes(ctx) == (1, 0, 0)
    assert bank.sandbox.requests_by_token[token_for(1)] > 0
    assert [r["balance"] for r in await accounts_of(pool, 1)] == [
        a.balance for a in demo_accounts(1)
    ]


async def test_every_active_connection_of_a_user_is_refreshed(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    # One Konto user with two banks, each its own Powens user and token.
    await seed_user(pool, 1)
    second = await pool.fetchval(
        """INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)
           VALUES (1, '2', $1, 'active') RETURNING id""",
        token_for(2),
    )
    await pool.execute(
        """INSERT INTO bank_accounts (user_id, provider, provider_account_id, name, balance)
           SELECT 1, 'powens', unnest($1::text[]), 'other bank', 0""",
        [str(a.id) for a in demo_accounts(2)],
    )

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 0, 0)
    assert ctx.counts["connections_called"] == 2
    assert ctx.counts["accounts_updated"] == 10
    assert ctx.counts["accounts_not_returned"] == 0
    seen = await pool.fetch(
        """SELECT a.provider_account_id, k.connection_id FROM kontod_accounts k
             JOIN bank_accounts a ON a.id = k.bank_account_id"""
    )
    assert {r["connection_id"] for r in seen if int(r["provider_account_id"]) > 1000} == {second}

    # Later, only the connection that sees a stale account is asked.
    await pool.execute("UPDATE bank_accounts SET last_sync = NULL WHERE name = 'other bank'")
    before = bank.sandbox.requests_by_token[token_for(1)]
    ctx = await run(body_for(pool, fast_client(http, bank.url)))
    assert ctx.counts["connections_called"] == 1
    assert bank.sandbox.requests_by_token[token_for(1)] == before


async def test_transient_failures_are_retried_within_the_run(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    await seed_user(pool, 2)
    bank.sandbox.behave(token_for(1), Fault(status=500, times=1))
    bank.sandbox.behave(token_for(2), Fault(status=429, retry_after="0.2", times=1))

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (2, 0, 0)
    assert bank.sandbox.requests["connections"] == 4


async def test_a_hang_is_cut_by_the_timeout_and_the_user_fails(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    conn_2 = await seed_user(pool, 2)
    bank.sandbox.behave(token_for(2), Fault(kind="hang"))

    ctx = await run(body_for(pool, fast_client(http, bank.url, timeout=0.3, attempts=2)))

    assert outcomes(ctx) == (1, 1, 0)
    row = await kontod_connection(pool, conn_2)
    assert row["error"] == "connections: no answer within 0.3 s after 2 attempt(s)"
    assert row["error_kind"] == "unavailable"


async def test_a_transactions_failure_fails_the_whole_connection(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    await seed_user(pool, 2)
    bank.sandbox.behave(token_for(1), Fault(status=404, endpoint="transactions"))

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    # Balances without their transactions would look fresh: nothing of user 1 is written.
    assert outcomes(ctx) == (1, 1, 0)
    assert ctx.counts["accounts_updated"] == 5
    assert {r["balance"] for r in await accounts_of(pool, 1)} == {Decimal(0)}
    assert ctx.counts["stale_accounts_after"] == 5
    error = (await kontod_connection(pool, conn_1))["error"]
    assert "transactions of account 1: HTTP 404" in error


async def test_users_without_an_active_connection_are_skipped(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    await seed_user(pool, 2, status="pending")
    await seed_user(pool, 3, status=None)

    with capture_logs() as logs:
        ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 0, 2)
    assert bank.sandbox.requests_by_token[token_for(2)] == 0
    skipped = [e for e in logs if e["event"] == "refresh.user_skipped"]
    assert sorted(e["user_id"] for e in skipped) == [2, 3]
    assert {e["reason"] for e in skipped} == {"no_active_connection"}
    assert ctx.counts["stale_accounts_after.no_connection"] == 10

    # User 1 is fresh now: a run with only skipped users has nothing failed, so it succeeds.
    ctx = await run(body_for(pool, fast_client(http, bank.url)))
    assert outcomes(ctx) == (0, 0, 2)
    assert ctx.counts["stale_accounts_after"] == 10


async def test_a_reimport_by_two_runs_at_once_adds_no_duplicate(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    # Latency makes both runs pick the accounts up before either writes: they import the
    # same 15 transactions, and the web app's key keeps one copy of each.
    bank.sandbox.behave(token_for(1), latency=0.05)
    client = fast_client(http, bank.url)
    first, second = new_ctx(1), new_ctx(2)

    await asyncio.gather(body_for(pool, client)(first), body_for(pool, client)(second))

    assert bank.sandbox.requests["transactions"] == 10
    assert first.counts["transactions_inserted"] + second.counts["transactions_inserted"] == 15
    assert await pool.fetchval("SELECT count(*) FROM transactions") == 15


async def test_concurrency_bound_holds_at_the_server(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    for user in range(1, 13):
        await seed_user(pool, user, last_sync=datetime(2020, 1, 1, tzinfo=UTC))
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
            WHERE a.provider_account_id = '4' ORDER BY t.tx_hash"""
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

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    rows = await accounts_of(pool, 1)
    assert [(r["balance"], r["type"], r["usage"], r["subtype"]) for r in rows[:3]] == [
        (Decimal(1), "checking", "professional", None),
        (Decimal("2.5"), "savings", "professional", None),
        # As the web app decides: Powens' PRIV is not recognised, the company decides.
        (Decimal(0), "investment", "professional", "gold"),  # no balance given: kept
    ]
    assert ctx.counts["balances_null_kept"] == 1
    # Fetched: last_sync is the time of the fetch (the two not returned are left as they were);
    # without a last_update from Powens, the bank data has no time and the account stays stale.
    assert [r["last_sync"] for r in rows] == [ctx.started_at] * 3 + [None] * 2
    assert ctx.counts["accounts_not_returned"] == 2
    assert ctx.counts["stale_accounts_after.never_synced"] == 5


async def test_failures_are_logged_with_ids_and_codes_and_never_the_token(
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
    failed = {e["user_id"]: e for e in logs if e["event"] == "refresh.connection_failed"}
    assert sorted(failed) == [2, 3, 4]
    assert failed[2]["connection_id"] == conns[1]
    assert (failed[2]["kind"], failed[2]["status"], failed[2]["code"]) == (
        "token_rejected",
        401,
        "invalidToken",
    )
    assert failed[3]["kind"] == "bad_response"
    assert (failed[4]["kind"], failed[4]["status"]) == ("unavailable", 503)
    assert all(e["log_level"] == "warning" for e in failed.values())
    assert all(e.get("job") == REFRESH for e in logs)
    shown = repr(logs)
    for user in (1, 2, 3, 4):
        assert token_for(user) not in shown
    stored = {
        r["connection_id"]: r["error"]
        for r in await pool.fetch("SELECT connection_id, error FROM kontod_connections")
    }
    assert stored[conns[0]] is None
    assert stored[conns[1]].startswith("connections: HTTP 401 (invalidToken: bad token ***)")
    assert stored[conns[2]].startswith("connections: the answer is not valid JSON")
    assert stored[conns[3]].startswith("connections: HTTP 503")


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
    assert ctx.counts["stale_accounts_after.provider_error"] == 10
    for conn_id in conns:
        assert "connection failed" in (await kontod_connection(pool, conn_id))["error"]


async def test_a_database_failure_of_one_user_is_that_users_failure(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    conn_2 = await seed_user(pool, 2)

    async def web_app_deletes_an_account(token: str, endpoint: str) -> None:
        # Mid-run, the web app deletes an account of user 2: its transactions now point at
        # nothing and the insert breaks a foreign key.
        if token == token_for(2) and endpoint == "transactions":
            await pool.execute("DELETE FROM bank_accounts WHERE provider_account_id = '1001'")

    bank.sandbox.on_request = web_app_deletes_an_account

    with capture_logs() as logs:
        ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 1, 0)
    assert [r["balance"] for r in await accounts_of(pool, 1)] == [
        a.balance for a in demo_accounts(1)
    ]
    # None of user 2's writes stayed: its only connection's part is written whole or not at all.
    assert {r["balance"] for r in await accounts_of(pool, 2)} == {Decimal(0)}
    assert (
        await pool.fetchval(
            """SELECT count(*) FROM transactions t JOIN bank_accounts a ON a.id = t.bank_account_id
            WHERE a.user_id = 2"""
        )
        == 0
    )
    row = await kontod_connection(pool, conn_2)
    assert row["error_kind"] == "database"
    assert "ForeignKeyViolation" in row["error"]
    [failed] = [e for e in logs if e["event"] == "refresh.connection_write_failed"]
    assert (failed["user_id"], failed["connection_id"], failed["kind"]) == (2, conn_2, "database")
    assert ctx.counts["connections_failed"] == 1


async def test_a_lost_claim_stops_the_run_and_writes_nothing(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    for user in (1, 2, 3):
        await seed_user(pool, user)
    checked: list[int] = []

    async def lost(conn: Connection) -> None:
        checked.append(1)
        assert conn.is_in_transaction()
        raise ClaimLost("another process took the run over")

    ctx = new_ctx()
    ctx.fence = lost

    with pytest.raises(ClaimLost):
        await body_for(pool, fast_client(http, bank.url), concurrency=1)(ctx)

    assert checked == [1]
    assert ctx.counts["items_failed"] == 0
    assert await pool.fetchval("SELECT count(*) FROM transactions") == 0
    assert await pool.fetchval("SELECT count(*) FROM kontod_connections") == 0
    assert await pool.fetchval("SELECT count(*) FROM kontod_accounts") == 0
    assert await pool.fetchval("SELECT count(*) FROM bank_accounts WHERE balance <> 0") == 0


async def test_an_unreachable_database_fails_the_run(
    admin_dsn: str, pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    missing = await asyncpg.create_pool(
        pg.with_database(admin_dsn, "kontod_no_such_database"), min_size=0, max_size=1
    )
    assert missing is not None
    try:
        body = make_body(missing, fast_client(http, bank.url), stale_after=WEEK, concurrency=1)
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await run(body)
    finally:
        await missing.close()
    assert bank.sandbox.requests.total() == 0


async def test_declared_job_is_idle_without_a_provider_and_works_with_one(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    await pool.execute(
        "UPDATE bank_connections SET powens_token = $2 WHERE id = $1",
        conn_1,
        encrypt(token_for(1), KEY),
    )
    [idle] = [j for j in declare_jobs(Settings(), pool) if j.name == REFRESH]
    assert idle.not_configured is not None
    assert "KONTOD_POWENS_URL" in idle.not_configured
    ctx = new_ctx()
    await idle.body(ctx)
    assert ctx.counts == {}
    assert bank.sandbox.requests.total() == 0

    seen: list[tuple[str, str, float]] = []
    settings = Settings().replace(
        refresh={"powens_url": bank.url, "concurrency": 2, "db_encryption_key": KEY}
    )
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


@pytest.mark.parametrize(
    ("bad", "encrypted"),
    [
        ("sandbox-user-1\nX-Injected: 1", False),  # a newline would split the header
        ("tok\x00en", True),  # PostgreSQL's text holds no NUL; a decrypted token can
        ("tok\u20acen", False),  # beyond Latin-1
        ("tok\x85en", False),  # a C1 control character
    ],
)
async def test_a_token_a_header_cannot_carry_fails_its_connection_as_token_invalid(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession, bad: str, encrypted: bool
) -> None:
    conn_1 = await seed_user(pool, 1)
    await seed_user(pool, 2)
    stored = encrypt(bad, KEY) if encrypted else bad
    await pool.execute(
        "UPDATE bank_connections SET powens_token = $2 WHERE id = $1", conn_1, stored
    )

    with capture_logs() as logs:
        ctx = await run(body_for(pool, fast_client(http, bank.url), key=KEY))

    assert outcomes(ctx) == (1, 1, 0)
    assert ctx.counts["connections_failed"] == 1
    # Nothing was sent for it: every request the bank saw carried user 2's token.
    assert bank.sandbox.requests.total() == bank.sandbox.requests_by_token[token_for(2)]
    row = await kontod_connection(pool, conn_1)
    assert row["error_kind"] == "token_invalid"
    assert "HTTP header cannot carry" in row["error"]
    [failed] = [e for e in logs if e["event"] == "refresh.connection_failed"]
    assert (failed["user_id"], failed["connection_id"], failed["kind"]) == (
        1,
        conn_1,
        "token_invalid",
    )
    assert bad not in repr(logs) and bad not in row["error"]


async def test_an_answer_no_parser_foresaw_fails_that_user_only(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    await seed_user(pool, 2)

    async def deep(token: str, endpoint: str) -> None:
        if token == token_for(1) and endpoint == "accounts":
            answer_raw("[" * 100_000)  # deeper than any recursive parser goes

    bank.sandbox.on_request = deep

    with capture_logs() as logs:
        ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 1, 0)
    assert [r["balance"] for r in await accounts_of(pool, 2)] == [
        a.balance for a in demo_accounts(2)
    ]
    row = await kontod_connection(pool, conn_1)
    [failed] = [e for e in logs if e["event"] == "refresh.connection_failed"]
    assert failed["connection_id"] == conn_1
    assert row["error_kind"] == failed["kind"] is not None
    assert ctx.counts["connections_failed"] == 1


# The client turns a control character such as NUL into a space; a lone surrogate (no UTF-8
# for it) passes the client and is replaced before the write.
@pytest.mark.parametrize(("odd", "stored"), [("\x00", " "), ("\ud800", "\ufffd")])
async def test_a_nul_in_a_bank_error_is_recorded_and_the_users_good_connection_kept(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession, odd: str, stored: str
) -> None:
    good = await seed_user(pool, 1)
    await seed_user(pool, 2)
    broken = await pool.fetchval(
        """INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)
           VALUES (1, '9', 'broken-bank', 'active') RETURNING id"""
    )
    error = {"code": f"bad{odd}code", "description": f"bank says {odd} here"}
    bank.sandbox.behave("broken-bank", Fault(status=400, body=error))

    ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 1, 0)  # user 1 failed through its broken connection
    assert [r["balance"] for r in await accounts_of(pool, 1)] == [
        a.balance for a in demo_accounts(1)
    ]
    assert len(await tx_hashes(pool, "1")) == 3
    assert (await kontod_connection(pool, good))["error_kind"] is None
    row = await kontod_connection(pool, broken)
    assert (row["error_kind"], row["error_code"]) == ("provider_error", f"bad{stored}code")
    assert f"bank says {stored} here" in row["error"]


async def test_a_connection_whose_write_fails_leaves_the_users_other_connection_written(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    first = await seed_user(pool, 1)
    await seed_user(pool, 3)
    second = await pool.fetchval(
        """INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)
           VALUES (1, '2', $1, 'active') RETURNING id""",
        token_for(2),
    )
    await pool.execute(
        """INSERT INTO bank_accounts (user_id, provider, provider_account_id, name, balance)
           SELECT 1, 'powens', unnest($1::text[]), 'other bank', 0""",
        [str(a.id) for a in demo_accounts(2)],
    )

    async def web_app_deletes_an_account(token: str, endpoint: str) -> None:
        # The second bank's account goes while kontod reads it: its transactions now break a
        # foreign key, in the second connection's part only.
        if token == token_for(2) and endpoint == "transactions":
            await pool.execute("DELETE FROM bank_accounts WHERE provider_account_id = '1001'")

    bank.sandbox.on_request = web_app_deletes_an_account

    with capture_logs() as logs:
        ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 1, 0)
    assert [r["balance"] for r in await accounts_of(pool, 1)][:5] == [
        a.balance for a in demo_accounts(1)
    ]
    assert len(await tx_hashes(pool, "1")) == 3
    assert (await kontod_connection(pool, first))["error_kind"] is None
    row = await kontod_connection(pool, second)
    assert (row["error_kind"], "ForeignKeyViolation" in row["error"]) == ("database", True)
    other = await pool.fetch(
        "SELECT balance FROM bank_accounts WHERE user_id = 1 AND name = 'other bank'"
    )
    assert {r["balance"] for r in other} == {Decimal(0)}
    [failed] = [e for e in logs if e["event"] == "refresh.connection_write_failed"]
    assert (failed["connection_id"], failed["kind"]) == (second, "database")
    # Counted as written: the first connection's part only.
    assert ctx.counts["accounts_updated"] == 5 + 5  # user 1's first bank, user 3
    assert ctx.counts["connections_failed"] == 1


async def test_a_huge_or_absurd_amount_is_refused_for_its_account_or_transaction(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_user(pool, 1)
    synced = bank.sandbox.synced_at

    async def hostile(token: str, endpoint: str) -> None:
        if endpoint == "accounts":
            # 1e400 is a finite Decimal whose float is Infinity; 1e16 is no bank balance.
            answer_raw(raw_accounts(1, synced, {1: "1e400", 2: "1e16"}))
        if endpoint == "transactions":
            answer_raw(raw_transactions({9001: "1e400", 9002: "-2e15", 9003: "12.50"}))

    bank.sandbox.on_request = hostile

    with capture_logs() as logs:
        ctx = await run(body_for(pool, fast_client(http, bank.url)))

    assert outcomes(ctx) == (1, 0, 0)
    assert (ctx.counts["accounts_invalid"], ctx.counts["accounts_updated"]) == (2, 3)
    assert (ctx.counts["transactions_invalid"], ctx.counts["transactions_inserted"]) == (6, 3)
    rows = await accounts_of(pool, 1)
    # The refused accounts keep what they had and stay stale, to be asked again.
    assert [(r["balance"], r["last_sync"]) for r in rows[:2]] == [(0, None), (0, None)]
    assert [r["balance"] for r in rows[2:]] == [a.balance for a in demo_accounts(1)[2:]]
    assert ctx.counts["stale_accounts_after"] == 2
    amounts = await pool.fetch("SELECT DISTINCT amount FROM transactions")
    assert [r["amount"] for r in amounts] == [Decimal("12.50")]
    refused = [e for e in logs if e["event"] == "refresh.account_invalid"]
    assert sorted(e["provider_account_id"] for e in refused) == ["1", "2"]
    assert len([e for e in logs if e["event"] == "refresh.transaction_invalid"]) == 6


async def test_a_401_holds_for_the_token_hold_at_most_and_lifts_when_key_or_connection_change(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    await pool.execute(
        "UPDATE bank_connections SET powens_token = 'revoked-1' WHERE id = $1", conn_1
    )
    hold = timedelta(days=2)
    assert load_settings({"KONTOD_TOKEN_HOLD": "2d"}).refresh.rejection_hold == hold
    client = fast_client(http, bank.url)

    def body(key: bytes | None = None) -> JobBody:
        return make_body(pool, client, stale_after=WEEK, concurrency=1, key=key, token_hold=hold)

    def sent() -> int:
        return bank.sandbox.requests_by_token["revoked-1"]

    start = datetime.now(UTC)
    with pytest.raises(RefreshFailed):
        await run(body(), at=start)
    assert (await kontod_connection(pool, conn_1))["held_until"] == start + hold
    ctx = await run(body(), at=start + hold - timedelta(minutes=1))
    assert (ctx.counts["connections_held"], sent()) == (1, 1)

    # Past the hold: tried once again, and held again from then.
    later = start + hold + timedelta(minutes=1)
    with pytest.raises(RefreshFailed):
        await run(body(), at=later)
    assert sent() == 2
    assert (await kontod_connection(pool, conn_1))["held_until"] == later + hold

    # The operator sets (or fixes) the key: the hold decided under the old one lifts.
    step = timedelta(minutes=1)
    with pytest.raises(RefreshFailed):
        await run(body(KEY), at=later + step)
    assert sent() == 3
    ctx = await run(body(KEY), at=later + 2 * step)
    assert (ctx.counts["connections_held"], sent()) == (1, 3)

    # The web app points the row at another Powens connection: tried again.
    await pool.execute(
        "UPDATE bank_connections SET powens_connection_id = '77' WHERE id = $1", conn_1
    )
    with pytest.raises(RefreshFailed):
        await run(body(KEY), at=later + 3 * step)
    assert sent() == 4

    # A hold of 'infinity' left by an older kontod ends with the hold too.
    await pool.execute(
        "UPDATE kontod_connections SET held_until = 'infinity' WHERE connection_id = $1", conn_1
    )
    ctx = await run(body(KEY), at=later + 4 * step)
    assert (ctx.counts["connections_held"], sent()) == (1, 4)
    with pytest.raises(RefreshFailed):
        await run(body(KEY), at=later + 3 * step + hold + step)
    assert sent() == 5


async def test_a_run_with_a_key_that_opens_no_stored_token_fails_before_calling_the_bank(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    conn_1 = await seed_user(pool, 1)
    await seed_user(pool, 2)  # plaintext: it would pass a wrong key unnoticed, row by row
    await pool.execute(
        "UPDATE bank_connections SET powens_token = $2 WHERE id = $1",
        conn_1,
        encrypt(token_for(1), KEY),
    )

    with pytest.raises(WrongKey, match="none of the 1 stored bank tokens"):
        await run(body_for(pool, fast_client(http, bank.url), key=bytes(32)))

    assert bank.sandbox.requests.total() == 0
    assert await pool.fetchval("SELECT count(*) FROM kontod_connections") == 0
