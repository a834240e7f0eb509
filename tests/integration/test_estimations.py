"""refresh-property-estimations against the DVF sandbox, on both places Konto's tables live:
kontod's PostgreSQL and the web app's SQLite file.

The sample (independent of the demo's): commune 69381 with flats and houses over two years,
a sale of three lots, a sale of two flats, quoted fields, a sale without coordinates, and no
file for the latest listed year; an overseas commune (97411); a commune whose files fail.
Every expected number below was computed by hand from the sample, not by the code.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog

from kontod.config import Settings
from kontod.demo.dvf_sandbox import DvfSandbox, Lot, Mutation
from kontod.jobs import ESTIMATIONS, declare_jobs
from kontod.jobs import estimations as job
from kontod.konto import lite_schema
from kontod.konto.sqlite import open_sqlite
from kontod.konto.store import Fence, KontoSql
from kontod.providers.dvf import DvfClient
from kontod.scheduler.contract import ClaimLost, Connection, RunContext, settle
from tests.helpers import webapp_konto
from tests.konto_engines import ENGINES, konto_on

# The web app's estimation columns, for a PostgreSQL Konto that has them (kontod's own minimal
# Konto tables do not).
PG_ESTIMATION_COLUMNS = """
ALTER TABLE assets ADD COLUMN citycode text, ADD COLUMN latitude double precision,
    ADD COLUMN longitude double precision, ADD COLUMN surface double precision,
    ADD COLUMN property_type text, ADD COLUMN estimated_value double precision,
    ADD COLUMN estimated_price_m2 double precision, ADD COLUMN estimation_date text
"""
LYON = "69381"
REUNION = "97411"
PARIS = "75056"
EMPTY = "01001"  # no file in any year


def sample(sandbox: DvfSandbox) -> None:
    """Publish the sample: listing 2022-2024, Lyon's files for 2023 and 2022 only."""
    sandbox.listed.update({2022, 2023, 2024})
    sandbox.put(
        2023,
        LYON,
        [
            Mutation(
                "2023-1", "2023-02-01", "200000", [Lot("Appartement", "40")], "45.7671", "4.8341"
            ),
            Mutation(
                "2023-2", "2023-03-01", "330000", [Lot("Appartement", "60")], "45.7680", "4.8350"
            ),
            # One flat with its cellar and parking: counted once, 261 234 / 50 = 5 224.68 a m².
            Mutation(
                "2023-3",
                "2023-04-01",
                "261234",
                [Lot("Appartement", "50"), Lot("Dépendance"), Lot("Dépendance")],
                "45.7660",
                "4.8330",
            ),
            # Two flats in one sale: left out.
            Mutation(
                "2023-4",
                "2023-05-01",
                "400000",
                [Lot("Appartement", "30"), Lot("Appartement", "35")],
                "45.7670",
                "4.8340",
            ),
            Mutation("2023-5", "2023-06-01", "450000", [Lot("Maison", "100")], "45.7700", "4.8400"),
            Mutation(
                "2023-6", "2023-07-01", "60000", [Lot("Appartement", "8")], "45.7670", "4.8340"
            ),
            Mutation(
                "2023-7",
                "2023-08-01",
                "270000",
                [Lot("Appartement", "45")],
                "45.7670",
                "4.8340",
                nature="Vente en l'état futur d'achèvement",
            ),
        ],
    )
    sandbox.put(
        2022,
        LYON,
        [
            # No coordinates: 99 999 m away for the web app, still one of the few flats.
            Mutation("2022-1", "2022-02-01", "315000", [Lot("Appartement", "70")]),
            Mutation(
                "2022-2",
                "2022-03-01",
                "297000",
                [Lot("Appartement", "55")],
                "45.7650",
                "4.8320",
                street='QUAI "SAINT-VINCENT", BAT 2',
            ),
            Mutation("2022-3", "2022-04-01", "600000", [Lot("Maison", "120")], "45.7720", "4.8420"),
        ],
    )
    sandbox.put(
        2023,
        REUNION,
        [Mutation("r-1", "2023-01-10", "180000", [Lot("Appartement", "60")], "-20.88", "55.45")],
    )
    sandbox.put(2023, PARIS, [Mutation("p-1", "2023-01-10", "500000", [Lot("Appartement", "50")])])
    sandbox.fail(PARIS, "http_503")


