"""A 401 answered by one token refresh, as the web app makes it, on both Konto engines.

Each test runs with Konto's tables in PostgreSQL and in the web app's SQLite file (itself and
behind a libSQL server). The sandbox bank speaks ``/auth/token/refresh`` with refresh-token
rotation; "the web app" is the test, writing the row as the web app would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from kontod.config import load_settings
from kontod.demo.sandbox import API_PREFIX, TOKEN_REFRESH, demo_accounts, token_for
from kontod.jobs import REFRESH, declare_jobs
from kontod.jobs.refresh import RefreshFailed, Rotation, make_body
from kontod.konto import lite_schema, tokens
from kontod.konto.store import KontoSql
from kontod.scheduler.contract import JobBody, RunContext
from tests.helpers import webapp_konto
from tests.integration.test_refresh_lite import claimed, run_claimed
from tests.konto_engines import ENGINES, konto_on
from tests.sandbox_helpers import Bank, fast_client

KEY = bytes.fromhex("3c" * 32)
CLIENT_ID = "konto-web"
CLIENT_SECRET = "s3cret-of-the-konto-client"
ROTATION = Rotation(CLIENT_ID, CLIENT_SECRET)
WEEK = timedelta(days=7)
TOKENS_SQL = "SELECT powens_token, powens_refresh_token, status FROM bank_connections WHERE id = 1"


@dataclass
class Konto:
    """Konto's tables on one engine (``db`` None: in ``pool``, kontod's own PostgreSQL)."""

    pool: asyncpg.Pool
    db: KontoSql | None
    path: Path | None

    async def tokens(self) -> tuple[str, str | None, str]:
        """The connection's stored access token, refresh token and status."""
        if self.path is None:
            row = await self.pool.fetchrow(TOKENS_SQL)
            assert row is not None
            return row[0], row[1], row[2]
        with sqlite3.connect(self.path) as conn:
            found = conn.execute(TOKENS_SQL).fetchone()
        conn.close()
        return found[0], found[1], found[2]

    async def write(self, sql: str, *params: object) -> None:
        """A statement as the web app runs it (``?`` placeholders)."""
        if self.path is None:
            n = iter(range(1, 100))
            await self.pool.execute("".join(f"${next(n)}" if c == "?" else c for c in sql), *params)
            return
        with sqlite3.connect(self.path) as conn:
            conn.execute(sql, params)
        conn.close()


@pytest.fixture(params=("postgresql", *ENGINES))
async def konto(
    request: pytest.FixtureRequest, tmp_path: Path, pool: asyncpg.Pool
) -> AsyncIterator[Konto]:
    """User 1 with their demo accounts (never synced) and one connection, on each engine."""
    if request.param == "postgresql":
        side = Konto(pool, None, None)
        await seed(side)
        yield side
        return
    path = webapp_konto(tmp_path / "konto.db")
    async with konto_on(str(request.param), path) as engine:
        await lite_schema.create_missing(engine)
        side = Konto(pool, engine, path)
        await seed(side)
        yield side


async def seed(k: Konto) -> None:
    await k.write("INSERT INTO users (id, email) VALUES (?, ?)", 1, "u1@example.org")
    for a in demo_accounts(1):
        await k.write(
            """INSERT INTO bank_accounts (id, user_id, provider, provider_account_id, name)
               VALUES (?, ?, 'powens', ?, ?)""",
            a.id,
            1,
            str(a.id),
            a.name,
        )


async def connect(k: Konto, stored: str, refresh_stored: str | None) -> None:
    await k.write(
        """INSERT INTO bank_connections
             (id, user_id, powens_connection_id, powens_token, powens_refresh_token, status)
           VALUES (1, 1, '1', ?, ?, 'active')""",
        stored,
        refresh_stored,
    )


def body(
    k: Konto,
    bank: Bank,
    http: aiohttp.ClientSession,
    rotation: Rotation | None,
    key: bytes | None = KEY,
) -> JobBody:
    return make_body(
        k.pool,
        fast_client(http, bank.url),
        stale_after=WEEK,
        concurrency=2,
        key=key,
        konto=k.db,
        rotation=rotation,
    )


async def run(
    k: Konto,
    bank: Bank,
    http: aiohttp.ClientSession,
    rotation: Rotation | None,
    key: bytes | None = KEY,
) -> RunContext:
    return await run_claimed(k.pool, body(k, bank, http, rotation, key), datetime.now(UTC))


async def run_failing(
    k: Konto, bank: Bank, http: aiohttp.ClientSession, rotation: Rotation | None
) -> RunContext:
    """A run whose only user fails (so does the run), under a claim."""
    ctx = await claimed(k.pool, datetime.now(UTC))
    with pytest.raises(RefreshFailed):
        await body(k, bank, http, rotation)(ctx)
    return ctx


async def kontod_record(k: Konto) -> asyncpg.Record:
    row = await k.pool.fetchrow("SELECT * FROM kontod_connections WHERE connection_id = 1")
    assert row is not None
    return row


