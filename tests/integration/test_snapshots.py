"""daily-snapshots against a real PostgreSQL: each defect of the old job, fixed."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
import pytest
import structlog
from structlog.testing import capture_logs

from kontod import db
from kontod.jobs.snapshots import id_ranges, take_snapshots
from kontod.scheduler.contract import ClaimLost, Connection, RunContext
from tests.helpers import PARIS, WEBAPP_SCHEMA, add_user, snapshot_rows

AT = datetime(2026, 6, 10, 0, 0, tzinfo=UTC)  # 02:00 in Paris


def ctx(at: datetime = AT, trigger: str = "schedule") -> RunContext:
    return RunContext(
        run_id=1,
        job="daily-snapshots",
        trigger=trigger,
        scheduled_for=at if trigger != "manual" else None,
        started_at=at,
        log=structlog.get_logger(),
    )


async def run(
    pool: asyncpg.Pool, at: datetime = AT, *, tz: ZoneInfo = PARIS, batch: int = 100
) -> RunContext:
    c = ctx(at)
    await take_snapshots(pool, c, tz, batch)
    return c


async def test_categories_and_total(pool: asyncpg.Pool) -> None:
    uid = await add_user(
        pool,
        accounts=[
            ("checking", "100.10", False),
            (None, "50", False),
            ("savings", "1000", False),
            ("loan", "-500", False),
        ],
        assets=[("real_estate", "200000", "250000"), (None, "10", None)],
    )
    await run(pool)
    assert await snapshot_rows(pool, uid, date(2026, 6, 10)) == {
        "checking": Decimal("150.10"),  # a missing type counts as checking
        "savings": Decimal("1000"),
        "loan": Decimal("-500"),
        "real_estate": Decimal("250000"),
        "other": Decimal("10"),  # a missing asset type counts as other
        "total": Decimal("250660.10"),
    }


async def test_exact_decimal_sums(pool: asyncpg.Pool) -> None:
    uid = await add_user(pool, accounts=[("checking", "0.1", False), ("checking", "0.2", False)])
    await run(pool)
    rows = await snapshot_rows(pool, uid, date(2026, 6, 10))
    assert rows["checking"] == Decimal("0.3")
    assert rows["total"] == Decimal("0.3")


async def test_hidden_accounts_are_excluded(pool: asyncpg.Pool) -> None:
    uid = await add_user(pool, accounts=[("checking", "10", False), ("savings", "999", True)])
    await run(pool)
    assert await snapshot_rows(pool, uid, date(2026, 6, 10)) == {
        "checking": Decimal("10"),
        "total": Decimal("10"),
    }


async def test_asset_value_falls_back_to_purchase_price_then_zero(pool: asyncpg.Pool) -> None:
    uid = await add_user(
        pool,
        assets=[
            ("vehicle", "18000", None),
            ("valuable", None, None),
            ("other", "5", "7"),
            # The web app's current_value || purchase_price || 0: a 0 falls through too.
            ("real_estate", "250000", "0"),
            ("valuable", "0", "0"),
        ],
    )
    await run(pool)
    assert await snapshot_rows(pool, uid, date(2026, 6, 10)) == {
        "vehicle": Decimal("18000"),
        "other": Decimal("7"),
        "real_estate": Decimal("250000"),
        "total": Decimal("268007"),
    }


async def test_holdings_are_named_by_name_alone_where_the_tables_have_no_custom_name(
    pool: asyncpg.Pool,
) -> None:
    # kontod's own tables have no custom_name or address: the web app's rule falls back to
    # name || '' (NULL and '' give '').
    uid = await add_user(pool, accounts=[("checking", "1", False)], assets=[("other", "2", None)])
    await pool.execute("UPDATE assets SET name = NULL WHERE user_id = $1", uid)
    await run(pool)
    names = await pool.fetch(
        "SELECT kind, name FROM holding_snapshots WHERE user_id = $1 ORDER BY 1", uid
    )
    assert [tuple(r) for r in names] == [("account", "acc"), ("asset", "")]


async def test_user_owning_nothing_gets_a_zero_total(pool: asyncpg.Pool) -> None:
    uid = await add_user(pool)
    c = await run(pool)
    assert await snapshot_rows(pool, uid, date(2026, 6, 10)) == {"total": Decimal("0")}
    assert c.counts["users"] == 1
    assert c.counts["rows_written"] == 1


async def test_rerun_same_day_leaves_what_a_first_run_would(pool: asyncpg.Pool) -> None:
    uid = await add_user(pool, accounts=[("checking", "100", False), ("savings", "40", False)])
    await run(pool)
    # The savings account is emptied and a new asset appears before the re-run.
    await pool.execute("UPDATE bank_accounts SET balance = 0 WHERE type = 'savings'")
    await pool.execute(
        "INSERT INTO assets (user_id, type, current_value) VALUES ($1, 'valuable', 3)", uid
    )
    c = await run(pool)
    rows = await snapshot_rows(pool, uid, date(2026, 6, 10))
    assert rows == {"checking": Decimal("100"), "valuable": Decimal("3"), "total": Decimal("103")}
    assert sum(v for k, v in rows.items() if k != "total") == rows["total"]
    assert c.counts["rows_removed"] == 1


async def test_other_dates_are_untouched(pool: asyncpg.Pool) -> None:
    uid = await add_user(pool, accounts=[("checking", "1", False)])
    await pool.execute(
        "INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)"
        " VALUES ('2026-06-09', $1, 'savings', 5)",
        uid,
    )
    await run(pool)
    assert await snapshot_rows(pool, uid, date(2026, 6, 9)) == {"savings": Decimal("5")}


async def test_snapshot_date_is_local_date_of_the_tick(pool: asyncpg.Pool) -> None:
    uid = await add_user(pool, accounts=[("checking", "1", False)])
    # 11:00 UTC on June 10th is already June 11th in Kiritimati (UTC+14) ...
    await run(pool, datetime(2026, 6, 10, 11, tzinfo=UTC), tz=ZoneInfo("Pacific/Kiritimati"))
    # ... and still June 9th in Pago Pago (UTC-11) at 09:00 UTC.
    await run(pool, datetime(2026, 6, 10, 9, tzinfo=UTC), tz=ZoneInfo("Pacific/Pago_Pago"))
    dates = {
        r["date"]
        for r in await pool.fetch("SELECT date FROM patrimoine_snapshots WHERE user_id = $1", uid)
    }
    assert dates == {date(2026, 6, 11), date(2026, 6, 9)}


async def test_manual_run_uses_local_date_of_now(pool: asyncpg.Pool) -> None:
    uid = await add_user(pool)
    c = ctx(datetime(2026, 12, 31, 23, 30, tzinfo=UTC), trigger="manual")
    await take_snapshots(pool, c, PARIS, 10)
    assert await snapshot_rows(pool, uid, date(2027, 1, 1)) == {"total": Decimal("0")}


async def test_batches_cover_every_user_at_the_boundaries(pool: asyncpg.Pool) -> None:
    # Ids with gaps, and a count that is an exact multiple of the batch size, then not.
    ids = [
        await add_user(pool, user_id=i, accounts=[("checking", str(i), False)])
        for i in (3, 4, 10, 11, 40, 41)
    ]
    c = await run(pool, batch=2)
    assert c.counts["users"] == 6
    assert c.counts["batches"] == 3
    totals = {
        r["user_id"]: r["total_value"]
        for r in await pool.fetch(
            "SELECT user_id, total_value FROM patrimoine_snapshots WHERE category = 'total'"
        )
    }
    assert totals == {i: Decimal(i) for i in ids}
    await add_user(pool, user_id=50)
    c = await run(pool, batch=2)
    assert (c.counts["users"], c.counts["batches"]) == (7, 4)


async def test_a_failing_batch_writes_nothing_of_itself(pool: asyncpg.Pool) -> None:
    await add_user(pool, user_id=1, accounts=[("checking", "1", False)])
    await add_user(pool, user_id=2, accounts=[("checking", "2", False)])
    # A trigger makes writes for user 2 fail, as a broken row or a lost privilege would.
    await pool.execute(
        """CREATE FUNCTION refuse_user_2() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.user_id = 2 THEN RAISE EXCEPTION 'user 2 refused'; END IF;
           RETURN NEW; END $$;
           CREATE TRIGGER refuse BEFORE INSERT ON patrimoine_snapshots
           FOR EACH ROW EXECUTE FUNCTION refuse_user_2();"""
    )
    with pytest.raises(asyncpg.RaiseError, match="user 2 refused"):
        await run(pool, batch=1)
    users = {r["user_id"] for r in await pool.fetch("SELECT user_id FROM patrimoine_snapshots")}
    assert users == {1}


def test_id_ranges_cover_every_id_once() -> None:
    low, high = -(2**63), 2**63 - 1
    assert id_ranges([]) == [(low, high)]
    assert id_ranges([4, 11]) == [(low, 4), (5, 11), (12, high)]
    # A bound at the largest id leaves no range after it (and no overflow).
    assert id_ranges([7, high]) == [(low, 7), (8, high)]


DAY_ROWS_SQL = """
SELECT 'p' AS t, user_id, category AS k, total_value AS v, NULL AS n FROM patrimoine_snapshots
 WHERE date = $1