@dataclass
class Place:
    """Konto's assets table on one engine, as the test sees it."""

    engine: str
    pool: asyncpg.Pool
    konto: KontoSql | None
    insert: Callable[[dict[str, Any]], Awaitable[int]]
    fetch: Callable[[int], Awaitable[dict[str, Any]]]


ASSET_COLUMNS = (
    "user_id",
    "type",
    "name",
    "current_value",
    "citycode",
    "latitude",
    "longitude",
    "surface",
    "property_type",
)


@pytest.fixture(params=["postgresql", *ENGINES])
async def place(
    request: pytest.FixtureRequest, pool: asyncpg.Pool, tmp_path: Path
) -> AsyncIterator[Place]:
    if request.param == "postgresql":
        await pool.execute(PG_ESTIMATION_COLUMNS)
        await pool.execute("INSERT INTO users (id, email) VALUES (1, 'a@example.org')")

        async def pg_insert(values: dict[str, Any]) -> int:
            cols = [c for c in ASSET_COLUMNS if c in values]
            marks = ", ".join(f"${n}" for n in range(1, len(cols) + 1))
            got: int = await pool.fetchval(
                f"INSERT INTO assets ({', '.join(cols)}) VALUES ({marks}) RETURNING id",
                *[values[c] for c in cols],
            )
            return got

        async def pg_fetch(asset_id: int) -> dict[str, Any]:
            row = await pool.fetchrow(
                "SELECT current_value::float8 AS current_value, estimated_price_m2,"
                " estimated_value, estimation_date FROM assets WHERE id = $1",
                asset_id,
            )
            assert row is not None
            return dict(row)

        yield Place("postgresql", pool, None, pg_insert, pg_fetch)
        return
    path = webapp_konto(tmp_path / "konto.db")
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO users (id, email) VALUES (1, 'a@example.org')")
    conn.close()
    async with konto_on(request.param, path) as konto:
        await lite_schema.create_missing(konto)
        yield Place(request.param, pool, konto, _lite_insert(path), _lite_fetch(konto))


def _lite_insert(path: Path) -> Callable[[dict[str, Any]], Awaitable[int]]:
    """Assets written as the web app writes them, on its own connection to the file."""

    async def lite_insert(values: dict[str, Any]) -> int:
        cols = [c for c in ASSET_COLUMNS if c in values]
        with sqlite3.connect(path) as conn:
            cur = conn.execute(
                f"INSERT INTO assets ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                [values[c] for c in cols],
            )
            new = cur.lastrowid
        conn.close()
        assert new is not None
        return new

    return lite_insert


def _lite_fetch(konto: KontoSql) -> Callable[[int], Awaitable[dict[str, Any]]]:
    async def lite_fetch(asset_id: int) -> dict[str, Any]:
        [row] = await konto.read(
            "SELECT current_value, estimated_price_m2, estimated_value, estimation_date"
            " FROM assets WHERE id = ?",
            (asset_id,),
        )
        return dict(
            zip(
                ("current_value", "estimated_price_m2", "estimated_value", "estimation_date"),
                row,
                strict=True,
            )
        )

    return lite_fetch


@pytest.fixture
async def dvf() -> AsyncIterator[tuple[DvfSandbox, str]]:
    sandbox = DvfSandbox()
    sample(sandbox)
    async with sandbox.serve() as base:
        yield sandbox, base


def new_ctx(run_id: int = 1) -> RunContext:
    return RunContext(
        run_id=run_id,
        job=ESTIMATIONS,
        trigger="manual",
        scheduled_for=None,
        started_at=datetime(2026, 12, 7, 3, 0, tzinfo=UTC),
        log=structlog.get_logger().bind(job=ESTIMATIONS),
    )


def flat(**extra: Any) -> dict[str, Any]:
    return {"user_id": 1, "type": "real_estate", "name": "Flat", **extra}


async def run(place: Place, http: aiohttp.ClientSession, base: str, run_id: int = 1) -> RunContext:
    ctx = new_ctx(run_id)
    client = DvfClient(http, base, attempts=2, backoff=0.01, rate=1000)
    await job.refresh_estimations(place.pool, ctx, client, None, place.konto)
    return ctx


