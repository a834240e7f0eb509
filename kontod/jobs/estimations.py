"""``refresh-property-estimations``: an estimate of every real-estate asset's value from the
public DVF sales of its commune, written where the web app shows it.

An asset takes part when its type is ``real_estate`` and it has a ``citycode`` and a
``surface`` above 0. The assets are grouped by commune; each commune's files (one per year,
kontod/providers/dvf.py) are asked for once per run, conditionally, against the copy kept in
``kontod_dvf_files`` (so an unchanged file is a 304 and its sales come from the copy).

The estimate is the web app's (``estimate``): the sales of the asset's ``property_type``
(``Appartement`` when unset) when there are at least 5, else every dwelling sale; the 50
nearest to the asset by the web app's distance (a sale without coordinates counts as
99 999 m away); the price per m² of each; the element ``floor(n / 2)`` of their sorted list,
rounded half up, is ``estimated_price_m2``; ``round(that median * surface)`` is
``estimated_value``; the run's start is ``estimation_date``. ``current_value`` is never
touched. An asset without coordinates cannot have nearest sales: it takes every comparable
sale of its commune, and is counted (``assets_without_coordinates``) and recorded
(``nearest = false``). Beside it, ``kontod_estimations`` keeps, per asset, how many sales were
used and the first and third quartiles of their price per m², and the last run exports them.

One asset's failure (its commune's files unreadable or unavailable, a citycode that is not a
commune code) is that asset's: it is counted and the others are written. The run is an error
only when every asset failed. With no eligible asset the run asks the source nothing.

Both places of Konto's tables: kontod's PostgreSQL (``konto=None``; one transaction per commune
writes the assets and ``kontod_estimations`` under the run's claim), or the web app's
SQLite-family database (the assets in one fenced transaction per commune, then
``kontod_estimations`` in PostgreSQL: a crash between the two leaves the record one run behind,
which the next run writes over). A database whose ``assets`` table lacks a column the job needs
(kontod's own minimal Konto tables have none of them) makes the job not configured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import aiohttp
import asyncpg

from kontod.konto.fenced import FencedWriter
from kontod.konto.schema import CASTS, KontoSchema, KontoSchemaError, iso_text
from kontod.konto.store import KontoSql, Statement
from kontod.providers import dvf
from kontod.scheduler.contract import (
    Connection,
    CountFamily,
    Freshness,
    JobBody,
    JobExports,
    Requirement,
    RunContext,
)

# The web app's rules.
NEAREST = 50
MIN_SAME_TYPE = 5
DEFAULT_TYPE = "Appartement"
NO_COORDINATES_M = 99_999.0
METRES_PER_DEGREE = 111_000.0
YEARS = 3

# The assets columns the job reads and writes.
COLUMNS = (
    "id",
    "type",
    "citycode",
    "latitude",
    "longitude",
    "surface",
    "property_type",
    "estimated_value",
    "estimated_price_m2",
    "estimation_date",
)
WRITTEN = ("estimated_price_m2", "estimated_value", "estimation_date")

FAILED = CountFamily(
    metric="kontod_estimation_failed_assets",
    doc="Assets the last estimation run could not estimate, by reason",
    prefix="assets_failed_",
    label="reason",
    per_job=False,
    always=("source", "citycode"),
    shown_with="assets",
)
SALES_USED = CountFamily(
    metric="kontod_estimation_sales_used",
    doc="DVF sales the last estimate of each asset was made from",
    prefix="asset_sales_",
    label="asset_id",
    per_job=False,
    in_run_counts=False,
)
LOW_M2 = CountFamily(
    metric="kontod_estimation_low_price_m2",
    doc="First quartile of the price per m2 of the sales behind each asset's last estimate",
    prefix="asset_low_m2_",
    label="asset_id",
    per_job=False,
    in_run_counts=False,
)
HIGH_M2 = CountFamily(
    metric="kontod_estimation_high_price_m2",
    doc="Third quartile of the price per m2 of the sales behind each asset's last estimate",
    prefix="asset_high_m2_",
    label="asset_id",
    per_job=False,
    in_run_counts=False,
)


async def latest_estimation(pool: asyncpg.Pool | Connection) -> datetime | None:
    """When the newest estimate kontod recorded was made."""
    value: datetime | None = await pool.fetchval("SELECT max(estimated_at) FROM kontod_estimations")
    return value


EXPORTS = JobExports(
    families=(FAILED, SALES_USED, LOW_M2, HIGH_M2),
    freshness=(
        Freshness(
            metric="kontod_estimation_latest_timestamp_seconds",
            doc="When the newest property estimate recorded in kontod_estimations was made",
            probe=latest_estimation,
        ),
    ),
    # Every eligible asset is estimated each run: none found, or far fewer than the run before,
    # reads the wrong or an emptied database.
    population="assets",
)


class EstimationsFailed(Exception):
    """Every eligible asset failed; the message gives the first reason."""


# --- the estimate, a pure function -------------------------------------------------------


@dataclass(frozen=True)
class Asset:
    id: int
    citycode: str
    latitude: float | None
    longitude: float | None
    surface: Decimal
    property_type: str | None


@dataclass(frozen=True)
class Estimate:
    asset_id: int
    price_m2: int
    value: int
    sales_used: int
    low_m2: int
    high_m2: int
    same_type: bool
    nearest: bool


def distance_m(asset: Asset, sale: dvf.Sale) -> float:
    """The web app's distance in metres: degrees times 111 km, longitude shrunk by the cosine
    of the asset's latitude; 99 999 when either side has no coordinates."""
    if (
        asset.latitude is None
        or asset.longitude is None
        or sale.latitude is None
        or sale.longitude is None
    ):
        return NO_COORDINATES_M
    north = (sale.latitude - asset.latitude) * METRES_PER_DEGREE
    east = (
        (sale.longitude - asset.longitude)
        * METRES_PER_DEGREE
        * math.cos(math.radians(asset.latitude))
    )
    return math.hypot(north, east)


