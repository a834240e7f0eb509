"""kontod on a database as Konto's web app creates it: its schema left alone, its tokens read."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import structlog

from kontod import db
from kontod.demo import run as demo
from kontod.demo.sandbox import demo_accounts, demo_transactions, token_for
from kontod.jobs import REFRESH, SNAPSHOTS
from kontod.jobs import snapshots as snapshots_job
from kontod.jobs.refresh import make_body
from kontod.konto import schema as konto_schema
from kontod.konto.tokens import WrongKey, check_key, decrypt, encrypt, fingerprint
from kontod.scheduler.contract import RunContext
from tests.helpers import PARIS, WEBAPP_SCHEMA, konto_schema_of
from tests.sandbox_helpers import Bank, answer_raw, fast_client, raw_accounts, raw_transactions

KEY = bytes.fromhex("5f" * 16 + "a3" * 16)
KEY_HEX = KEY.hex()


@pytest.fixture
async def webapp(empty_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A database with Konto's tables exactly as the web app creates them."""
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(WEBAPP_SCHEMA)
        yield conn
    finally:
        await conn.close()


def ctx_for(job: str) -> RunContext:
    return RunContext(
        run_id=1,
        job=job,
        trigger="manual",
        scheduled_for=None,
        started_at=datetime.now(UTC),
        log=structlog.get_logger().bind(job=job),
    )


async def seed_webapp(conn: asyncpg.Connection) -> None:
    """Two users as the web app writes them: user 1's token encrypted, user 2's plaintext."""
    for user in (1, 2):
        await conn.execute(
            "INSERT INTO users (id, email) VALUES ($1, $2)", user, f"u{user}@example.org"
        )
        await conn.executemany(
            """INSERT INTO bank_accounts (user_id, provider, provider_account_id, name, balance,
                                          hidden, last_sync)
               VALUES ($1, 'powens', $2, $3, 0.1, $4, '2026-01-01T00:00:00.000Z')""",
            [(user, str(a.id), a.name, int(a.id % 5 == 0)) for a in demo_accounts(user)],
        )
    await conn.execute(
        """INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)
           VALUES (1, '1', $1, 'active'), (2, '2', $2, 'active')""",
        encrypt(token_for(1), KEY),
        token_for(2),
    )
    # A transaction the web app imported already, under its own key.
    [tx, *_] = demo_transactions(1)
    await conn.execute(
        """INSERT INTO transactions (bank_account_id, date, amount, label, category, tx_hash)
           SELECT id, $1, $2, $3, 'groceries', $4 FROM bank_accounts
            WHERE provider_account_id = '1'""",
        tx.date.isoformat(),
        float(tx.value),
        tx.wording,
        f"powens_{tx.id}",
    )