async def test_estimates_equal_the_hand_computation_and_files_are_read_once(
    place: Place, dvf: tuple[DvfSandbox, str], http: aiohttp.ClientSession
) -> None:
    sandbox, base = dvf
    a = await place.insert(
        flat(
            current_value=123456.0,
            citycode=LYON,
            latitude=45.7670,
            longitude=4.8340,
            surface=50.0,
            property_type="Appartement",
        )
    )
    house = await place.insert(
        flat(
            name="House",
            citycode=LYON,
            latitude=45.7670,
            longitude=4.8340,
            surface=80.0,
            property_type="Maison",
        )
    )
    nowhere = await place.insert(flat(name="No coordinates", citycode=LYON, surface=42.5))
    overseas = await place.insert(
        flat(name="Réunion", citycode=REUNION, latitude=-20.88, longitude=55.45, surface=70.0)
    )
    failing = await place.insert(flat(name="Paris", citycode=PARIS, surface=30.0))
    bad_code = await place.insert(flat(name="Typo", citycode="ABCDE", surface=30.0))
    no_sale = await place.insert(flat(name="Village", citycode=EMPTY, surface=90.0))
    zero = await place.insert(flat(name="No surface", citycode=LYON, surface=0.0))
    car = await place.insert(
        {"user_id": 1, "type": "vehicle", "name": "Car", "citycode": LYON, "surface": 5.0}
    )

    ctx = await run(place, http, base)

    # Flats of Lyon, per m²: 5000 (2023-1), 5500 (2023-2), 5224.68 (2023-3, three lots),
    # 4500 (2022-1, no coordinates), 5400 (2022-2); five flats, so flats only.
    # Sorted: 4500, 5000, 5224.68, 5400, 5500: median element 2 = 5224.68 -> 5225;
    # x 50 m² = 261234; quartiles elements 1 and 3: 5000 and 5400.
    got = await place.fetch(a)
    assert (got["estimated_price_m2"], got["estimated_value"]) == (5225, 261234)
    assert got["estimation_date"] == "2026-12-07T03:00:00.000Z"
    assert got["current_value"] == 123456.0
    # Two houses only (4500, 5000): every type, 7 sales sorted 4500, 4500, 5000, 5000,
    # 5224.68, 5400, 5500: median element 3 = 5000; x 80 = 400000; quartiles 4500 and 5400.
    got = await place.fetch(house)
    assert (got["estimated_price_m2"], got["estimated_value"]) == (5000, 400000)
    # No coordinates: every flat, the same median; 5224.68 x 42.5 = 222048.9 -> 222049.
    got = await place.fetch(nowhere)
    assert (got["estimated_price_m2"], got["estimated_value"]) == (5225, 222049)
    # 97411 is in department 974: 180000 / 60 = 3000 a m², x 70 = 210000.
    got = await place.fetch(overseas)
    assert (got["estimated_price_m2"], got["estimated_value"]) == (3000, 210000)
    for untouched in (failing, bad_code, no_sale, zero, car):
        got = await place.fetch(untouched)
        assert (got["estimated_price_m2"], got["estimated_value"], got["estimation_date"]) == (
            None,
            None,
            None,
        )

    records = {r["asset_id"]: r for r in await place.pool.fetch("SELECT * FROM kontod_estimations")}
    assert set(records) == {a, house, nowhere, overseas}
    assert (records[a]["sales_used"], records[a]["low_m2"], records[a]["high_m2"]) == (
        5,
        5000,
        5400,
    )
    assert (records[a]["same_type"], records[a]["nearest"]) == (True, True)
    assert (records[house]["sales_used"], records[house]["low_m2"], records[house]["high_m2"]) == (
        7,
        4500,
        5400,
    )
    assert records[house]["same_type"] is False
    assert (records[nowhere]["sales_used"], records[nowhere]["nearest"]) == (5, False)

    counts = ctx.counts
    assert counts["assets"] == 7  # the zero surface and the vehicle are not eligible
    assert (counts["items_estimated"], counts["items_skipped"], counts["items_failed"]) == (4, 1, 2)
    assert (counts["assets_failed_source"], counts["assets_failed_citycode"]) == (1, 1)
    # The house, and the overseas flat (one sale in its commune): every type.
    assert counts["assets_without_coordinates"] == 1
    assert counts["assets_all_types"] == 2
    assert counts["mutations_several_dwellings"] == 1 and counts["mutations_too_small"] == 1
    assert counts["mutations_not_sales"] == 1
    assert (
        counts["asset_sales_" + str(a)],
        counts[f"asset_low_m2_{a}"],
        counts[f"asset_high_m2_{a}"],
    ) == (5, 5000, 5400)
    # Each file of each commune asked for once, whatever the number of its assets: the
    # listing, then 2024 (404), 2023 and 2022 of Lyon, Réunion and the empty commune; Paris
    # stops at its first file (503, asked twice: two attempts).
    lyon = [f"/geo-dvf/latest/csv/{y}/communes/69/{LYON}.csv" for y in (2024, 2023, 2022)]
    assert [sandbox.requests[p] for p in lyon] == [1, 1, 1]
    assert sandbox.requests[f"/geo-dvf/latest/csv/2023/communes/974/{REUNION}.csv"] == 1
    assert sandbox.requests[f"/geo-dvf/latest/csv/2023/communes/97/{REUNION}.csv"] == 0
    assert sandbox.requests[f"/geo-dvf/latest/csv/2024/communes/75/{PARIS}.csv"] == 2
    assert sandbox.requests["/geo-dvf/latest/csv/"] == 1
    assert sandbox.file_requests() == 3 + 3 + 3 + 2
    assert (counts["files_fetched"], counts["files_missing"]) == (3, 6)