def _round(value: Decimal) -> int:
    """Half up, as JavaScript's Math.round does for positive numbers."""
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def estimate(asset: Asset, sales: Sequence[dvf.Sale]) -> Estimate | None:
    """The asset's estimate from its commune's sales (None: no sale to compare with)."""
    wanted = asset.property_type or DEFAULT_TYPE
    same = [s for s in sales if s.kind == wanted]
    same_type = len(same) >= MIN_SAME_TYPE
    chosen = same if same_type else list(sales)
    if not chosen:
        return None
    nearest = asset.latitude is not None and asset.longitude is not None
    if nearest:
        # sorted is stable: sales at one distance keep the files' order, as in the web app.
        chosen = sorted(chosen, key=lambda s: distance_m(asset, s))[:NEAREST]
    prices = sorted(s.price_m2 for s in chosen)
    n = len(prices)
    median = prices[n // 2]
    return Estimate(
        asset_id=asset.id,
        price_m2=_round(median),
        value=_round(median * asset.surface),
        sales_used=n,
        low_m2=_round(prices[n // 4]),
        high_m2=_round(prices[(3 * n) // 4]),
        same_type=same_type,
        nearest=nearest,
    )


# --- Konto's assets, on either engine ----------------------------------------------------

_PG_COLUMNS_SQL = """
SELECT column_name::text, data_type::text FROM information_schema.columns
 WHERE table_schema = current_schema() AND table_name = 'assets'
"""
_ELIGIBLE = "type = 'real_estate' AND citycode IS NOT NULL AND trim(citycode) <> '' AND surface > 0"
_PG_ASSETS_SQL = f"""
SELECT id::bigint AS id, citycode::text AS citycode, latitude::float8 AS latitude,
       longitude::float8 AS longitude, surface::numeric::text AS surface,
       property_type::text AS property_type
  FROM assets WHERE {_ELIGIBLE} ORDER BY id
"""
_LITE_ASSETS_SQL = f"""
SELECT id, citycode, latitude, longitude, surface, property_type
  FROM assets WHERE {_ELIGIBLE} ORDER BY id
"""
# One statement per commune: the estimates as one JSON array [[id, m2, value, date], ...].
_LITE_WRITE_SQL = """
UPDATE assets
   SET estimated_price_m2 = v.value ->> 1, estimated_value = v.value ->> 2,
       estimation_date = v.value ->> 3
  FROM json_each(?) AS v
 WHERE assets.id = v.value ->> 0
"""
_RECORD_SQL = """
INSERT INTO kontod_estimations AS k
       (asset_id, commune, run_id, estimated_at, sales_used, same_type, nearest, price_m2,
        low_m2, high_m2, value)
SELECT v.asset_id, $2, $3, $4, v.sales_used, v.same_type, v.nearest, v.price_m2, v.low_m2,
       v.high_m2, v.value
  FROM unnest($1::bigint[], $5::int[], $6::bool[], $7::bool[], $8::numeric[], $9::numeric[],
              $10::numeric[], $11::numeric[])
       AS v(asset_id, sales_used, same_type, nearest, price_m2, low_m2, high_m2, value)
ON CONFLICT (asset_id) DO UPDATE
   SET commune = excluded.commune, run_id = excluded.run_id,
       estimated_at = excluded.estimated_at, sales_used = excluded.sales_used,
       same_type = excluded.same_type, nearest = excluded.nearest,
       price_m2 = excluded.price_m2, low_m2 = excluded.low_m2, high_m2 = excluded.high_m2,
       value = excluded.value
"""


async def _pg_columns(pool: asyncpg.Pool) -> dict[str, str]:
    return {r[0]: r[1] for r in await pool.fetch(_PG_COLUMNS_SQL)}


async def _lite_columns(konto: KontoSql) -> dict[str, str]:
    return {str(r[1]): str(r[2] or "") for r in await konto.read("PRAGMA table_info(assets)")}


def requirement(pool: asyncpg.Pool, konto: KontoSql | None) -> Requirement:
    """Why the job cannot run on this Konto (an ``assets`` column missing), or None."""

    async def check() -> str | None:
        found = await (_pg_columns(pool) if konto is None else _lite_columns(konto))
        return _missing(found, "PostgreSQL" if konto is None else str(konto.location))

    return check


def _missing(found: Mapping[str, str], where: str) -> str | None:
    if not found:
        return f"Konto's assets table does not exist in {where}"
    missing = [c for c in COLUMNS if c not in found]
    if missing:
        return f"Konto's assets table in {where} has no column {', '.join(missing)}"
    return None


def _surface(value: Any) -> Decimal | None:
    """A REAL as PostgreSQL reads float8::numeric (15 significant digits), text exactly; None
    for what is no finite positive number (NaN passes ``surface > 0`` in PostgreSQL, text in
    SQLite)."""
    try:
        found = Decimal(f"{value:.15g}") if isinstance(value, float) else Decimal(str(value))
    except InvalidOperation:
        return None
    return found if found.is_finite() and found > 0 else None


def _coordinate(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _assets(ctx: RunContext, rows: Iterable[Sequence[Any]]) -> list[Asset]:
    """The eligible assets; one whose surface is no number is left out, counted and named."""
    out, unreadable = [], []
    for asset_id, citycode, lat, lon, surface, kind in rows:
        area = _surface(surface)
        if area is None:
            unreadable.append(int(asset_id))
            continue
        out.append(
            Asset(
                int(asset_id),
                str(citycode).strip().upper(),
                _coordinate(lat),
                _coordinate(lon),
                area,
                str(kind) if kind else None,
            )
        )
    if unreadable:
        ctx.counts["assets_surface_unreadable"] = len(unreadable)
        ctx.log.warning("estimations.surface_unreadable", assets=unreadable[:20])
    return out


class _Konto:
    """The assets table on whichever engine holds it."""

    def __init__(self, pool: asyncpg.Pool, konto: KontoSql | None, ctx: RunContext) -> None:
        self.pool = pool
        self.konto = konto
        self.ctx = ctx
        self.writer: FencedWriter | None = None
        self.schema: KontoSchema | None = None

    async def start(self) -> list[Asset]:
        """Check the columns, take the fence (SQLite family), read the eligible assets."""
        if self.konto is None:
            found = await _pg_columns(self.pool)
            reason = _missing(found, "PostgreSQL")
            if reason is not None:
                raise KontoSchemaError(reason)
            self.schema = KontoSchema(
                {("assets", c): CASTS[found[c]] for c in WRITTEN if found[c] in CASTS}
            )
            for column in WRITTEN:
                if ("assets", column) not in self.schema.casts:
                    raise KontoSchemaError(
                        f"Konto's column assets.{column} has type {found[column]}; kontod"
                        " writes " + ", ".join(sorted(CASTS))
                    )
            return _assets(self.ctx, (tuple(r) for r in await self.pool.fetch(_PG_ASSETS_SQL)))
        reason = _missing(await _lite_columns(self.konto), str(self.konto.location))
        if reason is not None:
            raise KontoSchemaError(reason)
        self.writer = await FencedWriter.start(self.konto, self.pool, self.ctx)
        return _assets(self.ctx, await self.konto.read(_LITE_ASSETS_SQL))

    async def write(self, commune: str, estimates: list[Estimate], at: datetime) -> int:
        """Write one commune's estimates and their record; the assets changed."""
        if self.writer is not None:
            rows = [[e.asset_id, e.price_m2, e.value, iso_text(at)] for e in estimates]
            [result] = await self.writer.write([Statement(_LITE_WRITE_SQL, (json.dumps(rows),))])
            async with self.pool.acquire() as conn, conn.transaction():
                await self.ctx.check_claim(conn)
                await _record(conn, self.ctx, commune, estimates, at)
            return result.changes
        assert self.schema is not None
        enc = self.schema.encode
        async with self.pool.acquire() as conn, conn.transaction():
            await self.ctx.check_claim(conn)
            status = await conn.execute(
                f"""UPDATE assets a
                       SET estimated_price_m2 = v.m2, estimated_value = v.value,
                           estimation_date = v.at
                      FROM unnest($1::bigint[],
                                  $2::{self.schema.cast("assets", "estimated_price_m2")}[],
                                  $3::{self.schema.cast("assets", "estimated_value")}[],
                                  $4::{self.schema.cast("assets", "estimation_date")}[])
                           AS v(id, m2, value, at)
                     WHERE a.id = v.id""",
                [e.asset_id for e in estimates],
                enc("assets", "estimated_price_m2", [e.price_m2 for e in estimates]),
                enc("assets", "estimated_value", [e.value for e in estimates]),
                enc("assets", "estimation_date", [at] * len(estimates)),
            )
            await _record(conn, self.ctx, commune, estimates, at)
        return int(status.split()[-1])


async def _record(
    conn: Connection, ctx: RunContext, commune: str, estimates: list[Estimate], at: datetime
) -> None:
    await conn.execute(
        _RECORD_SQL,
        [e.asset_id for e in estimates],
        commune,
        ctx.run_id,
        at,
        [e.sales_used for e in estimates],
        [e.same_type for e in estimates],
        [e.nearest for e in estimates],
        [Decimal(e.price_m2) for e in estimates],
        [Decimal(e.low_m2) for e in estimates],
        [Decimal(e.high_m2) for e in estimates],
        [Decimal(e.value) for e in estimates],
    )


# --- the DVF files of a run, each asked for once -----------------------------------------


def _sales_json(sales: Sequence[dvf.Sale]) -> str:
    return json.dumps(
        [[s.kind, str(s.price), str(s.surface), s.latitude, s.longitude] for s in sales]
    )


def _sales_of(text: str) -> list[dvf.Sale]:
    return [
        dvf.Sale(kind, Decimal(price), Decimal(surface), lat, lon)
        for kind, price, surface, lat, lon in json.loads(text)
    ]


class _Files:
    """The commune files of one run: asked for at most once each, against kontod's copy."""

    def __init__(self, pool: asyncpg.Pool, client: dvf.DvfClient, ctx: RunContext) -> None:
        self.pool = pool
        self.client = client
        self.ctx = ctx

    async def sales(self, commune: str, years: Sequence[int]) -> list[dvf.Sale]:
        """Every kept sale of the commune over ``years``, newest year first."""
        kept = {
            r["year"]: r
            for r in await self.pool.fetch(
                "SELECT year, url, etag, last_modified, sales::text AS sales"
                "  FROM kontod_dvf_files WHERE commune = $1",
                commune,
            )
        }
        out: list[dvf.Sale] = []
        for year in years:
            copy = kept.get(year)
            if copy is not None and copy["url"] != self.client.file_url(commune, year):
                copy = None  # read from another source (KONTOD_DVF_URL changed)
            validators = (
                dvf.Validators(copy["etag"], copy["last_modified"]) if copy is not None else None
            )
            got = await self.client.fetch(commune, year, validators)
            counts = self.ctx.counts
            if got.state == "missing":
                counts["files_missing"] += 1
                await self.pool.execute(
                    "DELETE FROM kontod_dvf_files WHERE commune = $1 AND year = $2", commune, year
                )
            elif got.state == "unchanged":
                assert copy is not None
                counts["files_unchanged"] += 1
                await self.pool.execute(
                    "UPDATE kontod_dvf_files SET checked_at = now()"
                    " WHERE commune = $1 AND year = $2",
                    commune,
                    year,
                )
                out.extend(_sales_of(copy["sales"]))
            else:
                assert got.grouping is not None
                grouping = got.grouping
                counts["files_fetched"] += 1
                counts["file_bytes"] += got.size
                counts["mutations_several_dwellings"] += grouping.several_dwellings
                counts["mutations_not_sales"] += grouping.not_a_sale
                counts["mutations_unreadable"] += grouping.unreadable
                counts["mutations_too_small"] += grouping.too_small
                await self.pool.execute(
                    """INSERT INTO kontod_dvf_files
                              (commune, year, url, etag, last_modified, sales)
                       VALUES ($1, $2, $6, $3, $4, $5::jsonb)
                       ON CONFLICT (commune, year) DO UPDATE
                          SET url = excluded.url, etag = excluded.etag,
                              last_modified = excluded.last_modified, sales = excluded.sales,
                              fetched_at = now(), checked_at = now()""",
                    commune,
                    year,
                    got.validators.etag,
                    got.validators.last_modified,
                    _sales_json(grouping.sales),
                    self.client.file_url(commune, year),
                )
                out.extend(grouping.sales)
        return out


# --- the run ------------------------------------------------------------------------------


async def refresh_estimations(
    pool: asyncpg.Pool,
    ctx: RunContext,
    client: dvf.DvfClient,
    years: Sequence[int] | None,
    konto: KontoSql | None = None,
) -> None:
    """Estimate every eligible asset, commune by commune."""
    side = _Konto(pool, konto, ctx)
    try:
        assets = await side.start()
    except KontoSchemaError as exc:
        # Run by hand while not configured: nothing to do, as the refresh job without a bank.
        ctx.counts["not_configured"] = 1
        ctx.log.warning("estimations.not_configured", reason=str(exc))
        return
    for key in ("assets", "items_estimated", "items_skipped", "items_failed", "files_fetched"):
        ctx.counts[key] += 0
    for reason in FAILED.always:
        ctx.count_in(FAILED, reason, 0)
    ctx.counts["assets"] = len(assets)
    ctx.report_progress(0, len(assets))
    if not assets:
        ctx.log.info("estimations.no_asset")
        return
    if years is None:
        years = (await client.years())[:YEARS]
    ctx.log.info("estimations.started", assets=len(assets), years=list(years))
    by_commune: dict[str, list[Asset]] = {}
    for asset in assets:
        by_commune.setdefault(asset.citycode, []).append(asset)
    files = _Files(pool, client, ctx)
    at = ctx.started_at.astimezone(UTC)
    done = 0
    first_error: str | None = None
    for commune, group in by_commune.items():
        try:
            dvf.department(commune)
            sales = await files.sales(commune, years)
        except (ValueError, dvf.DvfError) as exc:
            reason = "citycode" if isinstance(exc, ValueError) else "source"
            ctx.count_in(FAILED, reason, len(group))
            ctx.counts["items_failed"] += len(group)
            first_error = first_error or str(exc)
            ctx.log.error(
                "estimations.commune_failed",
                commune=commune,
                assets=[a.id for a in group],
                reason=reason,
                error=str(exc),
            )
        else:
            estimates = _estimate_all(ctx, group, sales)
            if estimates:
                written = await side.write(commune, estimates, at)
                ctx.counts["items_estimated"] += written
                ctx.counts["assets_vanished"] += len(estimates) - written
        done += len(group)
        ctx.report_progress(done, len(assets))
    ctx.log.info(
        "estimations.written",
        assets=len(assets),
        estimated=ctx.counts["items_estimated"],
        skipped=ctx.counts["items_skipped"],
        failed=ctx.counts["items_failed"],
        files_fetched=ctx.counts["files_fetched"],
        files_unchanged=ctx.counts["files_unchanged"],
    )
    if ctx.counts["items_failed"] == len(assets):
        raise EstimationsFailed(f"every one of the {len(assets)} assets failed: {first_error}")


def _estimate_all(ctx: RunContext, group: list[Asset], sales: list[dvf.Sale]) -> list[Estimate]:
    """The estimates of one commune's assets, counted; an asset with no sale is skipped."""
    out = []
    for asset in group:
        found = estimate(asset, sales)
        if found is None:
            ctx.counts["items_skipped"] += 1
            continue
        if not found.nearest:
            ctx.counts["assets_without_coordinates"] += 1
        if not found.same_type:
            ctx.counts["assets_all_types"] += 1
        ctx.counts["sales_used"] += found.sales_used
        ctx.count_in(SALES_USED, str(asset.id), found.sales_used)
        ctx.count_in(LOW_M2, str(asset.id), found.low_m2)
        ctx.count_in(HIGH_M2, str(asset.id), found.high_m2)
        out.append(found)
    return out


def make_body(
    pool: asyncpg.Pool,
    connect: Callable[[aiohttp.ClientSession], dvf.DvfClient],
    http: aiohttp.ClientSession | None = None,
    years: Sequence[int] | None = None,
    konto: KontoSql | None = None,
) -> JobBody:
    """The job body: ``years`` of sales (None: the three latest the source publishes), read
    by the client ``connect`` makes on ``http`` (None: a session of the run's own)."""

    async def body(ctx: RunContext) -> None:
        if http is not None:
            await refresh_estimations(pool, ctx, connect(http), years, konto)
            return
        async with aiohttp.ClientSession() as session:
            await refresh_estimations(pool, ctx, connect(session), years, konto)

    return body
