"""Currencies pegged to the euro and coins outside the shipped map, converted on both engines:
the rate sandbox as a real HTTP server, a real PostgreSQL, a real SQLite file."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import structlog

from kontod import db
from kontod.config import load_settings
from kontod.demo.rates_sandbox import RateSandbox, urls
from kontod.jobs import snapshots_lite
from kontod.jobs.snapshots import Conversion, take_snapshots
from kontod.konto import lite_schema
from kontod.providers import rates
from kontod.scheduler.contract import RunContext
from tests.helpers import PARIS, WEBAPP_SCHEMA, webapp_konto
from tests.konto_engines import konto_on

AT = datetime(2026, 6, 10, 0, 0, tzinfo=UTC)  # June 10th in Paris; the sandbox's ECB day is the 9th
# (type, balance, currency, provider) of one user's accounts
ACCOUNTS = [
    ("checking", "100000", "XOF", None),
    ("savings", "10000", "XPF", None),
    ("investment", "1000000", "PEPE", "coinbase"),  # three coins share PEPE in the sandbox
    ("investment", "50", "USD", "binance"),  # Binance keeps USD: fiat, never looked up
]
# By hand, to 8 decimals: 100000 / 655.957 = 152.449017237...; 10000 x 0.00838 = 83.80;
# 1 000 000 x 0.00001127 (the price of "pepe", rank 24) = 11.27; 50 / 1.0834 = 46.151006...
EXPECTED_EUR = [
    Decimal("152.44901724"),
    Decimal("83.80000"),
    Decimal("11.27000000"),
    Decimal("46.15100609"),
]


@pytest.fixture
async def sandbox() -> AsyncIterator[tuple[RateSandbox, rates.RateSources]]:
    sandbox = RateSandbox(timeout_s=5)
    async with sandbox.serve() as root, aiohttp.ClientSession() as http:
        fiat, crypto = urls(root)
        client = rates.RateSources(
            http, fiat_url=fiat, crypto_url=crypto, timeout=1, attempts=1, backoff=0.01
        )
        yield sandbox, client


def ctx() -> RunContext:
    return RunContext(
        run_id=1,
        job="daily-snapshots",
        trigger="schedule",
        scheduled_for=AT,
        started_at=AT,
        log=structlog.get_logger(),
    )


async def pg_user(pool: asyncpg.Pool, accounts: list[tuple[str, str, str, str | None]]) -> int:
    uid: int = await pool.fetchval(
        "INSERT INTO users (email) VALUES ('u' || random()::text) RETURNING id"
    )
    for typ, balance, cur, provider in accounts:
        await pool.execute(
            """INSERT INTO bank_accounts (user_id, name, type, balance, currency, provider)
               VALUES ($1, $2, $3, $4::numeric, $5, $6)""",
            uid,
            f"{typ} {cur}",
            typ,
            balance,
            cur,
            provider,
        )
    return uid


async def pg_run(
    pool: asyncpg.Pool, client: rates.RateSources, conv: Conversion | None = None
) -> RunContext:
    c = ctx()
    await take_snapshots(pool, c, PARIS, 100, conversion=conv or Conversion(), sources=client)
    return c


async def values(pool: asyncpg.Pool, uid: int) -> list[Decimal]:
    rows = await pool.fetch(
        """SELECT h.value FROM holding_snapshots h JOIN bank_accounts a ON a.id = h.ref_id
            WHERE h.user_id = $1 AND h.kind = 'account' ORDER BY a.id""",
        uid,
    )
    return [r["value"] for r in rows]


async def test_pegged_currencies_and_an_unmapped_coin_are_converted_on_postgresql(
    pool: asyncpg.Pool, sandbox: tuple[RateSandbox, rates.RateSources]
) -> None:
    box, client = sandbox
    uid = await pg_user(pool, ACCOUNTS)
    c = await pg_run(pool, client)
    assert await values(pool, uid) == EXPECTED_EUR
    assert c.counts["items_unconverted"] == 0
    # one search, for the one symbol nothing else explains; the shared symbol went to the
    # best-ranked coin, and the price request asked for it
    assert box.requests["search"] == 1
    assert box.last_query["search"] == {"query": "PEPE"}
    assert "pepe" in box.last_query["crypto"]["ids"].split(",")
    stored = await pool.fetch(
        "SELECT currency, currency_amount, base_amount, source FROM kontod_rates"
        " WHERE currency IN ('XOF', 'XPF') ORDER BY 1"
    )
    assert [tuple(r) for r in stored] == [
        ("XOF", Decimal("655.957"), Decimal("1"), "fixed"),
        ("XPF", Decimal("1"), Decimal("0.00838"), "fixed"),
    ]
    cached = await pool.fetch("SELECT symbol, coin_id, market_cap_rank FROM kontod_coin_ids")
    assert [tuple(r) for r in cached] == [("PEPE", "pepe", 24)]
    # the cache: a second run asks the search nothing
    c = await pg_run(pool, client)
    assert box.requests["search"] == 1
    assert c.counts["items_unconverted"] == 0


async def test_a_pegged_currency_crosses_through_the_euro_rate_of_another_base(
    pool: asyncpg.Pool, sandbox: tuple[RateSandbox, rates.RateSources]
) -> None:
    _, client = sandbox
    uid = await pg_user(
        pool, [("checking", "100000", "XOF", None), ("savings", "1000", "BAM", None)]
    )
    await pg_run(pool, client, Conversion(base="CHF"))
    # 100000 x 0.9312 / 655.957 = 141.960524851...; 1000 x 0.9312 / 1.95583 = 476.114999769...
    assert await values(pool, uid) == [Decimal("141.96052485"), Decimal("476.11499977")]
    stored = await pool.fetchrow(
        "SELECT currency_amount, base_amount, source FROM kontod_rates"
        " WHERE base = 'CHF' AND currency = 'XOF'"
    )
    assert stored is not None
    assert tuple(stored) == (Decimal("655.957"), Decimal("0.9312"), "fixed")


async def test_a_failed_lookup_leaves_the_coin_unconverted_and_counted(
    pool: asyncpg.Pool, sandbox: tuple[RateSandbox, rates.RateSources]
) -> None:
    box, client = sandbox
    uid = await pg_user(pool, ACCOUNTS)
    box.fail("search", "http_500", times=1)
    c = await pg_run(pool, client)  # the run goes on
    assert c.counts["unconverted_PEPE"] == 1
    assert c.counts["items_unconverted"] == 1
    assert c.counts["rate_sources_failed"] == 1
    assert await pool.fetchval("SELECT count(*) FROM kontod_coin_ids") == 0
    assert len(await values(pool, uid)) == 3  # XOF, XPF and USD are in; the coin is left out
    # the next run looks it up again and converts it
    c = await pg_run(pool, client)
    assert box.requests["search"] == 2
    assert c.counts["items_unconverted"] == 0
    assert (await values(pool, uid))[2] == Decimal("11.27")


async def test_the_operators_crypto_ids_win_over_the_lookup_and_its_cache(
    pool: asyncpg.Pool, sandbox: tuple[RateSandbox, rates.RateSources]
) -> None:
    box, client = sandbox
    box.prices["based-pepe"] = {"eur": Decimal("0.0042")}
    uid = await pg_user(pool, [("investment", "1000", "PEPE", "coinbase")])
    await pg_run(pool, client)
    assert await values(pool, uid) == [Decimal("0.01127")]  # looked up and cached: "pepe"
    settings = load_settings({"HOME": "/nonexistent", "KONTOD_CRYPTO_IDS": "pepe=based-pepe"})
    override = Conversion(crypto_ids=rates.crypto_map(settings.rates.crypto_ids))
    await pg_run(pool, client, override)
    assert box.requests["search"] == 1  # nothing asked with the setting
    assert box.last_query["crypto"]["ids"] == "based-pepe"
    assert await values(pool, uid) == [Decimal("4.2")]  # 1000 x 0.0042


@pytest.fixture
async def lite_pg(empty_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """kontod's PostgreSQL for the SQLite path (its rates, its coin cache)."""
    pool = await asyncpg.create_pool(empty_dsn, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await conn.execute(WEBAPP_SCHEMA)
        await db.migrate(conn)
    yield pool
    await pool.close()


async def test_pegged_currencies_and_an_unmapped_coin_are_converted_on_sqlite(
    tmp_path: Path, lite_pg: asyncpg.Pool, sandbox: tuple[RateSandbox, rates.RateSources]
) -> None:
    box, client = sandbox
    path = webapp_konto(tmp_path / "konto.db")
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO users (id, email) VALUES (1, 'u@example.org')")
        conn.executemany(
            "INSERT INTO bank_accounts (user_id, name, type, balance, currency, provider)"
            " VALUES (1, 'a', ?, ?, ?, ?)",
            [(t, float(b), cur, p) for t, b, cur, p in ACCOUNTS],
        )
    conn.close()
    async with konto_on("sqlite", path) as konto:
        await lite_schema.create_missing(konto)
        for _ in range(2):
            await snapshots_lite.take_snapshots_lite(
                lite_pg, konto, ctx(), PARIS, 5, conversion=Conversion(), sources=client
            )
    assert box.requests["search"] == 1  # the second run found PEPE in the cache
    with sqlite3.connect(path) as conn:
        held = conn.execute(
            "SELECT value FROM holding_snapshots WHERE kind = 'account' ORDER BY ref_id"
        ).fetchall()
        total = conn.execute(
            "SELECT total_value FROM patrimoine_snapshots WHERE category = 'total'"
        ).fetchone()
    conn.close()
    assert [round(Decimal(str(v)), 2) for (v,) in held] == [
        Decimal("152.45"),
        Decimal("83.80"),
        Decimal("11.27"),
        Decimal("46.15"),
    ]
    # 152.44901724 + 83.80 + 11.27 + 46.15100609 = 293.67002333
    assert round(Decimal(str(total[0])), 2) == Decimal("293.67")