def expired_pair(bank: Bank) -> str:
    """User 1's access token expired, and the refresh token issued with it."""
    bank.sandbox.client_id, bank.sandbox.client_secret = CLIENT_ID, CLIENT_SECRET
    refresh = bank.sandbox.refresh_token_for(token_for(1))
    bank.sandbox.expire(token_for(1))
    return refresh


async def test_a_401_with_a_refresh_token_rotates_once_and_stores_the_pair_encrypted(
    konto: Konto, bank: Bank, http: aiohttp.ClientSession
) -> None:
    refresh = expired_pair(bank)
    stored = tokens.encrypt(token_for(1), KEY)
    await connect(konto, stored, tokens.encrypt(refresh, KEY))

    with capture_logs() as logs:
        ctx = await run(konto, bank, http, ROTATION)

    assert (ctx.counts["items_refreshed"], ctx.counts["items_failed"]) == (1, 0)
    assert bank.sandbox.refreshes == [refresh]
    [(access, new_refresh)] = bank.sandbox.rotations
    new_stored, new_refresh_stored, status = await konto.tokens()
    assert access not in new_stored and new_refresh not in str(new_refresh_stored)
    assert tokens.decrypt(new_stored, KEY) == access
    assert tokens.decrypt(str(new_refresh_stored), KEY) == new_refresh
    assert status == "active"
    assert bank.sandbox.requests_by_token[access] >= 3  # connections, accounts, transactions
    record = await kontod_record(konto)
    assert record["error_kind"] is None
    assert record["token_fingerprint"] == tokens.fingerprint(new_stored)
    assert [e["event"] for e in logs].count("refresh.token_rotated") == 1
    shown = repr(logs)
    for secret in (CLIENT_SECRET, token_for(1), refresh, access, new_refresh, stored, new_stored):
        assert secret not in shown


async def test_without_a_key_a_plaintext_pair_is_rotated_in_plaintext(
    konto: Konto, bank: Bank, http: aiohttp.ClientSession
) -> None:
    refresh = expired_pair(bank)
    await connect(konto, token_for(1), refresh)  # rows from before encryption

    ctx = await run(konto, bank, http, ROTATION, key=None)

    assert (ctx.counts["items_refreshed"], ctx.counts["items_failed"]) == (1, 0)
    [pair] = bank.sandbox.rotations
    assert await konto.tokens() == (*pair, "active")


async def test_a_rotation_by_the_web_app_meanwhile_is_used_and_not_refreshed_again(
    konto: Konto, bank: Bank, http: aiohttp.ClientSession
) -> None:
    refresh = expired_pair(bank)
    stored = tokens.encrypt(token_for(1), KEY)
    await connect(konto, stored, tokens.encrypt(refresh, KEY))
    # The web app rotates the pair while kontod's refresh is on its way to the bank.
    web_access, web_refresh = bank.sandbox.grant(token_for(1))
    web_pair = (tokens.encrypt(web_access, KEY), tokens.encrypt(web_refresh, KEY))

    async def web_app_rotates(token: str, endpoint: str) -> None:
        if endpoint == TOKEN_REFRESH:
            await konto.write(
                "UPDATE bank_connections SET powens_token = ?, powens_refresh_token = ?"
                " WHERE id = 1",
                *web_pair,
            )

    bank.sandbox.on_request = web_app_rotates
    with capture_logs() as logs:
        ctx = await run(konto, bank, http, ROTATION)

    assert (ctx.counts["items_refreshed"], ctx.counts["items_failed"]) == (1, 0)
    assert len(bank.sandbox.refreshes) == 1  # no second refresh
    assert await konto.tokens() == (*web_pair, "active")  # the CAS left the web app's pair
    [(kontod_access, _)] = bank.sandbox.rotations
    assert bank.sandbox.requests_by_token[web_access] >= 3
    assert bank.sandbox.requests_by_token[kontod_access] == 0
    assert (await kontod_record(konto))["token_fingerprint"] == tokens.fingerprint(web_pair[0])
    events = [e["event"] for e in logs]
    assert "refresh.token_rotated_elsewhere" in events and "refresh.token_rotated" not in events
    assert CLIENT_SECRET not in repr(logs) and web_access not in repr(logs)


async def test_a_refused_refresh_fails_the_connection_as_token_rejected_and_leaves_status(
    konto: Konto, bank: Bank, http: aiohttp.ClientSession
) -> None:
    expired_pair(bank)
    stored = tokens.encrypt(token_for(1), KEY)
    await connect(konto, stored, "already-used-refresh-token")  # plaintext, from before

    with capture_logs() as logs:
        ctx = await run_failing(konto, bank, http, ROTATION)

    assert (ctx.counts["items_refreshed"], ctx.counts["items_failed"]) == (0, 1)
    assert bank.sandbox.refreshes == ["already-used-refresh-token"]
    assert await konto.tokens() == (stored, "already-used-refresh-token", "active")
    assert (await kontod_record(konto))["error_kind"] == "token_rejected"
    [failed] = [e for e in logs if e["event"] == "refresh.token_refresh_failed"]
    assert (failed["status"], failed["code"]) == (400, "invalidToken")
    assert "already-used-refresh-token" not in repr(logs) and CLIENT_SECRET not in repr(logs)


