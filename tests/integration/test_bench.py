"""The benchmark's verdict: a run that measured less than it claims fails (``bench.report``);
the parallel floor writes the floor's rows; a re-run's changes are read from the tables."""

from __future__ import annotations

import sqlite3
from datetime import date
from pathlib import Path

import asyncpg

from bench import floor, lite, scale
from bench.dataset import Sizes
from bench.lite import LitePass, LiteResult
from bench.report import Results, failures
from bench.scale import Comparison, Pass, ScaleResult
from kontod.konto import lite_schema
from tests.helpers import add_user, webapp_konto

DAY = date(2026, 1, 1)


def _sizes(users: int) -> Sizes:
    return Sizes(users, 4 * users, 0, 0, users, 0, 0, 0)


def _compared(differing: int = 0) -> list[Comparison]:
    return [
        Comparison(table, DAY, date(2026, 1, 2), 10, 10, differing)
        for table, _ in floor.SNAPSHOT_TABLES
    ]


def _measured(
    users: int,
    *,
    rerun_counted: int = 0,
    rerun_in_tables: int | None = 0,
    parallel_differing: int = 0,
) -> ScaleResult:
    """A size measured whole: every variant ran, every side wrote the floor's rows."""
    s = ScaleResult(users, _sizes(users), 3, None, 1, 1000)
    s.passes = [
        Pass("kontod", 0, DAY, 1.0, 10),
        Pass("rerun", 0, DAY, 0.2, rerun_counted, changed_in_tables=rerun_in_tables),
        Pass("floor", 0, date(2026, 1, 2), 1.0, 10),
        Pass("parallel", 0, date(2026, 1, 3), 0.8, 10),
        Pass("aggregate", 0, date(2026, 1, 4), 0.2, 10),
    ]
    s.comparisons = _compared()
    s.parallel_comparisons = _compared(parallel_differing)
    return s


def _results(*snapshots: ScaleResult, skipped: list[dict[str, object]] | None = None) -> Results:
    return Results({}, list(snapshots), None, None, {}, list(skipped or []))


def test_a_run_that_measured_every_requested_size_passes() -> None:
    assert failures(_results(_measured(2000)), [2000]) == []


def test_a_requested_size_skipped_for_disk_room_fails_the_run() -> None:
    # Nothing measured at all: the old decision (every measured size agreed) was true here.
    skipped = [{"users": 2000, "reason": "needs about 9 GiB free, 1 GiB free"}]
    found = failures(_results(skipped=skipped), [2000])
    assert found == [
        "2000 users were asked for and not measured: needs about 9 GiB free, 1 GiB free"
    ]


def test_one_skipped_size_among_measured_ones_fails_the_run() -> None:
    skipped = [{"users": 100_000, "reason": "no room"}]
    found = failures(_results(_measured(10_000), skipped=skipped), [10_000, 100_000])
    assert found == ["100000 users were asked for and not measured: no room"]


def test_a_requested_size_missing_without_a_reason_fails_the_run() -> None:
    assert failures(_results(_measured(2000)), [2000, 4000]) == [
        "4000 users were asked for and not measured: no result"
    ]


def test_a_rerun_that_counted_written_rows_fails_the_run() -> None:
    found = failures(_results(_measured(2000, rerun_counted=3)), [2000])
    assert len(found) == 1
    assert "2000 users: the re-run of unchanged 2026-01-01 wrote or removed rows" in found[0]
    assert "3 by its counts" in found[0]


def test_a_rerun_whose_rows_changed_in_the_tables_fails_even_when_its_counts_say_none() -> None:
    found = failures(_results(_measured(2000, rerun_in_tables=5)), [2000])
    assert len(found) == 1
    assert "0 by its counts, 5 in the tables" in found[0]


def test_a_rerun_not_checked_in_the_tables_fails_the_run() -> None:
    found = failures(_results(_measured(2000, rerun_in_tables=None)), [2000])
    assert len(found) == 1
    assert "not checked in the tables" in found[0]


def test_a_size_without_a_rerun_fails_the_run() -> None:
    s = _measured(2000)
    s.passes = [p for p in s.passes if p.variant != "rerun"]
    assert failures(_results(s), [2000]) == [
        "2000 users: no re-run of an unchanged day was measured"
    ]


def test_rows_that_differ_from_the_floors_fail_the_run() -> None:
    s = _measured(2000, parallel_differing=1)
    s.comparisons = _compared(2)
    assert failures(_results(s), [2000]) == [
        "2000 users: kontod's rows differ from the floor's",
        "2000 users: the parallel floor's rows differ from the floor's",
    ]


async def _seeded(conn: asyncpg.Connection) -> None:
    # Ids with gaps, so that the parts are cut on ids that are not 1..n.
    for uid in (3, 4, 10, 11, 40, 41, 90):
        await add_user(
            conn,
            user_id=uid,
            accounts=[("checking", f"{uid}.25", False), ("savings", "100", False)],
            assets=[("real_estate", "1000", None)],
        )
    await add_user(conn, user_id=95)  # nothing but a total row
    await conn.execute(
        "INSERT INTO kontod_rates (base, currency, day, base_amount, currency_amount, source)"
        " VALUES ('EUR', 'USD', $1, 1, 1.1, 'ecb')",
        DAY,
    )


