"""daily-snapshots against a real PostgreSQL: each defect of the old job, fixed."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
import pytest
import structlog

from kontod.job import ClaimLost, Connection, RunContext
from kontod.jobs.snapshots import id_ranges, take_snapshots
from tests.helpers import PARIS, add_user, snapshot_rows

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
        assets=[("vehicle", "18000", None), ("valuable", None, None), ("other", "5", "7")],
    )
    await run(pool)
    assert await snapshot_rows(pool, uid, date(2026, 6, 10)) == {
        "vehicle": Decimal("18000"),
        "other": Decimal("7"),
        "total": Decimal("18007"),
    }


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