async def test_a_second_run_on_an_unchanged_source_reads_nothing_new(
    place: Place, dvf: tuple[DvfSandbox, str], http: aiohttp.ClientSession
) -> None:
    sandbox, base = dvf
    a = await place.insert(flat(citycode=LYON, latitude=45.767, longitude=4.834, surface=50.0))
    await run(place, http, base, run_id=1)
    before = sandbox.answers[200]
    ctx = await run(place, http, base, run_id=2)
    # Lyon's two files answered 304 (their copy used), the missing year 404 again.
    assert sandbox.answers[200] - before == 1  # the listing only
    assert sandbox.answers[304] == 2
    assert (ctx.counts["files_fetched"], ctx.counts["files_unchanged"]) == (0, 2)
    got = await place.fetch(a)
    assert (got["estimated_price_m2"], got["estimated_value"]) == (5225, 261234)
    # A file that changes is read again: a sixth flat at 6000 a m² moves the median up.
    sandbox.put(
        2024,
        LYON,
        [Mutation("2024-1", "2024-01-05", "300000", [Lot("Appartement", "50")], "45.767", "4.834")],
    )
    ctx = await run(place, http, base, run_id=3)
    assert ctx.counts["files_fetched"] == 1
    # Sorted 4500, 5000, 5224.68, 5400, 5500, 6000: element 3 = 5400; x 50 = 270000.
    got = await place.fetch(a)
    assert (got["estimated_price_m2"], got["estimated_value"]) == (5400, 270000)
    # Another source (KONTOD_DVF_URL changed): kontod's copies are not used there.
    ctx = await run(place, http, base.replace("127.0.0.1", "localhost"), run_id=4)
    assert (ctx.counts["files_fetched"], ctx.counts["files_unchanged"]) == (3, 0)


async def test_no_eligible_asset_asks_the_source_nothing(
    place: Place, dvf: tuple[DvfSandbox, str], http: aiohttp.ClientSession
) -> None:
    sandbox, base = dvf
    await place.insert(flat(citycode=LYON, surface=None))
    ctx = await run(place, http, base)
    assert ctx.counts["assets"] == 0
    assert sum(sandbox.requests.values()) == 0


async def test_the_run_is_an_error_only_when_every_asset_failed(
    place: Place, dvf: tuple[DvfSandbox, str], http: aiohttp.ClientSession
) -> None:
    _, base = dvf
    await place.insert(flat(citycode=PARIS, surface=30.0))
    await place.insert(flat(citycode="ABCDE", surface=30.0))
    with pytest.raises(job.EstimationsFailed, match="every one of the 2 assets failed"):
        await run(place, http, base)