UNION ALL
SELECT 'h', user_id, holding_key, value, name FROM holding_snapshots WHERE date = $1
ORDER BY 1, 2, 3
"""


async def test_two_workers_write_what_one_writes(pool: asyncpg.Pool) -> None:
    for i in (1, 2, 5, 6, 7, 20, 21, 22, 23, 99):
        await add_user(
            pool,
            user_id=i,
            accounts=[("checking", str(i), False), ("savings", "5.5", i % 2 == 0)],
            assets=[("vehicle", "1", str(i))] if i % 3 == 0 else [],
        )
    one, two = ctx(AT), ctx(AT + timedelta(days=1))
    await take_snapshots(pool, one, PARIS, 3, workers=1)
    await take_snapshots(pool, two, PARIS, 3, workers=2)
    first = [tuple(r) for r in await pool.fetch(DAY_ROWS_SQL, date(2026, 6, 10))]
    second = [tuple(r) for r in await pool.fetch(DAY_ROWS_SQL, date(2026, 6, 11))]
    assert first == second
    # 10 checking, 6 visible savings, 3 vehicles and 10 totals; 16 accounts and 3 assets.
    assert len(first) == 29 + 19
    assert (two.counts["users"], two.counts["batches"]) == (10, 4)
    assert two.counts["rows_written"] == one.counts["rows_written"] == 29
    assert two.progress_done == 10
    # The same day again, with two workers: compared batch by batch, nothing written.
    again = ctx(AT + timedelta(days=1, hours=1))
    await take_snapshots(pool, again, PARIS, 3, workers=2)
    assert (again.counts["rows_written"], again.counts["holdings_written"]) == (0, 0)
    assert again.counts["rows_unchanged"] == 29
    assert [tuple(r) for r in await pool.fetch(DAY_ROWS_SQL, date(2026, 6, 11))] == second


async def test_a_claim_lost_by_one_worker_ends_the_run_as_claim_lost(pool: asyncpg.Pool) -> None:
    for i in range(1, 9):
        await add_user(pool, user_id=i, accounts=[("checking", str(i), False)])
    calls = 0

    async def fence(conn: Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ClaimLost("the lease expired")

    c = ctx()
    c.fence = fence
    # Not an ExceptionGroup and not a cancellation: the runner must see the lost claim itself.
    with pytest.raises(ClaimLost, match="lease expired"):
        await take_snapshots(pool, c, PARIS, 1, workers=2)
    written = await pool.fetchval("SELECT count(DISTINCT user_id) FROM patrimoine_snapshots")
    assert written < 8


# -- values that are not numbers, values that do not fit, rates that are not plausible --------


@pytest.fixture(params=["kontod", "webapp"])
async def schema(
    request: pytest.FixtureRequest, empty_pool: asyncpg.Pool
) -> tuple[asyncpg.Pool, str]:
    """A pool on kontod's own tables (numeric money) or on the web app's (float money), and
    the type of its money columns."""
    if request.param == "webapp":
        await empty_pool.execute(WEBAPP_SCHEMA)
    async with empty_pool.acquire() as conn:
        await db.migrate(conn)
    return empty_pool, "numeric" if request.param == "kontod" else "double precision"


async def owner(
    pool: asyncpg.Pool,
    money: str,
    balances: list[tuple[str, str]] = [],  # noqa: B006 (never changed)
    assets: list[tuple[str | None, str | None]] = [],  # noqa: B006
) -> int:
    """A user with (currency, balance) accounts and (purchase, current) assets, every amount
    given as SQL text, so that NaN and Infinity can be stored as they are."""
    uid: int = await pool.fetchval(
        "INSERT INTO users (email) VALUES ('u' || clock_timestamp()::text) RETURNING id"
    )
    for currency, balance in balances:
        await pool.execute(
            f"""INSERT INTO bank_accounts (user_id, name, type, currency, balance)
                VALUES ($1, 'acc', 'checking', $2, CAST($3::text AS {money}))""",
            uid,
            currency,
            balance,
        )
    for purchase, current in assets:
        await pool.execute(
            f"""INSERT INTO assets (user_id, name, type, purchase_price, current_value)
                VALUES ($1, 'asset', 'vehicle', CAST($2::text AS {money}),
                        CAST($3::text AS {money}))""",
            uid,
            purchase,
            current,
        )
    return uid


async def day_rows(pool: asyncpg.Pool, uid: int) -> dict[str, float]:
    rows = await pool.fetch(
        """SELECT category AS k, total_value::float8 AS v FROM patrimoine_snapshots
            WHERE user_id = $1
           UNION ALL
           SELECT holding_key, value::float8 FROM holding_snapshots WHERE user_id = $1""",
        uid,
    )
    return {r["k"]: r["v"] for r in rows}


async def test_values_that_are_not_numbers_are_left_out_and_counted(
    schema: tuple[asyncpg.Pool, str],
) -> None:
    pool, money = schema
    uid = await owner(
        pool,
        money,
        balances=[("EUR", "100"), ("EUR", "NaN"), ("EUR", "Infinity"), ("EUR", "-Infinity")],
        # current value not a number: left out, not replaced by the purchase price
        assets=[("5000", "NaN"), ("Infinity", None), ("40", "60")],
    )
    plain = await owner(pool, money, balances=[("EUR", "7")])
    c = ctx()
    with capture_logs() as logs:
        await take_snapshots(pool, c, PARIS, 100)
    rows = await day_rows(pool, uid)
    assert {k: v for k, v in rows.items() if ":" not in k} == {
        "checking": 100,
        "vehicle": 60,
        "total": 160,
    }
    assert sorted(k.split(":")[0] for k in rows if ":" in k) == ["account", "asset"]
    assert await day_rows(pool, plain) == {
        "checking": 7,
        "total": 7,
        f"account:{await first_account(pool, plain)}": 7,
    }
    assert (c.counts["items_invalid"], c.counts["items_users"], c.counts["items_failed"]) == (
        5,
        2,
        0,
    )
    assert c.counts["items_unconverted"] == 0
    [warned] = [e for e in logs if e["event"] == "snapshots.values_invalid"]
    assert warned["holdings"] == 5 and len(warned["keys"]) == 5
    # A re-run of the day compares first: the same rows, the same counts.
    again = ctx(AT + timedelta(hours=1))
    await take_snapshots(pool, again, PARIS, 100)
    assert await day_rows(pool, uid) == rows
    assert (again.counts["items_invalid"], again.counts["rows_written"]) == (5, 0)


async def first_account(pool: asyncpg.Pool, uid: int) -> int:
    found: int = await pool.fetchval("SELECT min(id) FROM bank_accounts WHERE user_id = $1", uid)
    return found


async def test_a_user_whose_values_overflow_the_float_columns_fails_alone(
    empty_pool: asyncpg.Pool,
) -> None:
    pool = empty_pool
    await pool.execute(WEBAPP_SCHEMA)
    async with pool.acquire() as conn:
        await db.migrate(conn)
    money = "double precision"
    # Each balance is a float; their sum (3e308) is not.
    big = await owner(pool, money, balances=[("EUR", "1.5e308"), ("EUR", "1.5e308")])
    before = await owner(pool, money, balances=[("EUR", "1")])
    after = await owner(pool, money, balances=[("EUR", "2")])
    # What the day held for the failing user stays as it was: nothing is removed.
    await pool.execute(
        """INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)
           VALUES ('2026-06-10', $1, 'total', 42)""",
        big,
    )
    for attempt in range(2):  # a new day, then a re-run of it (compared first)
        c = ctx(AT + timedelta(hours=attempt))
        with capture_logs() as logs:
            await take_snapshots(pool, c, PARIS, 100)
        assert await day_rows(pool, big) == {"total": 42}
        assert (await day_rows(pool, before))["total"] == 1
        assert (await day_rows(pool, after))["total"] == 2
        assert (c.counts["users"], c.counts["items_users"], c.counts["items_failed"]) == (3, 2, 1)
        [failed] = [e for e in logs if e["event"] == "snapshots.users_failed"]
        assert (failed["users"], failed["user_ids"]) == (1, [big])
        assert failed["log_level"] == "error"


async def store_rate(
    pool: asyncpg.Pool, currency: str, day: date, currency_amount: str, base_amount: str
) -> None:
    await pool.execute(
        """INSERT INTO kontod_rates (base, currency, day, currency_amount, base_amount, source)
           VALUES ('EUR', $1, $2, $3::text::numeric, $4::text::numeric, 'manual')""",
        currency,
        day,
        currency_amount,
        base_amount,
    )


async def test_stored_rates_that_are_not_plausible_are_no_rate(
    schema: tuple[asyncpg.Pool, str],
) -> None:
    pool, money = schema
    uid = await owner(
        pool,
        money,
        balances=[
            ("EUR", "10"),
            ("USD", "1"),
            ("BTC", "2"),
            ("JPY", "3"),
            ("GBP", "4"),
            ("CHF", "5"),
            ("SEK", "6"),
            ("XAU", "7"),
        ],
    )
    day = date(2026, 6, 10)
    await store_rate(pool, "USD", day, "1", "NaN")
    await store_rate(pool, "BTC", day, "1", "1e400")  # a price beyond any plausible one
    await store_rate(pool, "JPY", day, "Infinity", "1")
    await store_rate(pool, "GBP", day, "1e13", "1e13")  # a plausible ratio of absurd amounts
    await store_rate(pool, "CHF", day, "1", "1e-13")
    await store_rate(pool, "SEK", day - timedelta(days=1), "10", "1")  # usable, a day older
    await store_rate(pool, "SEK", day, "1", "1e13")  # the newest: not usable
    await store_rate(pool, "XAU", day, "1", "2000")
    c = ctx()
    await take_snapshots(pool, c, PARIS, 100)
    rows = await day_rows(pool, uid)
    assert rows["total"] == 10 + 0.6 + 14000
    assert c.counts["items_unconverted"] == 5
    assert {k: v for k, v in c.counts.items() if k.startswith("unconverted_")} == {
        f"unconverted_{cur}": 1 for cur in ("BTC", "CHF", "GBP", "JPY", "USD")
    }