async def test_without_the_client_credentials_a_401_stays_token_rejected(
    konto: Konto, bank: Bank, http: aiohttp.ClientSession
) -> None:
    refresh = expired_pair(bank)
    stored = tokens.encrypt(token_for(1), KEY)
    await connect(konto, stored, tokens.encrypt(refresh, KEY))

    ctx = await run_failing(konto, bank, http, None)

    assert (ctx.counts["items_refreshed"], ctx.counts["items_failed"]) == (0, 1)
    assert bank.sandbox.refreshes == []
    assert (await konto.tokens())[0] == stored
    assert (await kontod_record(konto))["error_kind"] == "token_rejected"


async def test_the_sandbox_rotates_refresh_tokens_once_each(
    bank: Bank, http: aiohttp.ClientSession
) -> None:
    bank.sandbox.client_id, bank.sandbox.client_secret = CLIENT_ID, CLIENT_SECRET
    refresh = bank.sandbox.refresh_token_for(token_for(2))
    url = f"{bank.url}/auth/token/refresh"
    body = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "refresh_token": refresh}

    async with http.post(url, json={**body, "client_secret": "wrong"}) as resp:
        assert (resp.status, (await resp.json())["code"]) == (401, "invalidClient")
    async with http.post(url, json=body) as resp:
        assert resp.status == 200
        pair = await resp.json()
    async with http.post(url, json=body) as resp:
        error = await resp.json()
        assert (resp.status, error["code"]) == (400, "invalidToken")
        assert "already used" in error["description"] and "request_id" in error

    accounts = f"{bank.url}/users/me/accounts"
    for token, status in ((token_for(2), 401), (pair["access_token"], 200)):
        async with http.get(accounts, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == status
    assert url.endswith(f"{API_PREFIX}/auth/token/refresh")


async def test_a_refresh_token_the_web_app_used_first_gives_way_to_its_stored_pair(
    konto: Konto, bank: Bank, http: aiohttp.ClientSession
) -> None:
    refresh = expired_pair(bank)
    await connect(konto, tokens.encrypt(token_for(1), KEY), tokens.encrypt(refresh, KEY))
    url = f"{bank.url}/auth/token/refresh"
    web_app: dict[str, str] = {}

    async def web_app_refreshes_first(token: str, endpoint: str) -> None:
        # The web app's own refresh of the same refresh token lands just before kontod's.
        if endpoint == TOKEN_REFRESH and not web_app:
            web_app["asked"] = token
            body = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "refresh_token": token}
            async with http.post(url, json=body) as resp:
                pair = await resp.json()
            web_app.update(pair)
            await konto.write(
                "UPDATE bank_connections SET powens_token = ?, powens_refresh_token = ?"
                " WHERE id = 1",
                tokens.encrypt(pair["access_token"], KEY),
                tokens.encrypt(pair["refresh_token"], KEY),
            )

    bank.sandbox.on_request = web_app_refreshes_first
    ctx = await run(konto, bank, http, ROTATION)

    assert (ctx.counts["items_refreshed"], ctx.counts["items_failed"]) == (1, 0)
    assert bank.sandbox.refreshes == [refresh, refresh]  # the web app's, then kontod's (refused)
    assert len(bank.sandbox.rotations) == 1
    stored, refresh_stored, _ = await konto.tokens()
    assert tokens.decrypt(stored, KEY) == web_app["access_token"]
    assert tokens.decrypt(str(refresh_stored), KEY) == web_app["refresh_token"]
    assert bank.sandbox.requests_by_token[web_app["access_token"]] >= 3


async def test_the_declared_job_refreshes_with_the_web_apps_client_settings(
    pool: asyncpg.Pool, bank: Bank, http: aiohttp.ClientSession
) -> None:
    k = Konto(pool, None, None)
    await seed(k)
    refresh = expired_pair(bank)
    await connect(k, tokens.encrypt(token_for(1), KEY), tokens.encrypt(refresh, KEY))
    settings = load_settings(
        {
            "KONTOD_POWENS_URL": bank.url,
            "KONTOD_DB_ENCRYPTION_KEY": KEY.hex(),
            "POWENS_CLIENT_ID": CLIENT_ID,
            "POWENS_CLIENT_SECRET": CLIENT_SECRET,
        }
    )
    [job] = [j for j in declare_jobs(settings, pool, http) if j.name == REFRESH]

    ctx = await claimed(pool, datetime.now(UTC))
    await job.body(ctx)

    assert (ctx.counts["items_refreshed"], ctx.counts["items_failed"]) == (1, 0)
    assert bank.sandbox.refreshes == [refresh]
