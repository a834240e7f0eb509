"""Snapshots in one currency: rates from the sandbox sources over loopback, a real PostgreSQL."""

from __future__ import annotations

import asyncio
import decimal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from kontod import db
from kontod.config import ConfigError, load_settings
from kontod.demo.rates_sandbox import DEMO_DAY, DEMO_ECB_RATES, RateSandbox, urls
from kontod.jobs.snapshots import Conversion, take_snapshots
from kontod.providers import rates
from kontod.scheduler.contract import ClaimLost, Connection, RunContext
from tests import pg
from tests.daemon_harness import TOKEN, run_ended, running_daemon, runs_of, settings_for
from tests.helpers import PARIS, WEBAPP_SCHEMA, snapshot_rows

AT = datetime(2026, 6, 10, 0, 0, tzinfo=UTC)  # 02:00 in Paris, June 10th
DAY = date(2026, 6, 10)
USD = Decimal("1.0834")  # per EUR, as the sandbox serves it
CHF = Decimal("0.9312")
BTC_EUR = Decimal("58213.37")
BTC_CHF = Decimal("54208.3")


def convert(amount: str, base_amount: Decimal, currency_amount: Decimal) -> Decimal:
    """The conversion done by hand: exact quotient rounded once, half away from zero, to 8."""
    with decimal.localcontext(prec=80):
        exact = Decimal(amount) * base_amount / currency_amount
    return exact.quantize(Decimal("1e-8"), rounding=ROUND_HALF_UP)


@dataclass
class Sources:
    sandbox: RateSandbox
    client: rates.RateSources


@pytest.fixture
async def sources() -> AsyncIterator[Sources]:
    sandbox = RateSandbox(timeout_s=5)
    async with sandbox.serve() as root, aiohttp.ClientSession() as http:
        fiat, crypto = urls(root)
        client = rates.RateSources(
            http,
            fiat_url=fiat,
            crypto_url=crypto,
            timeout=0.5,
            attempts=2,
            backoff=0.01,
            max_backoff=0.02,
            sleep=_no_sleep,
        )
        yield Sources(sandbox, client)


async def _no_sleep(_: float) -> None:
    """Retries without waiting: the retry itself is what the tests look at."""


def ctx(at: datetime = AT) -> RunContext:
    return RunContext(
        run_id=1,
        job="daily-snapshots",
        trigger="schedule",
        scheduled_for=at,
        started_at=at,
        log=structlog.get_logger(),
    )


async def run(
    pool: asyncpg.Pool,
    client: rates.RateSources | None,
    *,
    at: datetime = AT,
    base: str = "EUR",
    max_age: int = 7,
    manual: dict[str, Decimal] | None = None,
) -> RunContext:
    c = ctx(at)
    conv = Conversion(base=base, max_age_days=max_age, manual=manual or {})
    await take_snapshots(pool, c, PARIS, 100, conversion=conv, sources=client)
    return c


