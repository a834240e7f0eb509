"""daily-snapshots on a Konto kept in the web app's SQLite file: the rows the PostgreSQL path
writes for the same data, to the last digit, through a real run with a real claim."""

from __future__ import annotations

import math
import random
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
from structlog.testing import capture_logs

from kontod import db
from kontod.jobs import SNAPSHOTS, pg_numeric, snapshots_lite
from kontod.jobs import snapshots as snapshots_job
from kontod.konto import lite_schema
from kontod.konto.store import Fence, KontoSql
from kontod.providers import rates
from kontod.scheduler.contract import ClaimLost, Connection, RunContext
from kontod.scheduler.runner import Started
from tests.helpers import PARIS, WEBAPP_SCHEMA, close, runner_on, spec, webapp_konto
from tests.konto_engines import ENGINES, konto_on


def quotes(day: date) -> list[rates.Quote]:
    """Rates in kontod's PostgreSQL: awkward figures, so that every rounding rule is at work."""
    return [
        rates.Quote("USD", day, Decimal("1.0834"), Decimal("1"), rates.ECB),
        rates.Quote("CHF", day, Decimal("0.9312"), Decimal("1"), rates.ECB),
        rates.Quote("JPY", day - timedelta(days=2), Decimal("162.37"), Decimal("1"), rates.ECB),
        rates.Quote("BTC", day, Decimal("1"), Decimal("61234.567891234"), rates.CRYPTO),
        rates.Quote("GBP", day - timedelta(days=30), Decimal("0.86"), Decimal("1"), rates.ECB),
    ]


KONTO_TABLES = [
    "users",
    "companies",
    "bank_accounts",
    "bank_connections",
    "transactions",
    "investments",
    "assets",
    "patrimoine_snapshots",
    "loan_details",
    "audit_log",
    "user_preferences",
    "holding_snapshots",
    "kontod_fence",
]


@dataclass(frozen=True)
class Account:
    id: int
    user_id: int
    type: str | None
    currency: str | None
    balance: float | None
    hidden: int | None = 0
    name: str = "account"
    custom_name: str | None = None


@dataclass(frozen=True)
class Asset:
    id: int
    user_id: int
    type: str
    purchase_price: float | None
    current_value: float | None
    name: str = "asset"
    address: str | None = None