async def test_without_the_columns_or_table_the_job_is_not_configured(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # kontod's own minimal Konto tables in PostgreSQL: no citycode, no audit_log.
    specs = await settle(declare_jobs(Settings(), pool))
    reasons = {s.name: s.not_configured for s in specs}
    assert "has no column citycode" in str(reasons[ESTIMATIONS])
    assert reasons["prune-audit-log"] == "Konto's audit_log table does not exist in PostgreSQL"
    # The web app's own SQLite tables have them both.
    konto = open_sqlite(str(webapp_konto(tmp_path / "konto.db")), busy_timeout=5)
    try:
        specs = await settle(declare_jobs(Settings(), pool, konto=konto))
        reasons = {s.name: s.not_configured for s in specs}
        assert reasons[ESTIMATIONS] is None and reasons["prune-audit-log"] is None
    finally:
        await konto.close()


async def test_estimates_are_exported_as_metrics_by_a_daemon(
    dsn: str, dvf: tuple[DvfSandbox, str]
) -> None:
    from tests.daemon_harness import TOKEN, run_ended, running_daemon, settings_for

    _, base = dvf
    pool = await asyncpg.connect(dsn)
    try:
        await pool.execute(PG_ESTIMATION_COLUMNS)
        await pool.execute("INSERT INTO users (id, email) VALUES (1, 'a@example.org')")
        asset = await pool.fetchval(
            "INSERT INTO assets (user_id, type, name, citycode, latitude, longitude, surface)"
            " VALUES (1, 'real_estate', 'Flat', $1, 45.767, 4.834, 50) RETURNING id",
            LYON,
        )
    finally:
        await pool.close()
    settings = settings_for(dsn, estimations={"dvf_url": base})
    async with running_daemon(settings) as (daemon, url), aiohttp.ClientSession() as client:
        async with client.post(
            f"{url}/jobs/{ESTIMATIONS}/run", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            assert resp.status == 202, await resp.text()
            run_id = (await resp.json())["runId"]
        assert await run_ended(daemon, ESTIMATIONS, run_id) == "success"
        await daemon.runner.refresh_stats()  # type: ignore[union-attr]
        async with client.get(f"{url}/metrics") as resp:
            text = await resp.text()
    assert f'kontod_estimation_sales_used{{asset_id="{asset}"}} 5.0' in text
    assert f'kontod_estimation_low_price_m2{{asset_id="{asset}"}} 5000.0' in text
    assert f'kontod_estimation_high_price_m2{{asset_id="{asset}"}} 5400.0' in text
    assert 'kontod_estimation_failed_assets{reason="source"} 0.0' in text
    assert f'kontod_job_configured{{job_name="{ESTIMATIONS}"}} 1.0' in text
    assert 'kontod_job_configured{job_name="prune-audit-log"} 0.0' in text
    assert "kontod_estimation_latest_timestamp_seconds " in text


async def test_a_run_that_lost_its_claim_writes_no_estimate(
    place: Place, dvf: tuple[DvfSandbox, str], http: aiohttp.ClientSession
) -> None:
    sandbox, base = dvf
    a = await place.insert(flat(citycode=LYON, latitude=45.767, longitude=4.834, surface=50.0))
    ctx = new_ctx(run_id=3)
    if place.konto is not None:
        # A newer run (7) took the job over and raised the fence in Konto's database.
        await place.konto.advance_fence(Fence(ESTIMATIONS, 7))
    else:

        async def lost(conn: Connection) -> None:
            raise ClaimLost("taken over by run 7")

        ctx.fence = lost
    client = DvfClient(http, base, attempts=2, backoff=0.01, rate=1000)
    with pytest.raises(ClaimLost):
        await job.refresh_estimations(place.pool, ctx, client, None, place.konto)
    got = await place.fetch(a)
    assert (got["estimated_price_m2"], got["estimated_value"]) == (None, None)
    assert await place.pool.fetchval("SELECT count(*) FROM kontod_estimations") == 0
    if place.konto is not None:
        # The fence is raised before anything is read: the source was not asked either.
        assert sum(sandbox.requests.values()) == 0


async def test_a_run_by_hand_while_not_configured_does_nothing_and_succeeds(
    pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    from kontod.jobs.audit import prune

    ctx = new_ctx()
    client = DvfClient(http, "http://127.0.0.1:9/geo-dvf/latest/csv", attempts=1)
    await job.refresh_estimations(pool, ctx, client, None, None)
    assert dict(ctx.counts) == {"not_configured": 1}
    ctx = new_ctx()
    await prune(pool, ctx, 90, 100, None)
    assert dict(ctx.counts) == {"not_configured": 1}


async def test_a_surface_that_is_no_number_leaves_its_asset_out(
    place: Place, dvf: tuple[DvfSandbox, str], http: aiohttp.ClientSession
) -> None:
    sandbox, base = dvf
    # Both pass `surface > 0`: NaN in PostgreSQL, text in SQLite.
    odd = float("nan") if place.konto is None else "grand"
    await place.insert(flat(citycode=LYON, surface=odd))
    ctx = await run(place, http, base)
    assert (ctx.counts["assets"], ctx.counts["assets_surface_unreadable"]) == (0, 1)
    assert sum(sandbox.requests.values()) == 0