async def user_with(
    pool: asyncpg.Pool,
    accounts: list[tuple[str, str, str]],
    assets: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> tuple[int, list[int], list[int]]:
    """A user with (type, balance, currency) accounts and (type, value) assets."""
    uid: int = await pool.fetchval(
        "INSERT INTO users (email) VALUES ('u' || random()::text) RETURNING id"
    )
    account_ids = [
        await pool.fetchval(
            """INSERT INTO bank_accounts (user_id, name, type, balance, currency)
               VALUES ($1, $2, $3, $4::numeric, $5) RETURNING id""",
            uid,
            f"{typ} {cur}",
            typ,
            balance,
            cur,
        )
        for typ, balance, cur in accounts
    ]
    asset_ids = [
        await pool.fetchval(
            """INSERT INTO assets (user_id, name, type, current_value)
               VALUES ($1, 'asset', $2, $3::numeric) RETURNING id""",
            uid,
            typ,
            value,
        )
        for typ, value in assets
    ]
    return uid, account_ids, asset_ids


async def holdings(pool: asyncpg.Pool, uid: int, day: Any = DAY) -> dict[str, Decimal]:
    rows = await pool.fetch(
        "SELECT holding_key, value FROM holding_snapshots WHERE user_id = $1 AND date = $2",
        uid,
        day,
    )
    return {r["holding_key"]: r["value"] for r in rows}


MIXED = [
    ("checking", "100.10", "EUR"),
    ("checking", "250.00", "USD"),
    ("savings", "1000", "CHF"),
    ("investment", "0.5", "BTC"),
    ("loan", "-1200.50", "usd"),  # the case of a stored code does not matter
]


async def test_every_balance_is_converted_before_it_is_summed(
    pool: asyncpg.Pool, sources: Sources
) -> None:
    uid, acc, assets = await user_with(pool, MIXED, [("real_estate", "200000")])
    c = await run(pool, sources.client)
    one = Decimal(1)
    usd, chf = convert("250.00", one, USD), convert("1000", one, CHF)
    btc, loan = convert("0.5", BTC_EUR, one), convert("-1200.50", one, USD)
    expected = {
        "checking": Decimal("100.10") + usd,
        "savings": chf,
        "investment": btc,
        "loan": loan,
        "real_estate": Decimal("200000"),
    }
    expected["total"] = sum(expected.values(), Decimal(0))
    assert await snapshot_rows(pool, uid, DAY) == expected
    assert await holdings(pool, uid) == {
        f"account:{acc[0]}": Decimal("100.10"),
        f"account:{acc[1]}": usd,
        f"account:{acc[2]}": chf,
        f"account:{acc[3]}": btc,
        f"account:{acc[4]}": loan,
        f"asset:{assets[0]}": Decimal("200000"),
    }
    row = await pool.fetchrow(
        "SELECT kind, ref_id, type, currency, amount FROM holding_snapshots WHERE holding_key = $1",
        f"account:{acc[3]}",
    )
    assert row is not None
    assert dict(row) == {
        "kind": "account",
        "ref_id": acc[3],
        "type": "investment",
        "currency": "BTC",
        "amount": Decimal("0.5"),
    }
    # one request per source, for the currencies in use
    assert sources.sandbox.requests == {"ecb": 1, "crypto": 1}
    assert sources.sandbox.last_query["crypto"]["ids"] == "bitcoin"
    assert sources.sandbox.last_query["crypto"]["vs_currencies"] == "eur"
    assert c.counts["items_unconverted"] == 0
    assert c.counts["rate_sources_failed"] == 0
    assert c.counts["rate_age_days_USD"] == (DAY - DEMO_DAY).days
    assert c.counts["rate_age_days_BTC"] == 0
    assert "rate_fallback_USD" not in c.counts
    stored = await pool.fetch("SELECT currency, source FROM kontod_rates ORDER BY currency")
    assert [(r["currency"], r["source"]) for r in stored] == [
        ("BTC", "crypto"),
        ("CHF", "ecb"),
        ("USD", "ecb"),
    ]


async def test_a_source_down_falls_back_to_stored_rates(
    pool: asyncpg.Pool, sources: Sources
) -> None:
    uid, acc, _ = await user_with(pool, [("checking", "250.00", "USD"), ("investment", "2", "BTC")])
    await run(pool, sources.client, at=AT - timedelta(days=2))
    sources.sandbox.fail("ecb", "http_503")
    sources.sandbox.fail("crypto", "garbage")
    c = await run(pool, sources.client)
    assert await holdings(pool, uid) == {
        f"account:{acc[0]}": convert("250.00", Decimal(1), USD),
        f"account:{acc[1]}": convert("2", BTC_EUR, Decimal(1)),
    }
    assert c.counts["rate_sources_failed"] == 2
    assert c.counts["rate_fallback_USD"] == 1
    assert c.counts["rate_fallback_BTC"] == 1
    assert c.counts["rate_age_days_USD"] == 1  # the ECB's June 9th file, stored on June 8th
    assert c.counts["rate_age_days_BTC"] == 2
    assert c.counts["items_unconverted"] == 0
    # a 503 is retried, a body that does not parse is not
    assert sources.sandbox.requests == {"ecb": 1 + 2, "crypto": 1 + 1}


async def test_no_usable_rate_leaves_the_account_out_and_counts_it(
    pool: asyncpg.Pool, sources: Sources
) -> None:
    uid, acc, assets = await user_with(
        pool,
        [("checking", "10", "EUR"), ("checking", "250", "USD"), ("savings", "5", "USD")],
        [("vehicle", "1000")],
    )
    other, other_acc, _ = await user_with(pool, [("investment", "1", "XYZ")])
    sources.sandbox.fail("ecb", "timeout")
    c = await run(pool, sources.client)
    assert await snapshot_rows(pool, uid, DAY) == {
        "checking": Decimal("10"),
        "vehicle": Decimal("1000"),
        "total": Decimal("1010"),
    }
    assert set(await holdings(pool, uid)) == {f"account:{acc[0]}", f"asset:{assets[0]}"}
    assert await snapshot_rows(pool, other, DAY) == {"total": Decimal("0")}
    assert await holdings(pool, other) == {}
    assert c.counts["items_unconverted"] == 3
    assert c.counts["unconverted_USD"] == 2
    assert c.counts["unconverted_XYZ"] == 1
    assert c.counts["rate_sources_failed"] == 1
    assert "rate_age_days_USD" not in c.counts
    assert other_acc


async def test_a_rate_older_than_the_maximum_age_is_not_used(pool: asyncpg.Pool) -> None:
    uid, acc, _ = await user_with(pool, [("checking", "100", "USD"), ("checking", "1", "EUR")])
    await pool.execute(
        """INSERT INTO kontod_rates (base, currency, day, currency_amount, base_amount, source)
           VALUES ('EUR', 'USD', $1, 1.25, 1, 'ecb')""",
        DAY - timedelta(days=8),
    )
    c = await run(pool, None, max_age=7)
    assert await snapshot_rows(pool, uid, DAY) == {"checking": Decimal(1), "total": Decimal(1)}
    assert c.counts["unconverted_USD"] == 1
    assert c.counts["rate_age_days_USD"] == 8
    c = await run(pool, None, max_age=8)
    assert await snapshot_rows(pool, uid, DAY) == {"checking": Decimal(81), "total": Decimal(81)}
    assert c.counts["items_unconverted"] == 0
    # a rate dated after the snapshot is not used either
    await pool.execute("DELETE FROM kontod_rates")
    await pool.execute(
        """INSERT INTO kontod_rates (base, currency, day, currency_amount, base_amount, source)
           VALUES ('EUR', 'USD', $1, 1.25, 1, 'ecb')""",
        DAY + timedelta(days=1),
    )
    c = await run(pool, None)
    assert c.counts["unconverted_USD"] == 1
    assert acc


async def test_another_base_currency_uses_cross_rates_through_the_euro(
    pool: asyncpg.Pool, sources: Sources
) -> None:
    uid, acc, assets = await user_with(
        pool,
        [
            ("checking", "100", "EUR"),
            ("checking", "250", "USD"),
            ("savings", "1000", "CHF"),
            ("investment", "0.5", "BTC"),
        ],
        [("valuable", "300")],  # assets are in the base currency
    )
    c = await run(pool, sources.client, base="CHF")
    eur = convert("100", CHF, Decimal(1))
    usd = convert("250", CHF, USD)
    btc = convert("0.5", BTC_CHF, Decimal(1))
    assert await holdings(pool, uid) == {
        f"account:{acc[0]}": eur,
        f"account:{acc[1]}": usd,
        f"account:{acc[2]}": Decimal("1000"),
        f"account:{acc[3]}": btc,
        f"asset:{assets[0]}": Decimal("300"),
    }
    assert (await snapshot_rows(pool, uid, DAY))["total"] == eur + usd + 1000 + btc + 300
    assert sources.sandbox.last_query["crypto"]["vs_currencies"] == "chf"
    assert c.counts["items_unconverted"] == 0
    # rates kept for one base are never used for another
    c = await run(pool, None, base="GBP")
    assert c.counts["items_unconverted"] == 4


async def test_manual_rates_cover_what_no_source_knows(
    pool: asyncpg.Pool, sources: Sources
) -> None:
    uid, acc, _ = await user_with(pool, [("investment", "2", "XAU"), ("checking", "1", "USD")])
    c = await run(pool, sources.client, manual={"XAU": Decimal("2210.55"), "USD": Decimal("0.9")})
    assert await holdings(pool, uid) == {
        f"account:{acc[0]}": Decimal("4421.10"),
        f"account:{acc[1]}": Decimal("0.9"),  # the manual rate wins over the source
    }
    assert sources.sandbox.requests["ecb"] == 0
    assert c.counts["items_unconverted"] == 0


async def test_rerun_after_an_account_is_deleted_and_a_rerun_writes_nothing(
    pool: asyncpg.Pool, sources: Sources
) -> None:
    uid, acc, _ = await user_with(
        pool, [("checking", "100", "EUR"), ("savings", "250", "USD"), ("checking", "3", "CHF")]
    )
    first = await run(pool, sources.client)
    assert first.counts["holdings_written"] == 3
    await pool.execute("DELETE FROM bank_accounts WHERE id = $1", acc[1])
    c = await run(pool, sources.client)
    rows = await snapshot_rows(pool, uid, DAY)
    chf = convert("3", Decimal(1), CHF)
    assert rows == {"checking": Decimal(100) + chf, "total": Decimal(100) + chf}
    assert await holdings(pool, uid) == {
        f"account:{acc[0]}": Decimal(100),
        f"account:{acc[2]}": chf,
    }
    assert sum((await holdings(pool, uid)).values()) == rows["total"]
    assert (c.counts["holdings_removed"], c.counts["rows_removed"]) == (1, 1)
    assert c.counts["rows_written"] == 1  # the total; checking did not change
    # nothing changed since: nothing is written, no row version is created
    before = await pool.fetchval("SELECT array_agg(xmin::text ORDER BY id) FROM holding_snapshots")
    again = await run(pool, sources.client)
    counts = {k: again.counts[k] for k in ("rows_written", "rows_removed", "holdings_written")}
    assert counts == {"rows_written": 0, "rows_removed": 0, "holdings_written": 0}
    assert again.counts["rows_unchanged"] == 2
    assert again.counts["holdings_unchanged"] == 2
    assert again.counts["rates_stored"] == 0
    after = await pool.fetchval("SELECT array_agg(xmin::text ORDER BY id) FROM holding_snapshots")
    assert before == after


COLUMN_TYPES_SQL = """
SELECT table_name::text, column_name::text, data_type::text, column_default::text,
       is_nullable::text
  FROM information_schema.columns
 WHERE table_schema = current_schema() AND table_name IN
       ('users', 'bank_accounts', 'assets', 'patrimoine_snapshots', 'holding_snapshots')
 ORDER BY 1, 2
"""


async def test_konto_web_app_schema_is_read_and_written_in_its_own_types(
    empty_pool: asyncpg.Pool, sources: Sources
) -> None:
    pool = empty_pool
    await pool.execute(WEBAPP_SCHEMA)
    before = [tuple(r) for r in await pool.fetch(COLUMN_TYPES_SQL)]
    # Every migration: Konto's tables are left as the web app made them.
    async with pool.acquire() as conn:
        await db.migrate(conn)
    assert [tuple(r) for r in await pool.fetch(COLUMN_TYPES_SQL)] == before
    uid: int = await pool.fetchval(
        "INSERT INTO users (email) VALUES ('w@example.org') RETURNING id"
    )
    ids = [
        await pool.fetchval(
            """INSERT INTO bank_accounts (user_id, name, type, balance, hidden, currency)
               VALUES ($1, 'a', $2, $3, $4, $5) RETURNING id""",
            uid,
            typ,
            balance,
            hidden,
            cur,
        )
        for typ, balance, hidden, cur in [
            ("checking", 100.1, 0, "EUR"),
            ("checking", 250.0, 0, "USD"),
            ("savings", 999.0, 1, "EUR"),  # hidden, as the web app flags it
            ("investment", 0.5, 0, "BTC"),
            ("checking", 7.0, 0, None),  # no currency: Konto's default, EUR
        ]
    ]
    await pool.execute(
        "INSERT INTO assets (user_id, type, purchase_price, current_value) VALUES ($1, 'vehicle', 18000, NULL)",
        uid,
    )
    c = await run(pool, sources.client)
    usd = convert("250", Decimal(1), USD)
    btc = convert("0.5", BTC_EUR, Decimal(1))
    rows = await pool.fetch(
        "SELECT date, category, total_value FROM patrimoine_snapshots WHERE user_id = $1", uid
    )
    assert {r["date"] for r in rows} == {"2026-06-10"}
    got = {r["category"]: r["total_value"] for r in rows}
    checking = Decimal("107.1") + usd
    assert got == {
        "checking": float(checking),
        "investment": float(btc),
        "vehicle": 18000.0,
        "total": float(checking + btc + 18000),
    }
    held = await pool.fetch(
        "SELECT date, holding_key, kind, ref_id, value FROM holding_snapshots WHERE user_id = $1",
        uid,
    )
    assert {r["date"] for r in held} == {"2026-06-10"}
    assert {r["holding_key"]: r["value"] for r in held} == {
        f"account:{ids[0]}": 100.1,
        f"account:{ids[1]}": float(usd),
        f"account:{ids[3]}": float(btc),
        f"account:{ids[4]}": 7.0,
        "asset:1": 18000.0,
    }
    assert c.counts["holdings_written"] == 5
    # a re-run of the day finds every row right and writes nothing
    again = await run(pool, sources.client)
    assert (again.counts["rows_written"], again.counts["holdings_written"]) == (0, 0)
    assert again.counts["rows_unchanged"] == 4
    assert [tuple(r) for r in await pool.fetch(COLUMN_TYPES_SQL)] == before


async def test_a_column_type_the_snapshot_cannot_write_is_named(
    admin_dsn: str, template_ready: str
) -> None:
    name = await pg.create_database(admin_dsn, template=template_ready)
    try:
        conn = await asyncpg.connect(pg.with_database(admin_dsn, name))
        try:
            await conn.execute("ALTER TABLE holding_snapshots ALTER COLUMN value TYPE text")
            pool_dsn = pg.with_database(admin_dsn, name)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(pool_dsn, min_size=1, max_size=2)
        assert pool is not None
        try:
            with pytest.raises(Exception, match=r"holding_snapshots.value has type text"):
                await run(pool, None)
        finally:
            await pool.close()
    finally:
        await pg.drop_database(admin_dsn, name)


async def test_sources_retry_rate_limits_and_name_what_failed(sources: Sources) -> None:
    sources.sandbox.fail("crypto", "rate_limit", times=1)
    prices = await sources.client.crypto(["bitcoin", "unknown-coin"], "eur")
    assert prices == {"bitcoin": BTC_EUR}
    assert sources.sandbox.requests["crypto"] == 2
    sources.sandbox.fail("crypto", "rate_limit")
    with pytest.raises(rates.RateSourceError, match=r"crypto: HTTP 429 \(429: You've exceeded"):
        await sources.client.crypto(["bitcoin"], "eur")
    sources.sandbox.fail("ecb", "http_404")
    with pytest.raises(rates.RateSourceError, match=r"ecb: HTTP 404$"):
        await sources.client.ecb()
    sources.sandbox.fail("ecb", "garbage")
    with pytest.raises(rates.RateSourceError, match="ecb: the answer has no <Cube time"):
        await sources.client.ecb()
    sources.sandbox.fail("ecb", "timeout")
    with pytest.raises(rates.RateSourceError, match=r"ecb: no answer within 0.5 s after 2"):
        await sources.client.ecb()


def test_ecb_file_parsing() -> None:
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
<gesmes:Envelope xmlns:gesmes="http://www.gesmes.org/xml/2002-08-01"
 xmlns="http://www.ecb.int/vocabulary/2002-08-01/eurofxref">
  <gesmes:subject>Reference rates</gesmes:subject>
  <Cube><Cube time='2024-06-28'><Cube currency='USD' rate='1.0705'/>
  <Cube currency='JPY' rate='171.94'/></Cube>
  <Cube time='2024-06-27'><Cube currency='USD' rate='1.0700'/></Cube></Cube>
</gesmes:Envelope>"""
    assert rates.parse_ecb(body) == {
        date(2024, 6, 28): {"USD": Decimal("1.0705"), "JPY": Decimal("171.94")},
        date(2024, 6, 27): {"USD": Decimal("1.0700")},
    }
    for bad, message in [
        (
            b"<Cube><Cube time='2024-06-28'><Cube currency='USD' rate='-1'/></Cube></Cube>",
            "not a positive",
        ),
        (b"<Cube><Cube time='28/06/2024'/></Cube>", "bad date"),
        (b"not xml", "not XML"),
    ]:
        with pytest.raises(rates.RateSourceError, match=message):
            rates.parse_ecb(bad)


def test_cross_rates_and_classification() -> None:
    days = {date(2026, 1, 2): {"USD": Decimal("1.1"), "CHF": Decimal("0.93")}}
    quotes = rates.fiat_quotes(days, "CHF", ["USD", "EUR", "ARS"])
    assert [(q.currency, q.currency_amount, q.base_amount) for q in quotes] == [
        ("USD", Decimal("1.1"), Decimal("0.93")),
        ("EUR", Decimal(1), Decimal("0.93")),
    ]
    assert rates.fiat_quotes(days, "GBP", ["USD"]) == []  # the file has no GBP
    fiat, crypto = rates.split_sources(
        ["EUR", "USD", "BTC", "XYZW", "CHF"], "CHF", {"BTC": "bitcoin"}
    )
    assert (fiat, crypto) == (["EUR", "USD"], ["BTC"])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KONTOD_BASE_CURRENCY": "EURO"},
            "invalid KONTOD_BASE_CURRENCY='EURO': expected an ISO 4217",
        ),
        (
            {"KONTOD_RATE_MAX_AGE": "12h"},
            "invalid KONTOD_RATE_MAX_AGE='12h': expected a whole number of days",
        ),
        ({"KONTOD_FIAT_RATES_URL": "ftp://x"}, "invalid KONTOD_FIAT_RATES_URL='ftp://x'"),
        ({"KONTOD_CRYPTO_IDS": "BTC"}, "invalid KONTOD_CRYPTO_IDS='BTC': expected SYMBOL=id"),
        ({"KONTOD_MANUAL_RATES": "XAU=-2"}, "invalid KONTOD_MANUAL_RATES='XAU=-2'"),
        ({"KONTOD_MANUAL_RATES": "XAU=1e13"}, "invalid KONTOD_MANUAL_RATES='XAU=1e13'"),
    ],
)
def test_bad_rate_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"HOME": "/nonexistent", "KONTOD_TIMEZONE": "UTC", **env})
    assert str(err.value).startswith(message)


def test_rate_settings() -> None:
    s = load_settings(
        {
            "HOME": "/nonexistent",
            "KONTOD_BASE_CURRENCY": "chf",
            "KONTOD_RATE_MAX_AGE": "3d",
            "KONTOD_CRYPTO_IDS": "xbt=bitcoin, ETH=ethereum",
            "KONTOD_MANUAL_RATES": "XAU=2210.50",
        }
    )
    assert (s.rates.base_currency, s.rates.max_age_days) == ("CHF", 3)
    assert s.rates.crypto_ids == {"XBT": "bitcoin", "ETH": "ethereum"}
    assert s.rates.manual == {"XAU": Decimal("2210.50")}
    assert rates.crypto_map(s.rates.crypto_ids)["XBT"] == "bitcoin"
    assert load_settings({"HOME": "/nonexistent"}).rates.base_currency == "EUR"


async def test_metrics_export_unconverted_accounts_and_rate_ages(dsn: str) -> None:
    sandbox = RateSandbox(timeout_s=5)
    sandbox.fail("ecb", "http_500")
    async with sandbox.serve() as root:
        fiat, crypto = urls(root)
        settings = settings_for(
            dsn,
            rates={"fiat_url": fiat, "crypto_url": crypto},
            providers={"timeout": timedelta(seconds=1), "attempts": 1},
        )
        async with running_daemon(settings) as (daemon, base):
            assert daemon.pool is not None
            await user_with(daemon.pool, [("checking", "5", "USD"), ("investment", "1", "BTC")])
            # The quiet schedule: no run of the day's tick holds the job.
            assert await runs_of(daemon.pool, "daily-snapshots") == []
            async with aiohttp.ClientSession() as http:
                auth = {"Authorization": f"Bearer {TOKEN}"}
                async with http.post(f"{base}/jobs/daily-snapshots/run", headers=auth) as resp:
                    assert resp.status == 202
                    run_id = (await resp.json())["runId"]
                assert await run_ended(daemon, "daily-snapshots", run_id) == "success"
                await daemon._refresh_stats()
                async with http.get(f"{base}/metrics") as resp:
                    text = await resp.text()
    found = {
        (s.name, s.labels.get("currency")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("kontod_snapshot_")
    }
    assert found[("kontod_snapshot_unconverted_accounts", "USD")] == 1
    assert found[("kontod_snapshot_rate_age_seconds", "BTC")] == 0
    assert ("kontod_snapshot_rate_age_seconds", "USD") not in found
    assert 'kontod_job_items_total{job_name="daily-snapshots",outcome="unconverted"}' in text


async def test_a_run_that_lost_its_claim_writes_nothing(
    pool: asyncpg.Pool, sources: Sources
) -> None:
    await user_with(pool, [("checking", "1", "USD")])
    c = ctx()
    checks = 0

    async def fence(conn: Connection) -> None:
        nonlocal checks
        checks += 1
        assert conn.is_in_transaction()
        if checks == 2:  # the rates are written, then the first batch finds the claim gone
            raise ClaimLost("taken over")

    c.fence = fence
    with pytest.raises(ClaimLost):
        await take_snapshots(pool, c, PARIS, 100, sources=sources.client)
    assert await pool.fetchval("SELECT count(*) FROM patrimoine_snapshots") == 0
    assert await pool.fetchval("SELECT count(*) FROM holding_snapshots") == 0
    assert (c.progress_done, c.progress_expected) == (0, 1)


async def test_the_price_api_key_goes_in_its_header_and_never_in_an_error() -> None:
    sandbox = RateSandbox(api_key="cg-secret-123")
    async with sandbox.serve() as root, aiohttp.ClientSession() as http:
        fiat, crypto = urls(root)

        def client(key: str | None) -> rates.RateSources:
            return rates.RateSources(
                http, fiat_url=fiat, crypto_url=crypto, attempts=3, api_key=key, sleep=_no_sleep
            )

        with pytest.raises(rates.RateSourceError, match=r"HTTP 401 \(10002: API Key Missing\)"):
            await client(None).crypto(["bitcoin"], "eur")
        with pytest.raises(rates.RateSourceError) as err:
            await client("cg-wrong-456").crypto(["bitcoin"], "eur")
        assert "10011" in str(err.value) and "cg-wrong-456" not in str(err.value)
        assert sandbox.requests["crypto"] == 2  # a 401 is not retried
        assert await client("cg-secret-123").crypto(["bitcoin"], "eur") == {"bitcoin": BTC_EUR}
    settings = load_settings({"HOME": "/nonexistent", "KONTOD_CRYPTO_API_KEY": " cg-secret-123 "})
    assert settings.rates.crypto_api_key == "cg-secret-123"
    assert "cg-secret-123" not in repr(settings)


# Hostile answers and implausible rates.

MiB = 1024 * 1024


async def test_an_ecb_file_sent_in_two_writes_300_ms_apart_is_read_whole(
    sources: Sources,
) -> None:
    sources.sandbox.fail("ecb", "split", pause=0.3)

    days = await sources.client.ecb()

    assert days == {DEMO_DAY: DEMO_ECB_RATES}


async def test_a_large_history_file_is_read_whole(sources: Sources) -> None:
    sources.sandbox.ecb_history_days = 2000
    async with aiohttp.ClientSession() as http, http.get(sources.client.fiat_url) as resp:
        size = len(await resp.read())
    assert 400_000 < size < 2 * MiB

    days = await sources.client.ecb()

    assert len(days) == 2001
    assert days[DEMO_DAY - timedelta(days=2000)] == DEMO_ECB_RATES


@pytest.mark.parametrize("kind", ["oversized", "endless"])
async def test_a_body_over_the_cap_is_refused_and_reading_stops_there(
    sources: Sources, kind: str
) -> None:
    sources.sandbox.fail("ecb", kind, size=64 * MiB)

    with pytest.raises(rates.RateSourceError) as caught:
        await sources.client.ecb()

    assert str(caught.value) == (
        "ecb: the answer is larger than 2097152 bytes (2 MiB);"
        " KONTOD_PROVIDER_MAX_BODY sets the limit"
    )
    assert sources.sandbox.requests["ecb"] == 1
    for _ in range(500):
        if sources.sandbox.streamed:
            break
        await asyncio.sleep(0.01)
    assert sources.sandbox.streamed[0] < 24 * MiB


async def test_the_cap_follows_the_setting(sources: Sources) -> None:
    sources.sandbox.ecb_history_days = 2000
    async with aiohttp.ClientSession() as http:
        client = rates.RateSources(
            http, fiat_url=sources.client.fiat_url, crypto_url="", max_body=64 * 1024
        )
        with pytest.raises(rates.RateSourceError, match=r"larger than 65536 bytes \(64 KiB\)"):
            await client.ecb()


@pytest.mark.parametrize("kind", ["deep", "control", "oversized"])
async def test_a_hostile_price_answer_falls_back_to_stored_rates(
    pool: asyncpg.Pool, sources: Sources, kind: str
) -> None:
    uid, acc, _ = await user_with(pool, [("investment", "2", "BTC")])
    await run(pool, sources.client, at=AT - timedelta(days=2))
    sources.sandbox.fail("crypto", kind, size=8 * MiB)

    c = await run(pool, sources.client)

    assert await holdings(pool, uid) == {f"account:{acc[0]}": convert("2", BTC_EUR, Decimal(1))}
    assert c.counts["rate_sources_failed"] == 1
    assert c.counts["rate_fallback_BTC"] == 1
    assert c.counts["items_unconverted"] == 0


async def test_deep_xml_from_the_ecb_is_a_failed_source(sources: Sources) -> None:
    sources.sandbox.fail("ecb", "deep")

    with pytest.raises(rates.RateSourceError, match="ecb: the answer has no <Cube time"):
        await sources.client.ecb()


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        ("8M", 8 * MiB),
        ("512k", 512 * 1024),
        ("2MiB", 2 * MiB),
        ("1048576", MiB),
        ("1G", 1024 * MiB),
    ],
)
def test_the_body_cap_setting(raw: str, size: int) -> None:
    assert (
        load_settings({"HOME": "/nonexistent", "KONTOD_PROVIDER_MAX_BODY": raw}).providers.max_body
        == size
    )
    assert load_settings({"HOME": "/nonexistent"}).providers.max_body is None


@pytest.mark.parametrize("raw", ["0", "100", "8 PB", "-1M", "2G", "lots"])
def test_a_bad_body_cap_is_named(raw: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"HOME": "/nonexistent", "KONTOD_PROVIDER_MAX_BODY": raw})
    assert str(err.value).startswith(f"invalid KONTOD_PROVIDER_MAX_BODY={raw!r}: expected a size")


@pytest.mark.parametrize(
    "price", ["1e400", "1e200000", "1e300", "1e13", "1e-13", "NaN", "Infinity"]
)
async def test_an_implausible_price_is_never_stored_and_counts_as_a_failed_source(
    pool: asyncpg.Pool, sources: Sources, price: str
) -> None:
    uid, acc, _ = await user_with(pool, [("investment", "2", "BTC"), ("checking", "1", "USD")])
    sources.sandbox.prices["bitcoin"]["eur"] = price

    c = await run(pool, sources.client)

    stored = await pool.fetch("SELECT currency FROM kontod_rates ORDER BY currency")
    assert [r["currency"] for r in stored] == ["USD"]
    assert c.counts["rate_sources_failed"] == 1
    assert c.counts["unconverted_BTC"] == 1
    assert set(await holdings(pool, uid)) == {f"account:{acc[1]}"}


async def test_an_implausible_ecb_rate_is_refused_and_the_others_kept(
    pool: asyncpg.Pool, sources: Sources
) -> None:
    await user_with(pool, [("checking", "1", "USD"), ("checking", "1", "CHF")])
    sources.sandbox.ecb_rates["USD"] = "1e400"

    with capture_logs() as logs:
        c = await run(pool, sources.client)

    stored = await pool.fetch("SELECT currency FROM kontod_rates ORDER BY currency")
    assert [r["currency"] for r in stored] == ["CHF"]
    assert c.counts["rate_sources_failed"] == 1
    [refused] = [e for e in logs if e["event"] == "rates.refused"]
    assert (refused["source"], refused["currency"]) == ("ecb", "USD")
    assert "outside [1e-12, 1e12]" in refused["why"]


async def test_a_price_a_thousand_times_off_the_last_stored_one_is_refused(
    pool: asyncpg.Pool, sources: Sources
) -> None:
    uid, acc, _ = await user_with(pool, [("investment", "2", "BTC")])
    await run(pool, sources.client, at=AT - timedelta(days=2))
    sources.sandbox.prices["bitcoin"]["eur"] = BTC_EUR * 1001

    c = await run(pool, sources.client)

    assert c.counts["rate_sources_failed"] == 1
    assert c.counts["rate_fallback_BTC"] == 1
    assert await holdings(pool, uid) == {f"account:{acc[0]}": convert("2", BTC_EUR, Decimal(1))}

    # Within the factor, it is taken.
    sources.sandbox.prices["bitcoin"]["eur"] = BTC_EUR * 999
    c = await run(pool, sources.client)
    assert c.counts["rate_sources_failed"] == 0
    assert await holdings(pool, uid) == {
        f"account:{acc[0]}": convert("2", BTC_EUR * 999, Decimal(1))
    }


@pytest.mark.parametrize("bad", ["'NaN'", "'Infinity'", "1e400", "1e-400"])
async def test_a_stored_rate_out_of_range_is_passed_over(
    pool: asyncpg.Pool, sources: Sources, bad: str
) -> None:
    await user_with(pool, [("investment", "2", "BTC")])
    await pool.execute(
        f"""INSERT INTO kontod_rates (base, currency, day, currency_amount, base_amount, source)
            VALUES ('EUR', 'BTC', $1, 1, 58000, 'crypto'),
                   ('EUR', 'BTC', $2, 1, {bad}::numeric, 'crypto')""",
        DAY - timedelta(days=3),
        DAY - timedelta(days=1),
    )
    sources.sandbox.fail("crypto", "http_404")

    report = await rates.update(
        pool,
        sources.client,
        base="EUR",
        day=DAY,
        max_age_days=7,
        crypto_ids=rates.SHIPPED_CRYPTO_IDS,
        manual={},
        now=AT,
        log=structlog.get_logger(),
        before_write=_nothing,
    )

    assert report.currencies["BTC"].day == DAY - timedelta(days=3)
    assert report.currencies["BTC"].usable
    # The bad row is not what a new price is held to either.
    async with pool.acquire() as conn:
        assert await rates.last_rates(conn, "EUR", ["BTC"], DAY) == {"BTC": Decimal(58000)}


async def _nothing(_: Connection) -> None:
    pass


def test_store_refuses_what_is_not_plausible() -> None:
    quote = rates.Quote("BTC", DAY, Decimal(1), Decimal("1e200000"), "crypto")
    assert rates.implausible(quote) == "its base amount 1E+200000 is outside [1e-12, 1e12]"
    assert rates.implausible(rates.Quote("X", DAY, Decimal(1), Decimal("NaN"), "manual"))
    assert rates.implausible(rates.Quote("X", DAY, Decimal(1), Decimal(5), "ecb"), Decimal("0.004"))
    assert (
        rates.implausible(rates.Quote("X", DAY, Decimal(1), Decimal(5), "ecb"), Decimal(4)) is None
    )