class Counts:
    """A run observer that keeps the counts of each run that ended."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, Counter[str]]] = []

    def run_started(self, ctx: RunContext) -> None:
        pass

    def run_ended(self, ctx: RunContext, status: str, error: str | None, duration_s: float) -> None:
        self.runs.append((status, Counter(ctx.counts)))


@pytest.fixture
async def pg(empty_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """kontod's PostgreSQL, holding Konto's tables with the web app's types too (the PG path)."""
    pool = await asyncpg.create_pool(empty_dsn, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await conn.execute(WEBAPP_SCHEMA)
        await db.migrate(conn)
        # The runs are manual: their date is today's in Paris (GBP's rate is too old then).
        await rates.store(conn, "EUR", quotes(datetime.now(PARIS).date()), datetime.now(UTC))
    yield pool
    await pool.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Konto's SQLite file, made with the web app's own table definitions."""
    return webapp_konto(tmp_path / "konto.db")


@pytest.fixture(params=ENGINES)
async def konto(path: Path, request: pytest.FixtureRequest) -> AsyncIterator[KontoSql]:
    """The file through each engine in turn: itself, and behind a libSQL (Hrana) server."""
    async with konto_on(str(request.param), path) as store:
        await lite_schema.create_missing(store)
        yield store


# (name, custom_name or address): the web app's name is NOT NULL; '' falls through as NULL.
_NAMES = [("n", None), ("n", ""), ("n", "mine"), ("", None), ("", ""), ("", "mine")]


def sample(seed: int = 19) -> tuple[list[int], list[Account], list[Asset]]:
    """Users with accounts in several currencies (one with no rate, one with a stale rate),
    balances that are not numbers, hidden NULL and 1, assets valued each way, awkward floats."""
    rng = random.Random(seed)
    users = list(range(1, 41))
    accounts, assets = [], []
    currencies = ["EUR", "USD", " usd ", "CHF", "JPY", "BTC", "XYZ", "GBP", "", None]
    types = ["checking", "savings", "loan", "investment", None, ""]
    n = 0
    for uid in users:
        for _ in range(rng.randint(0, 6)):
            n += 1
            balance = rng.choice(
                [
                    round(rng.uniform(-5000, 50000), 2),
                    rng.uniform(-1e6, 1e6),
                    0.1,
                    0.0,
                    -0.0,
                    1e-7,
                    3.3333333333333335,
                    123456789.12345679,
                    None,
                ]
            )
            hidden = rng.choice([0, 0, 0, 1, None])
            name, custom = rng.choice(_NAMES)
            accounts.append(
                Account(
                    n, uid, rng.choice(types), rng.choice(currencies), balance, hidden, name, custom
                )
            )
    n = 0
    for uid in users[::3]:
        for typ in ("real_estate", "vehicle", "other"):
            n += 1
            assets.append(
                Asset(
                    n,
                    uid,
                    typ,
                    rng.choice([None, round(rng.uniform(1e3, 1e6), 2)]),
                    rng.choice([None, 0.0, round(rng.uniform(1e3, 1e6), 2), 0.30000000000000004]),
                    *rng.choice(_NAMES),
                )
            )
    # Values that are not numbers, and a user whose converted balance no float holds.
    accounts += [
        Account(9001, 2, "checking", "EUR", math.inf),
        Account(9002, 3, "savings", "USD", -math.inf),
        Account(9003, 5, "checking", "BTC", 1e308),  # x 61 234 EUR: beyond a float
        Account(9004, 5, "savings", "EUR", 10.0),
        # Categories that cancel out, and an account type named like the total row.
        Account(9007, 6, "savings", "EUR", 100.0),
        Account(9008, 6, "savings", "EUR", -100.0),
        Account(9009, 6, "total", "EUR", 12.5),
        # Two balances a float holds, whose sum it does not; a subnormal one.
        Account(9010, 9, "savings", "EUR", 1.5e308),
        Account(9011, 9, "savings", "EUR", 1.5e308),
        Account(9012, 10, "checking", "EUR", 5e-324),
    ]
    assets.append(Asset(9005, 7, "valuable", 5.0, math.inf))
    assets.append(Asset(9006, 7, "other", math.inf, None))
    return users, accounts, assets


async def fill(konto_path: Path, pool: asyncpg.Pool, data: Any) -> None:
    """The same rows in the SQLite file and in PostgreSQL (as SQLite keeps them: read back)."""
    users, accounts, assets = data
    with sqlite3.connect(konto_path) as conn:
        conn.executemany(
            "INSERT INTO users (id, email) VALUES (?, ?)", [(u, f"u{u}@example.org") for u in users]
        )
        conn.executemany(
            "INSERT INTO bank_accounts"
            " (id, user_id, name, custom_name, type, currency, balance, hidden)"
            " VALUES (?, ?, ?, ?, coalesce(?, 'checking'), ?, ?, ?)",
            [
                (a.id, a.user_id, a.name, a.custom_name, a.type, a.currency, a.balance, a.hidden)
                for a in accounts
            ],
        )
        conn.executemany(
            "INSERT INTO assets (id, user_id, name, address, type, purchase_price, current_value)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (s.id, s.user_id, s.name, s.address, s.type, s.purchase_price, s.current_value)
                for s in assets
            ],
        )
        stored_accounts = conn.execute(
            "SELECT id, user_id, name, custom_name, type, currency, balance, hidden"
            " FROM bank_accounts"
        ).fetchall()
        stored_assets = conn.execute(
            "SELECT id, user_id, name, address, type, purchase_price, current_value FROM assets"
        ).fetchall()
    conn.close()
    async with pool.acquire() as pg:
        await pg.executemany(
            "INSERT INTO users (id, email) VALUES ($1, $2)",
            [(u, f"u{u}@example.org") for u in users],
        )
        await pg.executemany(
            "INSERT INTO bank_accounts"
            " (id, user_id, name, custom_name, type, currency, balance, hidden)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            stored_accounts,
        )
        await pg.executemany(
            "INSERT INTO assets (id, user_id, name, address, type, purchase_price, current_value)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            stored_assets,
        )


async def run_lite(dsn: str, pool: asyncpg.Pool, konto: KontoSql, batch: int = 7) -> Counter[str]:
    """One manual run of the SQLite path through a runner, with its claim and lease."""
    counts = Counter[str]()
    observer = Counts()
    body = snapshots_job.make_body(pool, PARIS, batch, workers=2, konto=konto)
    runner, _ = await runner_on(dsn, [spec(SNAPSHOTS, body)], observers=[observer])
    try:
        await runner.prepare()
        outcome = await runner.trigger(SNAPSHOTS, "manual")
        assert isinstance(outcome, Started)
        assert await outcome.task == "success"
    finally:
        await close(runner)
    [(status, counts)] = observer.runs
    assert status == "success"
    return counts


async def run_pg(pool: asyncpg.Pool, at: datetime, batch: int = 7) -> Counter[str]:
    ctx = RunContext(
        run_id=1,
        job=SNAPSHOTS,
        trigger="manual",
        scheduled_for=None,
        started_at=at,
        log=structlog.get_logger(),
    )
    await snapshots_job.take_snapshots(pool, ctx, PARIS, batch, workers=2)
    return ctx.counts


def lite_rows(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT date, user_id, category, total_value FROM patrimoine_snapshots ORDER BY 1, 2, 3"
        ).fetchall()
        holdings = conn.execute(
            "SELECT date, user_id, holding_key, kind, ref_id, name, type, value"
            " FROM holding_snapshots ORDER BY 1, 2, 3"
        ).fetchall()
    conn.close()
    return rows, holdings


async def pg_rows(pool: asyncpg.Pool) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    rows = await pool.fetch(
        "SELECT date, user_id, category, total_value FROM patrimoine_snapshots ORDER BY 1, 2, 3"
    )
    holdings = await pool.fetch(
        "SELECT date, user_id, holding_key, kind, ref_id, name, type, value"
        " FROM holding_snapshots ORDER BY 1, 2, 3"
    )
    return [tuple(r) for r in rows], [tuple(r) for r in holdings]


def table_info(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as conn:
        info = {t: conn.execute(f"PRAGMA table_info({t})").fetchall() for t in KONTO_TABLES}
        info["(indexes)"] = conn.execute(
            "SELECT name, tbl_name, sql FROM sqlite_schema WHERE type = 'index' ORDER BY 1"
        ).fetchall()
    conn.close()
    return info


SAME = (
    "users",
    "items_users",
    "items_failed",
    "items_invalid",
    "items_unconverted",
    "rows_written",
    "rows_unchanged",
    "rows_removed",
    "holdings_written",
    "holdings_unchanged",
    "holdings_removed",
    "batches",
    "unconverted_XYZ",
    "unconverted_GBP",
)


def same_counts(lite: Counter[str], pg: Counter[str]) -> None:
    assert {k: lite[k] for k in SAME} == {k: pg[k] for k in SAME}


async def test_the_sqlite_konto_gets_the_rows_of_the_postgresql_path_to_the_last_digit(
    konto: KontoSql, path: Path, pg: asyncpg.Pool, empty_dsn: str
) -> None:
    await fill(path, pg, sample())
    schema_before = table_info(path)
    with capture_logs() as lite_logs:
        lite = await run_lite(empty_dsn, pg, konto)
    rows, holdings = lite_rows(path)
    day = rows[0][0]
    pg_counts = await run_pg(pg, datetime.fromisoformat(f"{day}T10:00:00+02:00"))
    assert (rows, holdings) == await pg_rows(pg)
    same_counts(lite, pg_counts)
    # What the data holds, so that the equality above is about something.
    assert lite["users"] == 40 and lite["items_failed"] == 3  # users 5, 9 and 10
    assert {r[1] for r in rows} & {5, 9, 10} == set()
    assert ("account:9009", 12.5) in {(h[2], h[7]) for h in holdings if h[1] == 6}
    assert "savings" not in {r[2] for r in rows if r[1] == 6}
    assert lite["items_invalid"] >= 4 and lite["unconverted_XYZ"] > 0
    assert lite["unconverted_GBP"] > 0  # its only rate is older than 7 days
    assert lite["rows_written"] == len(rows) and lite["holdings_written"] == len(holdings)
    events = [e["event"] for e in lite_logs]
    assert {"snapshots.values_invalid", "snapshots.users_failed", "snapshots.unconverted"} <= set(
        events
    )
    assert events.count("snapshots.written") == 1
    assert table_info(path) == schema_before


async def both_paths(
    konto: KontoSql, path: Path, pg: asyncpg.Pool, dsn: str, data: Any
) -> dict[str, tuple[Any, ...]]:
    """Run both paths on the same data; they must write the same rows. Each holding row by its
    key: (user, name, value), and each category row by user and category as ``cat:``."""
    await fill(path, pg, data)
    await run_lite(dsn, pg, konto)
    rows, holdings = lite_rows(path)
    await run_pg(pg, datetime.fromisoformat(f"{rows[0][0]}T10:00:00+02:00"))
    assert (rows, holdings) == await pg_rows(pg)
    found: dict[str, tuple[Any, ...]] = {h[2]: (h[1], h[5], h[7]) for h in holdings}
    found.update({f"cat:{r[1]}:{r[2]}": (r[3],) for r in rows})
    return found


async def test_an_account_whose_hidden_is_null_is_left_out_as_the_web_app_does(
    konto: KontoSql, path: Path, pg: asyncpg.Pool, empty_dsn: str
) -> None:
    accounts = [
        Account(1, 1, "checking", "EUR", 10.0, 0),
        Account(2, 1, "checking", "EUR", 999.0, None),
        Account(3, 1, "savings", "EUR", 5.0, 1),
    ]
    found = await both_paths(konto, path, pg, empty_dsn, ([1], accounts, []))
    assert {k for k in found if k.startswith("account:")} == {"account:1"}
    assert found["cat:1:total"] == (10.0,)


async def test_an_asset_worth_0_is_valued_at_its_purchase_price_as_the_web_app_does(
    konto: KontoSql, path: Path, pg: asyncpg.Pool, empty_dsn: str
) -> None:
    # JavaScript's current_value || purchase_price || 0.
    assets = [
        Asset(1, 1, "vehicle", 18000.0, 0.0),
        Asset(2, 1, "valuable", 0.0, None),
        Asset(3, 1, "other", 5.0, 7.0),
        Asset(4, 1, "other", None, None),
    ]
    found = await both_paths(konto, path, pg, empty_dsn, ([1], [], assets))
    assert {k: v[2] for k, v in found.items() if k.startswith("asset:")} == {
        "asset:1": 18000.0,
        "asset:2": 0.0,
        "asset:3": 7.0,
        "asset:4": 0.0,
    }
    assert found["cat:1:vehicle"] == (18000.0,) and found["cat:1:total"] == (18007.0,)


async def test_holdings_are_named_custom_name_or_address_else_name_as_the_web_app_does(
    konto: KontoSql, path: Path, pg: asyncpg.Pool, empty_dsn: str
) -> None:
    # JavaScript's custom_name || name || '' and address || name || '': '' falls through too.
    accounts = [
        Account(1, 1, "checking", "EUR", 1.0, name="Compte", custom_name="Joint"),
        Account(2, 1, "checking", "EUR", 2.0, name="Compte", custom_name=""),
        Account(3, 1, "checking", "EUR", 3.0, name="Compte", custom_name=None),
        Account(4, 1, "checking", "EUR", 4.0, name="", custom_name=""),
    ]
    assets = [
        Asset(1, 1, "real_estate", 9.0, None, name="Maison", address="3 rue Haute"),
        Asset(2, 1, "real_estate", 9.0, None, name="Maison", address=""),
        Asset(3, 1, "vehicle", 9.0, None, name="", address=None),
    ]
    found = await both_paths(konto, path, pg, empty_dsn, ([1], accounts, assets))
    assert {k: v[1] for k, v in found.items() if not k.startswith("cat:")} == {
        "account:1": "Joint",
        "account:2": "Compte",
        "account:3": "Compte",
        "account:4": "",
        "asset:1": "3 rue Haute",
        "asset:2": "Maison",
        "asset:3": "",
    }


async def test_a_rerun_with_nothing_new_writes_nothing_and_a_row_that_became_zero_goes(
    konto: KontoSql, path: Path, pg: asyncpg.Pool, empty_dsn: str
) -> None:
    await fill(path, pg, sample(seed=7))
    await run_lite(empty_dsn, pg, konto)
    # Any update would reset created_at to the web app's default (now).
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE patrimoine_snapshots SET created_at = 'before'")
    conn.close()
    before = _all_rows(path)
    again = await run_lite(empty_dsn, pg, konto)
    assert _all_rows(path) == before
    assert again["rows_written"] == again["rows_removed"] == 0
    assert again["holdings_written"] == again["holdings_removed"] == 0
    assert again["rows_unchanged"] == len(before[0])
    assert again["holdings_unchanged"] == len(before[1])
    # The same first run on PostgreSQL; then user 1's accounts change on both sides: a
    # savings account at zero now (its category row had 100) and one checking account.
    day = before[0][0][1]
    at = datetime.fromisoformat(f"{day}T10:00:00+02:00")
    await run_pg(pg, at)
    assert lite_rows(path) == await pg_rows(pg)
    user_1_accounts = sum(1 for h in before[1] if h[2] == 1 and h[3].startswith("account:"))
    await change_user_1(path, pg, day)
    lite = await run_lite(empty_dsn, pg, konto)
    pg_counts = await run_pg(pg, at)
    assert lite_rows(path) == await pg_rows(pg)
    same_counts(lite, pg_counts)
    assert lite["rows_removed"] >= 1 and lite["holdings_removed"] == user_1_accounts > 0
    rows = {(r[2], r[3]): r for r in _all_rows(path)[0]}
    assert (1, "savings") not in rows
    assert rows[(1, "checking")][5] != "before"  # an updated row takes the column's default
    assert rows[(2, "total")][5] == "before"  # an unchanged one is not touched


def _all_rows(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT id, date, user_id, category, total_value, created_at"
            " FROM patrimoine_snapshots ORDER BY id"
        ).fetchall()
        holdings = conn.execute("SELECT * FROM holding_snapshots ORDER BY id").fetchall()
    conn.close()
    return rows, holdings


async def change_user_1(path: Path, pool: asyncpg.Pool, day: str) -> None:
    """Give user 1 exactly one visible savings account, at zero now (after a first run with
    it non-zero), and a changed checking balance, in both databases."""
    steps: Sequence[tuple[str, tuple[Any, ...]]] = (
        ("DELETE FROM bank_accounts WHERE user_id = 1", ()),
        (
            "INSERT INTO bank_accounts (id, user_id, name, type, currency, balance, hidden)"
            " VALUES (8001, 1, 'a', 'savings', 'EUR', 0, 0), (8002, 1, 'b', 'checking', 'EUR', 42.5, 0)",
            (),
        ),
    )
    # The first run saw user 1 with savings of 100: put that row there on both sides.
    with sqlite3.connect(path) as conn:
        for sql, params in steps:
            conn.execute(sql, params)
        conn.execute(
            "INSERT OR REPLACE INTO patrimoine_snapshots (date, user_id, category, total_value)"
            " VALUES (?, 1, 'savings', 100)",
            (day,),
        )
    conn.close()
    async with pool.acquire() as pg:
        for sql, _ in steps:
            await pg.execute(sql)
        await pg.execute(
            "INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)"
            " VALUES ($1, 1, 'savings', 100) ON CONFLICT (date, user_id, category)"
            " DO UPDATE SET total_value = 100",
            day,
        )


async def test_the_conversion_rounds_as_postgresql_numeric_does(pg: asyncpg.Pool) -> None:
    """PostgreSQL's own numbers for thousands of awkward amounts and rates."""
    rng = random.Random(5)
    cases: list[tuple[float, str, str]] = []
    for _ in range(3000):
        amount = rng.choice(
            [
                rng.uniform(-1e6, 1e6),
                round(rng.uniform(-1e4, 1e4), 2),
                rng.uniform(-1, 1) * 10 ** rng.randint(-30, 300),
                0.1 + 0.2,
            ]
        )
        base = str(Decimal(rng.uniform(1e-6, 1e6)).quantize(Decimal(10) ** -rng.randint(0, 12)))
        currency = str(Decimal(rng.uniform(1e-6, 1e6)).quantize(Decimal(10) ** -rng.randint(0, 12)))
        if Decimal(base) > 0 and Decimal(currency) > 0:
            cases.append((amount, base, currency))
    found = await pg.fetch(
        """SELECT (a::numeric)::text,
                  round(a::numeric * b / round(c, greatest(scale(c), 24)), 8)::text
             FROM unnest($1::float8[], $2::numeric[], $3::numeric[]) AS t (a, b, c)""",
        [c[0] for c in cases],
        [Decimal(c[1]) for c in cases],
        [Decimal(c[2]) for c in cases],
    )
    for (amount, base, currency), (read, converted) in zip(cases, found, strict=True):
        as_numeric = pg_numeric.from_float(amount)
        assert as_numeric == Decimal(read)
        assert as_numeric is not None
        got = pg_numeric.convert(as_numeric, Decimal(base), Decimal(currency))
        assert got == Decimal(converted), (amount, base, currency)


async def test_the_first_pass_reads_each_table_in_chunks_and_sorts_rows_into_batches(
    konto: KontoSql, path: Path
) -> None:
    rng = random.Random(3)
    owners = [rng.choice([None, *range(1, 11)]) for _ in range(23)]  # scattered, some NULL
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO users (id) VALUES (?)", [(u,) for u in range(1, 11)])
        conn.executemany(
            "INSERT INTO bank_accounts (user_id, name, currency) VALUES (?, 'a', ?)",
            [(u, rng.choice(["usd ", "", None, "CHF"])) for u in owners],
        )
        conn.executemany(
            "INSERT INTO assets (user_id, name, type) VALUES (?, 'x', 'other')",
            [(u,) for u in owners if u is not None],
        )
        accounts = conn.execute("SELECT rowid, user_id FROM bank_accounts").fetchall()
        assets = conn.execute("SELECT rowid, user_id FROM assets").fetchall()
    conn.close()
    bounds = [3, 6, 9]  # batches: ..3, 4..6, 7..9, 10..
    index = await snapshots_lite.index_rows(konto, bounds, 4, chunk=4)

    def expected(rows: list[tuple[int, int | None]]) -> list[list[int]]:
        return [
            [r for r, u in rows if u is not None and lo <= u <= hi]
            for lo, hi in ((1, 3), (4, 6), (7, 9), (10, 10))
        ]

    assert [list(a) for a in index.accounts] == expected(accounts)
    assert [list(a) for a in index.assets] == expected(assets)
    assert index.currencies == {"USD", "EUR", "CHF"}


async def test_a_run_taken_over_between_two_batches_writes_nothing_more(
    konto: KontoSql, path: Path, pg: asyncpg.Pool
) -> None:
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO users (id) VALUES (?)", [(u,) for u in range(1, 31)])
        conn.executemany(
            "INSERT INTO bank_accounts (user_id, name, balance) VALUES (?, 'a', ?)",
            [(u, u * 1.5) for u in range(1, 31)],
        )
    conn.close()
    checks = 0

    async def fence(conn: Connection) -> None:
        # The run's claim checks: its fence, its rates, then one per batch. Before the second
        # batch, a newer run takes the job over and raises Konto's fence to its own id.
        nonlocal checks
        checks += 1
        if checks == 4:
            await konto.advance_fence(Fence(SNAPSHOTS, 2))

    ctx = RunContext(
        run_id=1,
        job=SNAPSHOTS,
        trigger="manual",
        scheduled_for=None,
        started_at=datetime.now(UTC),
        log=structlog.get_logger(),
        fence=fence,
    )
    with pytest.raises(ClaimLost, match="newer run"):
        await snapshots_lite.take_snapshots_lite(pg, konto, ctx, PARIS, 5)
    with sqlite3.connect(path) as conn:
        written = conn.execute("SELECT DISTINCT user_id FROM patrimoine_snapshots").fetchall()
    conn.close()
    assert sorted(u for (u,) in written) == [1, 2, 3, 4, 5]  # the first batch alone


async def test_accounts_added_during_the_run_are_in_their_users_snapshot(
    konto: KontoSql, path: Path, pg: asyncpg.Pool
) -> None:
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO users (id) VALUES (?)", [(u,) for u in range(1, 11)])
        conn.executemany(
            "INSERT INTO bank_accounts (user_id, name, balance) VALUES (?, 'a', 1)",
            [(u,) for u in range(1, 11)],
        )
    conn.close()
    checks = 0

    async def fence(conn: Connection) -> None:
        # After the first pass and the first batch's reads, before its write: the web app adds
        # an account for user 8 (a later batch) and a user 11 with an account.
        nonlocal checks
        checks += 1
        if checks == 3:
            with sqlite3.connect(path) as added:
                added.execute("INSERT INTO users (id) VALUES (11)")
                added.executemany(
                    "INSERT INTO bank_accounts (id, user_id, name, balance) VALUES (?, ?, 'b', ?)",
                    [(500, 8, 41.0), (501, 11, 7.0)],
                )
            added.close()

    ctx = RunContext(
        run_id=1,
        job=SNAPSHOTS,
        trigger="manual",
        scheduled_for=None,
        started_at=datetime.now(UTC),
        log=structlog.get_logger(),
        fence=fence,
    )
    await snapshots_lite.take_snapshots_lite(pg, konto, ctx, PARIS, 5)
    assert checks >= 3
    with sqlite3.connect(path) as conn:
        totals = dict(
            conn.execute(
                "SELECT user_id, total_value FROM patrimoine_snapshots WHERE category = 'total'"
            ).fetchall()
        )
    conn.close()
    assert totals[8] == 42.0 and totals[11] == 7.0 and totals[1] == 1.0


def test_no_read_or_write_of_a_batch_scans_a_table(path: Path) -> None:
    """The web app's tables have no index on user_id: a batch reads its rows by rowid and the
    snapshot tables by their unique keys, never by scanning a table."""
    statements = [
        (snapshots_lite._USERS_SQL, (1, 2)),
        (snapshots_lite._ACCOUNTS_SQL.format(name="a.custom_name, a.name"), ("[1, 2]", 9, 1, 2)),
        (snapshots_lite._ASSETS_SQL.format(name="s.address, s.name"), ("[1, 2]", 9, 1, 2)),
        (snapshots_lite._STORED_SQL, ("2026-01-01", 1, 2)),
        (snapshots_lite._HOLDINGS_STORED_SQL, ("2026-01-01", 1, 2)),
        (snapshots_lite._REMOVE_SQL, ("2026-01-01", "[]")),
        (snapshots_lite._HOLDINGS_REMOVE_SQL, ("2026-01-01", "[]")),
        (snapshots_lite._UPSERT_SQL.format(created_at=""), ("2026-01-01", "[]")),
        (snapshots_lite._HOLDINGS_UPSERT_SQL, ("2026-01-01", "[]")),
    ]
    with sqlite3.connect(path) as conn:
        conn.execute(lite_schema.HOLDINGS_TABLE_SQL)
        for sql, params in statements:
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
            scans = [step for step in plan if step.startswith("SCAN") and "json_each" not in step]
            assert scans == [], (sql, plan)
    conn.close()


def test_a_nan_balance_is_null_in_sqlite(tmp_path: Path) -> None:
    """Why the comparison above has no NaN: SQLite stores a NaN as NULL (a balance of 0 for
    the snapshot), while it keeps +-Infinity (not a number: left out and counted)."""
    with sqlite3.connect(webapp_konto(tmp_path / "k.db")) as conn:
        conn.execute("INSERT INTO users (id) VALUES (1)")
        conn.executemany(
            "INSERT INTO bank_accounts (user_id, name, balance) VALUES (1, 'a', ?)",
            [(math.nan,), (math.inf,)],
        )
        assert conn.execute("SELECT balance FROM bank_accounts ORDER BY id").fetchall() == [
            (None,),
            (math.inf,),
        ]
    conn.close()