async def test_migrate_and_refresh_leave_the_web_apps_schema_alone(
    webapp: asyncpg.Connection, empty_dsn: str, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_webapp(webapp)
    before = await konto_schema_of(webapp)

    applied = await db.migrate(webapp)
    assert "0001_konto_tables" in applied and "0003_refresh" in applied
    schema = await konto_schema.load(webapp)
    assert schema.cast("bank_accounts", "balance") == "double precision"
    assert schema.cast("bank_accounts", "last_sync") == "text"
    assert await konto_schema_of(webapp) == before

    pool = await asyncpg.create_pool(empty_dsn, min_size=1, max_size=4)
    assert pool is not None
    try:
        body = make_body(
            pool, fast_client(http, bank.url), stale_after=timedelta(days=7), concurrency=2, key=KEY
        )
        ctx = ctx_for(REFRESH)
        await body(ctx)
        assert ctx.counts["items_refreshed"] == 2
        assert ctx.counts["transactions_inserted"] == 29  # 30, less the one the web app has
        second = ctx_for(REFRESH)
        await body(second)
        assert second.counts["users"] == 0  # fresh now: nothing asked, nothing inserted
        await snapshots_job.make_body(pool, PARIS, 1000)(ctx_for(SNAPSHOTS))
    finally:
        await pool.close()

    assert await konto_schema_of(webapp) == before
    # Values of the columns' own types: floats, ISO text times and dates.
    rows = await webapp.fetch(
        "SELECT balance, last_sync, currency FROM bank_accounts WHERE user_id = 1 ORDER BY id"
    )
    assert [r["balance"] for r in rows] == [float(a.balance) for a in demo_accounts(1)]
    # last_sync: the time of kontod's fetch, in the web app's text (JavaScript's toISOString).
    assert {r["last_sync"] for r in rows} == {konto_schema.iso_text(ctx.started_at)}
    txs = await webapp.fetch(
        """SELECT t.tx_hash, t.date, t.amount, t.category FROM transactions t
             JOIN bank_accounts a ON a.id = t.bank_account_id
            WHERE a.provider_account_id = '1' ORDER BY t.tx_hash"""
    )
    assert [tuple(r) for r in txs] == [
        # category: the web app's rule (category.name, which Powens does not send), NULL.
        (f"powens_{t.id}", t.date.isoformat(), float(t.value), None)
        for t in demo_transactions(1)
    ]
    assert await webapp.fetchval("SELECT count(*) FROM transactions") == 30
    # The snapshot job read the float money and the 0/1 flags: hidden accounts left out.
    total = await webapp.fetchval(
        "SELECT total_value FROM patrimoine_snapshots WHERE user_id = 1 AND category = 'total'"
    )
    visible = sum(a.balance for a in demo_accounts(1) if a.id % 5 != 0)
    assert Decimal(str(total)) == visible
    # What kontod keeps of a token: a hash of the stored value, never the token.
    stored = await webapp.fetch("SELECT * FROM kontod_connections ORDER BY connection_id")
    assert [r["error_kind"] for r in stored] == [None, None]
    assert token_for(1) not in repr([dict(r) for r in stored])
    encrypted = await webapp.fetchval("SELECT powens_token FROM bank_connections WHERE id = 1")
    assert stored[0]["token_fingerprint"] == fingerprint(encrypted)


async def test_migrations_create_what_is_missing_with_proper_types(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        await db.migrate(conn)
        schema = await konto_schema.load(conn)
        assert schema.cast("bank_accounts", "balance") == "numeric"
        assert schema.cast("bank_accounts", "hidden") == "boolean"
        assert schema.cast("bank_accounts", "last_sync") == "timestamptz"
        assert schema.cast("transactions", "date") == "date"
    finally:
        await conn.close()


def test_tokens_follow_the_web_apps_rule() -> None:
    stored = encrypt("tok-123", KEY)
    assert decrypt(stored, KEY) == "tok-123"
    assert decrypt("plain-token", KEY) == "plain-token"  # not base64
    assert decrypt("YWJj", KEY) == "YWJj"  # base64 of 3 bytes: 28 bytes or fewer
    other = bytes(32)
    assert decrypt(stored, other) == stored  # fails authentication: used as it is
    # Fixed IV: the layout is IV, then tag, then ciphertext.
    fixed = encrypt("abc", KEY, iv=bytes(12))
    raw = base64.b64decode(fixed)
    assert raw[:12] == bytes(12) and len(raw) == 12 + 16 + 3


async def kontod(*args: str, env: dict[str, str]) -> tuple[int, str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("KONTOD_") or k == "KONTOD_DVF_URL"
    }
    clean.pop("DB_ENCRYPTION_KEY", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod",
        *args,
        env={**clean, "KONTOD_LOG_FORMAT": "json", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_a_missing_konto_column_stops_kontod_with_exit_2(
    webapp: asyncpg.Connection, empty_dsn: str
) -> None:
    await webapp.execute("ALTER TABLE bank_accounts DROP COLUMN currency")

    code, out = await kontod("migrate", env={"KONTOD_DATABASE_URL": empty_dsn})

    assert code == 2, out
    assert "bank_accounts" in out and "currency" in out
    # The web app's table is as it was: nothing added back.
    assert not await webapp.fetchval(
        """SELECT EXISTS (SELECT 1 FROM information_schema.columns
                           WHERE table_name = 'bank_accounts' AND column_name = 'currency')"""
    )


async def test_a_bad_key_exits_2_naming_the_setting_and_never_the_key(
    tmp_path: Path, empty_dsn: str
) -> None:
    bad = KEY_HEX[:-1] + "z"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db_encryption_key").write_text(bad + "\n")
    cases = [
        ({"KONTOD_DB_ENCRYPTION_KEY": bad}, "KONTOD_DB_ENCRYPTION_KEY"),
        ({"DB_ENCRYPTION_KEY": bad[:-2]}, "DB_ENCRYPTION_KEY"),
        ({"CREDENTIALS_DIRECTORY": str(creds)}, "credential db_encryption_key"),
    ]
    for env, named in cases:
        code, out = await kontod("migrate", env={"KONTOD_DATABASE_URL": empty_dsn, **env})
        assert code == 2, out
        assert named in out and "64 hexadecimal characters" in out
        assert bad[:-2] not in out
    # A good key from the web app's own variable is accepted.
    code, out = await kontod(
        "migrate", env={"KONTOD_DATABASE_URL": empty_dsn, "DB_ENCRYPTION_KEY": KEY_HEX}
    )
    assert code == 0, out
    assert KEY_HEX not in out


async def test_schema_errors_name_what_is_wrong(webapp: asyncpg.Connection) -> None:
    await webapp.execute(
        "ALTER TABLE transactions DROP CONSTRAINT transactions_bank_account_id_tx_hash_key"
    )
    with pytest.raises(
        konto_schema.KontoSchemaError, match=r"transactions .*bank_account_id, tx_hash"
    ):
        await konto_schema.load(webapp)
    await webapp.execute("DROP TABLE holding_snapshots, patrimoine_snapshots")
    with pytest.raises(konto_schema.KontoSchemaError, match="patrimoine_snapshots does not exist"):
        await konto_schema.load(webapp)


async def test_the_demo_stores_its_token_encrypted_and_refreshes_with_it(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    assert await demo.seed(pool)
    stored = await pool.fetchval("SELECT powens_token FROM bank_connections")
    assert stored != token_for(2)
    assert decrypt(stored, demo.DEMO_KEY) == token_for(2)

    ctx = ctx_for(REFRESH)
    body = make_body(
        pool,
        fast_client(http, bank.url),
        stale_after=timedelta(days=7),
        concurrency=1,
        key=demo.DEMO_KEY,
    )
    await body(ctx)

    assert (ctx.counts["items_refreshed"], ctx.counts["accounts_updated"]) == (1, 3)


async def test_history_and_latest_date_read_the_web_apps_text_dates(
    webapp: asyncpg.Connection, empty_dsn: str
) -> None:
    await db.migrate(webapp)
    await webapp.execute("INSERT INTO users (id, email) VALUES (1, 'u1@example.org')")
    today = datetime.now(UTC).date()
    for days_ago, category in ((0, "total"), (0, "checking"), (2, "total"), (30, "total")):
        await webapp.execute(
            "INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)"
            " VALUES ($1, 1, $2, 1.5)",
            (today - timedelta(days=days_ago)).isoformat(),
            category,
        )

    assert await snapshots_job.latest_snapshot_date(webapp) == today
    code, out = await kontod(
        "history", "--days", "7", env={"KONTOD_DATABASE_URL": empty_dsn, "KONTOD_TIMEZONE": "UTC"}
    )
    assert code == 0, out
    lines = [line.split() for line in out.strip().splitlines() if not line.startswith("{")]
    assert lines[1:] == [
        [today.isoformat(), "2", "1", "1.50"],
        [(today - timedelta(days=2)).isoformat(), "1", "1", "1.50"],
    ]


async def test_a_wrong_key_stops_kontod_run_with_exit_2_naming_the_setting(
    webapp: asyncpg.Connection, empty_dsn: str, tmp_path: Path
) -> None:
    await seed_webapp(webapp)  # user 1's token encrypted under KEY, user 2's plaintext
    stored = await webapp.fetchval("SELECT powens_token FROM bank_connections WHERE user_id = 1")
    wrong = bytes(range(32)).hex()
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("KONTOD_") or k == "KONTOD_DVF_URL"
    }
    clean.pop("DB_ENCRYPTION_KEY", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod",
        "run",
        env={
            **clean,
            "KONTOD_DATABASE_URL": empty_dsn,
            "KONTOD_DB_ENCRYPTION_KEY": wrong,
            "KONTOD_LISTEN": "127.0.0.1:0",
            "KONTOD_STATE_DIR": str(tmp_path),
            "KONTOD_TIMEZONE": "UTC",
            "KONTOD_LOG_FORMAT": "json",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()

    assert proc.returncode == 2, text
    assert "KONTOD_DB_ENCRYPTION_KEY" in text
    assert "none of the 1 stored bank tokens that look encrypted" in text
    for secret in (wrong, stored, token_for(1), token_for(2)):
        assert secret not in text
    assert "http.listening" not in text  # stopped before it served anything


async def test_the_start_check_passes_a_key_that_opens_one_value_and_plaintext_alone(
    webapp: asyncpg.Connection,
) -> None:
    await seed_webapp(webapp)
    assert await check_key(webapp, KEY) == 1
    # A value encrypted under another key beside: the right key still opens one, row by row
    # the other is taken for plaintext as the web app does.
    await webapp.execute(
        """INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)
           VALUES (2, '3', $1, 'active')""",
        encrypt("other", bytes(32)),
    )
    assert await check_key(webapp, KEY) == 1
    with pytest.raises(WrongKey, match="none of the 2 stored bank tokens") as caught:
        await check_key(webapp, bytes(range(32)))
    assert KEY_HEX not in str(caught.value)
    # Only plaintext tokens: nothing to tell a key by, nothing refused.
    await webapp.execute("DELETE FROM bank_connections WHERE powens_token <> $1", token_for(2))
    assert await check_key(webapp, bytes(range(32))) == 0


async def test_a_huge_bank_amount_never_writes_infinity_into_the_web_apps_float_columns(
    webapp: asyncpg.Connection, empty_dsn: str, bank: Bank, http: aiohttp.ClientSession
) -> None:
    await seed_webapp(webapp)
    await db.migrate(webapp)
    synced = bank.sandbox.synced_at

    async def hostile(token: str, endpoint: str) -> None:
        if token != token_for(1):
            return
        if endpoint == "accounts":
            answer_raw(raw_accounts(1, synced, {1: "1e400", 2: "-1e400"}))
        if endpoint == "transactions":
            answer_raw(raw_transactions({9001: "1e400", 9002: "7.25"}))

    bank.sandbox.on_request = hostile
    pool = await asyncpg.create_pool(empty_dsn, min_size=1, max_size=4)
    assert pool is not None
    try:
        body = make_body(
            pool, fast_client(http, bank.url), stale_after=timedelta(days=7), concurrency=2, key=KEY
        )
        ctx = ctx_for(REFRESH)
        await body(ctx)
    finally:
        await pool.close()

    infinite = await webapp.fetchval(
        """SELECT (SELECT count(*) FROM bank_accounts WHERE balance IN ('Infinity', '-Infinity'))
                + (SELECT count(*) FROM transactions WHERE amount IN ('Infinity', '-Infinity'))"""
    )
    assert infinite == 0
    assert ctx.counts["items_refreshed"] == 2
    assert (ctx.counts["accounts_invalid"], ctx.counts["transactions_invalid"]) == (2, 3)
    kept = await webapp.fetch(
        "SELECT balance FROM bank_accounts WHERE user_id = 1 AND provider_account_id IN ('1', '2')"
    )
    assert [r["balance"] for r in kept] == [0.1, 0.1]