async def test_the_parallel_floor_writes_the_floors_rows_over_every_user(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await _seeded(conn)
        await conn.execute("UPDATE bank_accounts SET currency = 'USD' WHERE user_id = 40")
        _, serial_rows = await scale.floor_pass(conn, date(2026, 1, 2))
        for n, parts in enumerate((1, 2, 3, 10), start=1):
            day = date(2026, 1, 2 + n)
            _, rows = await scale.parallel_floor_pass(dsn, day, parts)
            # 21 holdings, 3 categories and a total for 7 users, a total for the last one.
            assert rows == serial_rows == 21 + 7 * 4 + 1
            found = await scale.compare(conn, day, date(2026, 1, 2))
            assert [c.differing for c in found] == [0, 0]
            assert all(c.same for c in found)
    finally:
        await conn.close()


async def test_changes_since_a_transaction_are_read_from_the_tables(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await _seeded(conn)
        await scale.floor_pass(conn, DAY)
        await scale.floor_pass(conn, date(2026, 1, 2))
        xid: str = await conn.fetchval(scale.XID_SQL)
        before = await scale.day_rows(conn, DAY)
        assert await scale.changed_since(conn, DAY, xid, before) == 0
        await conn.execute(
            "UPDATE patrimoine_snapshots SET total_value = total_value"
            " WHERE date = $1 AND user_id = 3 AND category = 'total'",
            DAY,
        )
        assert await scale.changed_since(conn, DAY, xid, before) == 1
        await conn.execute(
            "DELETE FROM holding_snapshots WHERE date = $1 AND user_id IN (4, 10)", DAY
        )
        assert await scale.changed_since(conn, DAY, xid, before) == 1 + 6
        # Another date's changes are not this date's.
        await conn.execute("DELETE FROM patrimoine_snapshots WHERE date = '2026-01-02'")
        assert await scale.changed_since(conn, DAY, xid, before) == 7
    finally:
        await conn.close()


def _lite(users: int, *, differs: int = 0, rerun_rows: int = 0) -> LiteResult:
    """A SQLite Konto size measured whole."""
    s = LiteResult(users, 4 * users, users, 2, 0, 1000, kontod_differs=differs, old_differs=0)
    s.passes = [
        LitePass("kontod", DAY, 1.0, 10, writer={"p99": 0.05, "max": 0.06}),
        LitePass("rerun", DAY, 0.5, rerun_rows),
        LitePass("floor", date(2026, 1, 2), 0.5, 10),
        LitePass("aggregate", date(2026, 1, 2), 0.2, 10),
    ]
    return s


def test_the_sqlite_kontos_failures_are_the_runs() -> None:
    ok = Results({}, [], None, None, {}, lite=[_lite(1000)])
    assert failures(ok, [], [1000]) == []
    assert failures(ok, [], [1000, 5000]) == [
        "SQLite Konto: 5000 users were asked for and not measured"
    ]
    unequal = Results({}, [], None, None, {}, lite=[_lite(1000, differs=3)])
    assert failures(unequal, [], [1000]) == [
        "SQLite Konto, 1000 users: 3 of kontod's rows differ from the floor's by more than half"
        " a cent"
    ]
    rewritten = Results({}, [], None, None, {}, lite=[_lite(1000, rerun_rows=2)])
    assert "wrote or removed 2 rows" in failures(rewritten, [], [1000])[0]


def test_the_sqlite_kontos_comparison_finds_a_row_a_cent_away_or_missing(tmp_path: Path) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    with sqlite3.connect(path) as conn:
        conn.execute(lite_schema.HOLDINGS_TABLE_SQL)
        conn.execute("INSERT INTO users (id) VALUES (1), (2)")
        for day in ("2026-01-01", "2026-01-02"):
            conn.executemany(
                "INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)"
                " VALUES (?, ?, ?, ?)",
                [(day, 1, "total", 10.0), (day, 2, "total", 5.0)],
            )
    conn.close()
    assert lite.differing(path, date(2026, 1, 1), date(2026, 1, 2)) == 0
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE patrimoine_snapshots SET total_value = 10.004 WHERE user_id = 1")
    conn.close()
    assert lite.differing(path, date(2026, 1, 1), date(2026, 1, 2)) == 0  # within half a cent
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE patrimoine_snapshots SET total_value = 10.01"
            " WHERE user_id = 1 AND date = '2026-01-02'"
        )
        conn.execute("DELETE FROM patrimoine_snapshots WHERE user_id = 2 AND date = '2026-01-01'")
    conn.close()
    assert lite.differing(path, date(2026, 1, 1), date(2026, 1, 2)) == 2
    assert lite.differing(path, date(2026, 1, 1), date(2026, 1, 2), users=[1]) == 1
