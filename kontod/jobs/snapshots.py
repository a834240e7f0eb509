"""``daily-snapshots``: one wealth snapshot per user and category for the run's local date,
in one currency, with one row per holding beside the category rows.

At the start of a run the rate sources are asked once (kontod/providers/rates.py). Then the users are
cut into ranges of ids of ``batch_size`` users each, and a few workers (``workers``, each on a
connection of its own) take the ranges one after another. Each batch is one statement in one
transaction, so the number of round trips grows with the number of batches, never with the
number of users, and no transaction lasts longer than a batch; with two workers the database
computes and writes two batches at once, one on each of its cores.

The statement converts every balance to the base currency with the rates chosen for the
snapshot date (a join), in exact decimals; an account whose currency has no usable rate is left
out of the totals and counted, never summed as if it were in the base currency. A balance or an
asset value that is not a number (NaN, Infinity) is left out and counted too, and a user whose
values the snapshot columns cannot hold (a float's range) fails alone: nothing of theirs is
written or removed that day, the other users of the batch are written.

The statement works on kontod's own tables (numeric money, boolean flags, date dates) and on
the tables Konto's web app creates (float money, 0/1 flags, text dates, holding rows without
currency and amount, the custom_name and address its holding names prefer): the types of the columns it reads and writes are looked up once per run,
and each one is handled by a fixed SQL fragment chosen from the lists below.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg

from kontod.konto.store import KontoSql
from kontod.providers import rates
from kontod.scheduler.contract import (
    Connection,
    CountFamily,
    Freshness,
    JobBody,
    JobExports,
    RunContext,
    run_workers,
)


async def latest_snapshot_date(db: asyncpg.Pool | Connection) -> date | None:
    """The newest date in patrimoine_snapshots (an index-only look-up).

    The cast is outside max(): Konto's web app stores the date as ISO text, whose order is
    the dates' order, and the index on the column still serves max().
    """
    value: date | None = await db.fetchval("SELECT max(date)::date FROM patrimoine_snapshots")
    return value


async def latest_snapshot_date_in(konto: KontoSql) -> date | None:
    """``latest_snapshot_date`` on Konto's SQLite-family database (the web app's unique key,
    which starts with the date, serves max())."""
    rows = await konto.read("SELECT max(date) FROM patrimoine_snapshots")
    value = rows[0][0] if rows else None
    return None if value is None else date.fromisoformat(str(value)[:10])


class DayTotal(NamedTuple):
    """One date of ``kontod history``: snapshot rows, users, the sum of the users' totals."""

    day: date
    snapshot_rows: int
    users: int
    total: Decimal | None


async def daily_totals(pool: asyncpg.Pool, days: int, timezone: str) -> list[DayTotal]:
    """Snapshot rows, users and the sum of the users' totals per date over the last ``days``
    days in ``timezone``, newest first (``kontod history``)."""
    # date::date and ::numeric read Konto's web app's text dates and float money too.
    rows = await pool.fetch(
        """SELECT date::date AS day, count(*) AS snapshot_rows,
                  count(DISTINCT user_id) AS users,
                  sum(total_value::numeric) FILTER (WHERE category = 'total') AS total
             FROM patrimoine_snapshots
            WHERE date::date > (now() AT TIME ZONE $2)::date - $1::int
            GROUP BY 1 ORDER BY 1 DESC""",
        days,
        timezone,
    )
    return [DayTotal(r["day"], r["snapshot_rows"], r["users"], r["total"]) for r in rows]


async def daily_totals_in(konto: KontoSql, days: int, timezone: str) -> list[DayTotal]:
    """``daily_totals`` on Konto's SQLite-family database, whose dates are ISO text: the same
    dates, and the sums read the way PostgreSQL reads a float as numeric (15 digits)."""
    since = datetime.now(ZoneInfo(timezone)).date() - timedelta(days=days)
    rows = await konto.read(
        """SELECT date, count(*), count(DISTINCT user_id),
                  sum(CASE WHEN category = 'total' THEN total_value END)
             FROM patrimoine_snapshots WHERE date > ?
            GROUP BY date ORDER BY date DESC""",
        (since.isoformat(),),
    )
    return [
        DayTotal(
            date.fromisoformat(str(day)[:10]),
            int(count or 0),
            int(users or 0),
            None if total is None else Decimal(f"{float(total):.15g}"),
        )
        for day, count, users, total in rows
    ]


# Accounts left out of the totals, and the age of each rate, by currency: from the last run's
# counts (``unconverted_<CUR>``, ``rate_age_days_<CUR>``), so every replica exports the same.
UNCONVERTED = CountFamily(
    metric="kontod_snapshot_unconverted_accounts",
    doc="Accounts the last snapshot left out of the totals for want of a usable rate",
    prefix="unconverted_",
    label="currency",
)
RATE_AGE = CountFamily(
    metric="kontod_snapshot_rate_age_seconds",
    doc="Age, at the last snapshot's date, of the newest stored rate of each currency in use",
    prefix="rate_age_days_",
    label="currency",
    scale=86400.0,
)


def exports(konto: KontoSql | None = None) -> JobExports:
    """What the job exports; its freshness probe reads the snapshot dates where Konto's tables
    are (``konto``), never the empty ones migration 0001 leaves in kontod's PostgreSQL."""

    async def probe_konto(pool: asyncpg.Pool) -> date | None:
        assert konto is not None
        return await latest_snapshot_date_in(konto)

    return JobExports(
        families=(UNCONVERTED, RATE_AGE),
        freshness=(
            Freshness(
                metric="kontod_snapshot_latest_date_timestamp_seconds",
                doc="Midnight, in kontod's zone, of the newest date in patrimoine_snapshots",
                probe=latest_snapshot_date if konto is None else probe_konto,
            ),
        ),
        # A snapshot takes every user: a run that finds none, or far fewer than the last time,
        # reads the wrong or an emptied database.
        population="users",
        # The web app's dashboard button, which predates kontod's /jobs/{name}/run.
        trigger_paths=("/api/dashboard/snapshot",),
    )


EXPORTS = exports()

# How each column type is read or written. Only these fragments ever enter the statement.
# A 0/1 flag as the web app reads it (``hidden = 0``): a NULL one is left out. kontod's own
# boolean is NOT NULL.
_VISIBLE = {
    "boolean": "a.hidden IS NOT TRUE",
    "smallint": "a.hidden = 0",
    "integer": "a.hidden = 0",
    "bigint": "a.hidden = 0",
}
# $3 is the snapshot date; a text column holds it as YYYY-MM-DD whatever the DateStyle.
_DAY = {
    "date": "$3::date",
    "text": "to_char($3::date, 'YYYY-MM-DD')",
    "character varying": "to_char($3::date, 'YYYY-MM-DD')",
}
_MONEY = {"numeric": "numeric", "double precision": "double precision", "real": "real"}
# Whether a money value read from the database is a number ({x}: the column). PostgreSQL holds
# NaN and +-Infinity in floats, and in numeric too (Infinity since version 14); in exact numeric
# arithmetic adding 1 changes every finite value and none of those three, whatever the version.
_FINITE = {
    "numeric": "({x} + 1 <> {x})",
    "double precision": "({x} NOT IN ('NaN', 'Infinity', '-Infinity'))",
    "real": "({x} NOT IN ('NaN', 'Infinity', '-Infinity'))",
    "smallint": "true",
    "integer": "true",
    "bigint": "true",
}
# Whether an exact value ({x}) fits the money column it is written to: a float column refuses
# what overflows its range and what underflows it (non-zero, under its smallest normal value).
_FITS = {
    "numeric": "true",
    "double precision": (
        "({x} = 0 OR abs({x}) BETWEEN 2.2250738585072014e-308 AND 1.7976931348623157e308)"
    ),
    "real": "({x} = 0 OR abs({x}) BETWEEN 1.1754944e-38 AND 3.4028234e38)",
}
# A holding's name as the web app writes it (JavaScript's ``a || b || ''``: NULL and '' fall
# through): accounts custom_name || name, assets address || name. kontod's own minimal tables
# have no custom_name or address column: name alone there.
_NAME = "coalesce({preferred}nullif({x}.name::text, ''), '')"


def _name(types: Mapping[tuple[str, str], str], table: str, alias: str, preferred: str) -> str:
    first = f"nullif({alias}.{preferred}::text, ''), " if (table, preferred) in types else ""
    return _NAME.format(preferred=first, x=alias)


# How many invalid holdings and failed users of a batch its log line names (it counts them all).
SHOWN = 20

_COLUMNS_SQL = """
SELECT c.relname::text AS tbl, a.attname::text AS col, format_type(a.atttypid, NULL) AS type
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE a.attrelid IN (to_regclass('bank_accounts'), to_regclass('assets'),
                      to_regclass('patrimoine_snapshots'), to_regclass('holding_snapshots'))
   AND a.attnum > 0 AND NOT a.attisdropped
"""


# Runs of one batch at most, when other writers keep inserting its rows under it.
BATCH_ATTEMPTS = 3


class SchemaError(Exception):
    """A column the snapshot reads or writes has a type it does not handle."""


@dataclass(frozen=True)
class Conversion:
    """The base currency, how old a rate may be, and what the sources need to know."""

    base: str = "EUR"
    max_age_days: int = 7
    crypto_ids: Mapping[str, str] = field(default_factory=lambda: dict(rates.SHIPPED_CRYPTO_IDS))
    manual: Mapping[str, Decimal] = field(default_factory=dict)


@dataclass(frozen=True)
class Columns:
    """The SQL fragments for this database's column types."""

    visible: str
    snapshot_day: str
    snapshot_money: str
    touch_created_at: bool
    holding_day: str
    holding_money: str
    # None when holding_snapshots has no currency and amount columns (Konto's web app).
    holding_amount: str | None
    # The name a holding row gets, from bank_accounts (a) and assets (s).
    account_name: str
    asset_name: str
    # Conditions on the columns read (is a number) and on values written (fits the column).
    balance_finite: str = "true"
    current_finite: str = "true"
    purchase_finite: str = "true"
    snapshot_fits: str = "true"
    holding_fits: str = "true"
    amount_fits: str = "true"


def _pick(choices: Mapping[str, str], types: Mapping[tuple[str, str], str], col: str) -> str:
    tbl, name = col.split(".")
    found = types.get((tbl, name))
    if found is None:
        raise SchemaError(f"{col} does not exist; kontod's migrations create it")
    if found not in choices:
        raise SchemaError(
            f"{col} has type {found}; kontod handles {', '.join(sorted(choices))} there"
        )
    return choices[found]


async def columns(conn: Connection) -> Columns:
    """Look up, in one query, the types of the columns the snapshot reads and writes."""
    types = {(r["tbl"], r["col"]): r["type"] for r in await conn.fetch(_COLUMNS_SQL)}
    has_amount = {("holding_snapshots", "currency"), ("holding_snapshots", "amount")} <= set(types)
    return Columns(
        visible=_pick(_VISIBLE, types, "bank_accounts.hidden"),
        snapshot_day=_pick(_DAY, types, "patrimoine_snapshots.date"),
        snapshot_money=_pick(_MONEY, types, "patrimoine_snapshots.total_value"),
        touch_created_at=("patrimoine_snapshots", "created_at") in types,
        holding_day=_pick(_DAY, types, "holding_snapshots.date"),
        holding_money=_pick(_MONEY, types, "holding_snapshots.value"),
        holding_amount=_pick(_MONEY, types, "holding_snapshots.amount") if has_amount else None,
        account_name=_name(types, "bank_accounts", "a", "custom_name"),
        asset_name=_name(types, "assets", "s", "address"),
        balance_finite=_pick(_FINITE, types, "bank_accounts.balance").format(x="a.balance"),
        current_finite=_pick(_FINITE, types, "assets.current_value").format(x="s.current_value"),
        purchase_finite=_pick(_FINITE, types, "assets.purchase_price").format(x="s.purchase_price"),
        snapshot_fits=_pick(_FITS, types, "patrimoine_snapshots.total_value"),
        holding_fits=_pick(_FITS, types, "holding_snapshots.value"),
        amount_fits=_pick(_FITS, types, "holding_snapshots.amount") if has_amount else "true",
    )


# For the users whose id is in [$1, $2], for the date $3, in base currency $4 with rates at most
# $5 days old:
# - every visible account converted with the newest usable rate of its currency (none: NULL,
#   left out and counted), every asset valued in the base currency (its current value, else
#   its purchase price, else 0, a 0 falling through as NULL does); a balance or value that is
#   not a number (NaN, Infinity) left out and counted as invalid;
# - one holding row per converted account and per asset (named as the web app names it), one
#   row per non-zero category and a total, all sums in exact numeric arithmetic;
# - a user with any value that the column it goes to cannot hold (beyond a float's range)
#   failed: none of their rows is written or removed, and they are counted;
# - rows of that date that no longer apply deleted, rows that differ from what is stored
#   updated, missing rows inserted, rows already right left untouched, so a re-run with
#   nothing new writes nothing.
# The parts see the same snapshot and touch disjoint rows. Each table is read by the batch's
# id range, which its user_id (or date, user_id) index answers, instead of being scanned whole
# for each batch.
_ROWS_SQL = """
WITH batch AS (
    SELECT id FROM users WHERE id BETWEEN $1::bigint AND $2::bigint
),
rates AS (
    -- The divisor gets at least 24 decimals, so that the quotient does too before it is
    -- rounded to 8: one rounding, not two. A stored rate that is not plausible by the rule
    -- of kontod.providers.rates (NaN, Infinity, out of range) is no rate; an older plausible
    -- one may stand in.
    SELECT DISTINCT ON (currency) currency, base_amount,
           round(currency_amount, greatest(scale(currency_amount), 24)) AS currency_amount
      FROM kontod_rates
     WHERE base = $4 AND day <= $3::date AND day >= $3::date - $5::int
       AND {plausible}
     ORDER BY currency, day DESC
),
accounts AS (
    SELECT a.user_id, a.id, {account_name} AS name,
           coalesce(nullif(a.type, ''), 'checking') AS type,
           coalesce(nullif(upper(btrim(a.currency)), ''), 'EUR') AS currency,
           CASE WHEN a.balance IS NULL THEN 0
                WHEN {balance_finite} THEN a.balance::numeric END AS amount
      FROM bank_accounts a
     WHERE a.user_id BETWEEN $1::bigint AND $2::bigint AND {visible}
),
converted AS (
    SELECT c.*,
           CASE WHEN c.amount IS NULL THEN NULL
                WHEN c.currency = $4 OR c.amount = 0 THEN c.amount
                ELSE round(c.amount * r.base_amount / r.currency_amount, 8) END AS value
      FROM accounts c LEFT JOIN rates r ON r.currency = c.currency
),
valued AS (
    SELECT s.user_id, s.id, {asset_name} AS name, coalesce(nullif(s.type, ''), 'other') AS type,
           -- The web app's current_value || purchase_price || 0: a NULL or 0 falls through
           -- (NaN and Infinity do not: they are left out and counted).
           CASE WHEN s.current_value <> 0 THEN
                    CASE WHEN {current_finite} THEN s.current_value::numeric END
                WHEN s.purchase_price <> 0 THEN
                    CASE WHEN {purchase_finite} THEN s.purchase_price::numeric END
                ELSE 0 END AS value
      FROM assets s
     WHERE s.user_id BETWEEN $1::bigint AND $2::bigint
),
invalid AS (
    SELECT 'account:' || id AS holding_key FROM converted WHERE amount IS NULL
    UNION ALL
    SELECT 'asset:' || id FROM valued WHERE value IS NULL
),
holdings AS (
    SELECT user_id, 'account:' || id AS holding_key, 'account' AS kind, id AS ref_id, name,
           type, value, currency, amount
      FROM converted WHERE value IS NOT NULL
    UNION ALL
    SELECT user_id, 'asset:' || id, 'asset', id, name, type, value, NULL, NULL
      FROM valued WHERE value IS NOT NULL
),
categories AS (
    SELECT user_id, type AS category, sum(value) AS total_value
      FROM holdings GROUP BY user_id, type HAVING sum(value) <> 0
),
failed AS (
    SELECT user_id FROM holdings
     WHERE NOT {holding_fits_value} OR (amount IS NOT NULL AND NOT {amount_fits_amount})
    UNION
    SELECT user_id FROM categories
     WHERE category <> 'total'
     GROUP BY user_id
    HAVING NOT bool_and({snapshot_fits_total}) OR NOT {snapshot_fits_sum}
),
kept AS (
    SELECT h.* FROM holdings h
     WHERE NOT EXISTS (SELECT 1 FROM failed f WHERE f.user_id = h.user_id)
),
fresh AS (
    SELECT user_id, category, total_value::{snapshot_money} AS total_value
      FROM categories c
     WHERE category <> 'total' AND NOT EXISTS (SELECT 1 FROM failed f WHERE f.user_id = c.user_id)
    UNION ALL
    SELECT b.id, 'total', coalesce(sum(c.total_value), 0)::{snapshot_money}
      FROM batch b LEFT JOIN categories c ON c.user_id = b.id AND c.category <> 'total'
     WHERE NOT EXISTS (SELECT 1 FROM failed f WHERE f.user_id = b.id)
     GROUP BY b.id
),
"""

_COMPARE_SQL = """
-- What the date already holds for the batch, read by the batch's range of the (date, user_id,
-- ...) index, then set against what it should hold in one full join: a hash or merge join
-- over two in-memory sets, never a look-up per row.
stored AS (
    SELECT user_id, category, total_value FROM patrimoine_snapshots p
     WHERE date = {snapshot_day} AND user_id BETWEEN $1::bigint AND $2::bigint
       AND NOT EXISTS (SELECT 1 FROM failed f WHERE f.user_id = p.user_id)
),
diff AS (
    SELECT coalesce(f.user_id, s.user_id) AS user_id, coalesce(f.category, s.category) AS category,
           f.total_value, s.user_id IS NOT NULL AS stored, f.user_id IS NOT NULL AS wanted,
           f.total_value IS DISTINCT FROM s.total_value AS differs
      FROM fresh f FULL JOIN stored s ON s.user_id = f.user_id AND s.category = f.category
),
holding_rows AS (
    SELECT user_id, holding_key, kind, ref_id, name, type,
           value::{holding_money} AS value{amount_select}
      FROM kept
),
holdings_stored AS (
    SELECT user_id, holding_key, kind, ref_id, name, type, value{amount_columns}
      FROM holding_snapshots o
     WHERE date = {holding_day} AND user_id BETWEEN $1::bigint AND $2::bigint
       AND NOT EXISTS (SELECT 1 FROM failed f WHERE f.user_id = o.user_id)
),
holdings_diff AS (
    SELECT coalesce(n.user_id, o.user_id) AS user_id,
           coalesce(n.holding_key, o.holding_key) AS holding_key,
           n.kind, n.ref_id, n.name, n.type, n.value{amount_new},
           o.holding_key IS NOT NULL AS stored, n.holding_key IS NOT NULL AS wanted,
           (o.kind, o.ref_id, o.name, o.type, o.value{amount_old})
               IS DISTINCT FROM (n.kind, n.ref_id, n.name, n.type, n.value{amount_new})
               AS differs
      FROM holding_rows n
      FULL JOIN holdings_stored o ON o.user_id = n.user_id AND o.holding_key = n.holding_key
),
unconverted AS (
    SELECT currency, count(*) AS accounts FROM converted
     WHERE value IS NULL AND amount IS NOT NULL GROUP BY currency
)
"""

_WRITES_SQL = """
removed AS (
    DELETE FROM patrimoine_snapshots p
     USING diff d
     WHERE NOT d.wanted
       AND p.date = {snapshot_day} AND p.user_id = d.user_id AND p.category = d.category
    RETURNING 1
),
updated AS (
    UPDATE patrimoine_snapshots p SET total_value = d.total_value{created_at}
      FROM diff d
     WHERE d.wanted AND d.stored AND d.differs
       AND p.date = {snapshot_day} AND p.user_id = d.user_id AND p.category = d.category
    RETURNING 1
),
-- A plain insert: the rows are known to be absent. A row another writer inserts meanwhile
-- makes it fail with a unique violation, and the batch is run again (take_snapshots).
inserted AS (
    INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)
    SELECT {snapshot_day}, user_id, category, total_value FROM diff WHERE NOT stored
    RETURNING 1
),
holdings_removed AS (
    DELETE FROM holding_snapshots o
     USING holdings_diff d
     WHERE NOT d.wanted
       AND o.date = {holding_day} AND o.user_id = d.user_id AND o.holding_key = d.holding_key
    RETURNING 1
),
holdings_updated AS (
    UPDATE holding_snapshots o
       SET kind = d.kind, ref_id = d.ref_id, name = d.name, type = d.type,
           value = d.value{amount_set}
      FROM holdings_diff d
     WHERE d.wanted AND d.stored AND d.differs
       AND o.date = {holding_day} AND o.user_id = d.user_id AND o.holding_key = d.holding_key
    RETURNING 1
),
holdings_inserted AS (
    INSERT INTO holding_snapshots
           (date, user_id, holding_key, kind, ref_id, name, type, value{amount_columns})
    SELECT {holding_day}, user_id, holding_key, kind, ref_id, name, type, value{amount_columns}
      FROM holdings_diff WHERE NOT stored
    RETURNING 1
)
"""

_WRITTEN_SQL = """
SELECT (SELECT count(*) FROM batch) AS users,
       (SELECT count(*) FROM fresh) AS fresh_rows,
       (SELECT count(*) FROM inserted) + (SELECT count(*) FROM updated) AS written,
       (SELECT count(*) FROM removed) AS removed,
       (SELECT count(*) FROM kept) AS holdings,
       (SELECT count(*) FROM holdings_inserted) + (SELECT count(*) FROM holdings_updated)
           AS holdings_written,
       (SELECT count(*) FROM holdings_removed) AS holdings_removed,"""

# What a batch whose date already holds rows would change, nothing written: the comparison
# alone, so that in a re-run where nothing changed a batch reads and compares, and runs no write.
_CHECK_SQL = """
SELECT (SELECT count(*) FROM batch) AS users,
       (SELECT count(*) FROM fresh) AS fresh_rows,
       0 AS written,
       0 AS removed,
       (SELECT count(*) FROM kept) AS holdings,
       0 AS holdings_written,
       0 AS holdings_removed,
       (SELECT count(*) FROM diff WHERE NOT (stored AND wanted AND NOT differs))
     + (SELECT count(*) FROM holdings_diff WHERE NOT (stored AND wanted AND NOT differs))
           AS changes,"""

# What both the batch and the comparison alone report besides their row counts.
_REPORT_SQL = """
       (SELECT array_agg(currency ORDER BY currency) FROM unconverted) AS unconverted_currencies,
       (SELECT array_agg(accounts ORDER BY currency) FROM unconverted) AS unconverted_accounts,
       (SELECT count(*) FROM invalid) AS invalid,
       (SELECT array_agg(holding_key)
          FROM (SELECT holding_key FROM invalid ORDER BY holding_key LIMIT {shown}) i)
           AS invalid_keys,
       (SELECT count(*) FROM failed) AS failed,
       (SELECT array_agg(user_id)
          FROM (SELECT user_id FROM failed ORDER BY user_id LIMIT {shown}) u) AS failed_users
"""

# The batch statement, and the comparison alone.
_BATCH_SQL = _ROWS_SQL + _COMPARE_SQL.rstrip() + ",\n" + _WRITES_SQL + _WRITTEN_SQL + _REPORT_SQL
_BATCH_CHECK_SQL = _ROWS_SQL + _COMPARE_SQL + _CHECK_SQL + _REPORT_SQL

# Whether the date holds any row already ($1: the date; a fresh date needs no comparison first).
_DAY_HELD_SQL = """
SELECT EXISTS (SELECT 1 FROM patrimoine_snapshots WHERE date = {snapshot_day})
    OR EXISTS (SELECT 1 FROM holding_snapshots WHERE date = {holding_day})
"""


def batch_sql(cols: Columns) -> str:
    """The batch statement for these column types."""
    return _BATCH_SQL.format(**_fragments(cols))


def check_sql(cols: Columns) -> str:
    """The batch's comparison alone, for these column types: what it would change."""
    return _BATCH_CHECK_SQL.format(**_fragments(cols))


def day_held_sql(cols: Columns) -> str:
    """Whether the date already holds rows, for these column types ($1: the date)."""
    return _DAY_HELD_SQL.format(
        snapshot_day=cols.snapshot_day.replace("$3", "$1"),
        holding_day=cols.holding_day.replace("$3", "$1"),
    )


def _fragments(cols: Columns) -> dict[str, str]:
    amount = cols.holding_amount
    return dict(
        plausible=rates.PLAUSIBLE_SQL,
        shown=str(SHOWN),
        balance_finite=cols.balance_finite,
        current_finite=cols.current_finite,
        purchase_finite=cols.purchase_finite,
        holding_fits_value=cols.holding_fits.format(x="value"),
        amount_fits_amount=cols.amount_fits.format(x="amount"),
        snapshot_fits_total=cols.snapshot_fits.format(x="total_value"),
        snapshot_fits_sum=cols.snapshot_fits.format(x="sum(total_value)"),
        visible=cols.visible,
        account_name=cols.account_name,
        asset_name=cols.asset_name,
        snapshot_day=cols.snapshot_day,
        snapshot_money=cols.snapshot_money,
        created_at=", created_at = DEFAULT" if cols.touch_created_at else "",
        holding_day=cols.holding_day,
        holding_money=cols.holding_money,
        amount_select=f", currency, amount::{amount} AS amount" if amount else "",
        amount_old=", o.currency, o.amount" if amount else "",
        amount_new=", n.currency, n.amount" if amount else "",
        amount_columns=", currency, amount" if amount else "",
        amount_set=", currency = d.currency, amount = d.amount" if amount else "",
    )


def snapshot_date(ctx: RunContext, tz: ZoneInfo) -> date:
    """The local calendar date, in the configured zone, of the instant the run belongs to."""
    return ctx.at.astimezone(tz).date()


def record_rates(ctx: RunContext, report: rates.RateReport) -> None:
    ctx.counts.update(rate_counts(report))


def rate_counts(report: rates.RateReport) -> dict[str, int]:
    """Which sources failed, and for each currency the age of its rate and whether it fell
    back to a rate stored by an earlier run (zeros included: they are recorded)."""
    counts = {
        "rates_stored": report.stored,
        "rate_sources_failed": len(report.failed_sources),
    }
    for cur, rate in report.currencies.items():
        if rate.age_days is not None:
            counts[RATE_AGE.key(cur)] = rate.age_days
            if not rate.fetched:
                counts[f"rate_fallback_{cur}"] = 1
    return counts


# The id of every ``$1``-th user: the ends of the batches' id ranges, read in one index scan.
_BOUNDS_SQL = """
SELECT id::bigint FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM users) u
 WHERE n % $1 = 0 ORDER BY id
"""
_MIN_ID, _MAX_ID = -(2**63), 2**63 - 1


def id_ranges(bounds: list[int]) -> list[tuple[int, int]]:
    """Consecutive inclusive id ranges ending at each bound, then one up to the largest id, so
    that every id, even one inserted during the run, falls in exactly one range."""
    ranges, low = [], _MIN_ID
    for bound in bounds:
        ranges.append((low, bound))
        low = bound + 1
    if low <= _MAX_ID:
        ranges.append((low, _MAX_ID))
    return ranges


def shown(low: int) -> int | None:
    """A range's first id as a log shows it: none for the first range, which is unbounded."""
    return None if low == _MIN_ID else low


async def take_snapshots(
    pool: asyncpg.Pool,
    ctx: RunContext,
    tz: ZoneInfo,
    batch_size: int,
    *,
    workers: int = 1,
    conversion: Conversion | None = None,
    sources: rates.RateSources | None = None,
) -> None:
    """Ask the rate sources (when given), then write the snapshot of every user for the
    run's date, batch by batch, ``workers`` batches at a time."""
    conv = conversion or Conversion()
    day = snapshot_date(ctx, tz)
    begin(ctx, day, batch_size, workers, conv)
    report = await rates.update(
        pool,
        sources,
        base=conv.base,
        day=day,
        max_age_days=conv.max_age_days,
        crypto_ids=conv.crypto_ids,
        manual=conv.manual,
        now=datetime.now(UTC),
        log=ctx.log,
        before_write=ctx.check_claim,
    )
    record_rates(ctx, report)
    async with pool.acquire() as conn:
        cols = await columns(conn)
        # On a date that already holds rows (a re-run), each batch is compared first and written
        # only when something differs; a new date goes straight to the writes.
        held: bool = await conn.fetchval(day_held_sql(cols), day)
        expected: int = await conn.fetchval("SELECT count(*) FROM users")
        bounds = [r["id"] for r in await conn.fetch(_BOUNDS_SQL, batch_size)]
    ctx.report_progress(0, expected)
    batch = _Batch(ctx, batch_sql(cols), check_sql(cols) if held else None, day, conv)
    await run_workers(batch.worker(pool, iter(id_ranges(bounds)), expected), workers, "snapshots")
    finish(ctx, day, conv)


# Counts every run records, zeros included, even when there is no user.
RUN_COUNTS = (
    "users",
    "rows_written",
    "rows_unchanged",
    "rows_removed",
    "holdings_written",
    "holdings_unchanged",
    "holdings_removed",
    "batches",
    "items_unconverted",
    "items_invalid",
    "items_failed",
)


def begin(ctx: RunContext, day: date, batch_size: int, workers: int, conv: Conversion) -> None:
    """Log the run's start and record its counts at zero (both engines)."""
    ctx.log.info(
        "snapshots.started",
        date=day.isoformat(),
        batch_size=batch_size,
        workers=workers,
        base=conv.base,
    )
    for key in RUN_COUNTS:
        ctx.counts[key] += 0


def finish(ctx: RunContext, day: date, conv: Conversion) -> None:
    """Log the accounts left unconverted and what the run wrote (both engines)."""
    unconverted = UNCONVERTED.values(ctx.counts) or {}
    if unconverted:
        ctx.log.warning("snapshots.unconverted", base=conv.base, accounts=unconverted)
    ctx.log.info(
        "snapshots.written",
        date=day.isoformat(),
        users=ctx.counts["users"],
        rows_written=ctx.counts["rows_written"],
        rows_removed=ctx.counts["rows_removed"],
        holdings_written=ctx.counts["holdings_written"],
        unconverted=ctx.counts["items_unconverted"],
        invalid=ctx.counts["items_invalid"],
        users_failed=ctx.counts["items_failed"],
    )


@dataclass(frozen=True)
class _Batch:
    """How one batch is run: compared first on a date that holds rows (``check``), written
    when anything differs (or at once on a new date)."""

    ctx: RunContext
    sql: str
    check: str | None
    day: date
    conv: Conversion

    def worker(
        self, pool: asyncpg.Pool, ranges: Iterator[tuple[int, int]], expected: int
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        """A worker: on a connection of its own, it takes ranges from the shared iterator
        until there is none left."""
        ctx = self.ctx

        async def work() -> None:
            async with pool.acquire() as conn:
                for low, high in ranges:
                    row = await self.run(conn, low, high)
                    if row["users"] == 0:
                        continue
                    _count_batch(ctx, row)
                    log_batch_problems(ctx, row)
                    ctx.report_progress(ctx.counts["users"], max(expected, ctx.counts["users"]))
                    ctx.log.debug("snapshots.batch", from_id=shown(low), users=row["users"])

        return work

    async def run(self, conn: Connection, low: int, high: int) -> asyncpg.Record:
        params = (low, high, self.day, self.conv.base, self.conv.max_age_days)
        if self.check is not None:
            row = await conn.fetchrow(self.check, *params)
            assert row is not None
            if not row["users"] or not row["changes"]:
                return row
        # One batch in one transaction, run again when another writer inserted one of its
        # rows between the statement's snapshot and its insert (a unique violation rolls it
        # back whole).
        for attempt in range(1, BATCH_ATTEMPTS + 1):
            try:
                async with conn.transaction():
                    await self.ctx.check_claim(conn)
                    row = await conn.fetchrow(self.sql, *params)
            except asyncpg.UniqueViolationError:
                if attempt == BATCH_ATTEMPTS:
                    raise
                self.ctx.log.info("snapshots.batch_retried", from_id=shown(low), attempt=attempt)
                continue
            assert row is not None
            return row
        raise AssertionError("unreachable")


def _count_batch(ctx: RunContext, row: asyncpg.Record) -> None:
    ctx.counts.update(batch_counts(row))


def batch_counts(row: asyncpg.Record | Mapping[str, Any]) -> Counter[str]:
    """What a batch adds to the run's counts, from the row its statement returns."""
    c: Counter[str] = Counter()
    c["users"] += row["users"]
    c["items_users"] += row["users"] - row["failed"]
    c["items_failed"] += row["failed"]
    c["items_invalid"] += row["invalid"]
    c["rows_written"] += row["written"]
    c["rows_unchanged"] += row["fresh_rows"] - row["written"]
    c["rows_removed"] += row["removed"]
    c["holdings_written"] += row["holdings_written"]
    c["holdings_unchanged"] += row["holdings"] - row["holdings_written"]
    c["holdings_removed"] += row["holdings_removed"]
    c["batches"] += 1
    for cur, n in zip(
        row["unconverted_currencies"] or [], row["unconverted_accounts"] or [], strict=True
    ):
        c[UNCONVERTED.key(cur)] += n
        c["items_unconverted"] += n
    return c


def log_batch_problems(ctx: RunContext, row: asyncpg.Record | Mapping[str, Any]) -> None:
    """Name (up to SHOWN of each) the holdings left out as not a number and the users failed
    because a value of theirs does not fit its column."""
    if row["invalid"]:
        ctx.log.warning(
            "snapshots.values_invalid",
            holdings=row["invalid"],
            keys=list(row["invalid_keys"] or []),
        )
    if row["failed"]:
        ctx.log.error(
            "snapshots.users_failed",
            users=row["failed"],
            user_ids=list(row["failed_users"] or []),
            reason="value_out_of_range",
        )


@dataclass(frozen=True)
class SourceSettings:
    """Where the rate sources are and how long to wait for them."""

    fiat_url: str
    crypto_url: str
    timeout: float = 30.0
    attempts: int = 4
    crypto_api_key: str | None = field(default=None, repr=False)
    max_body: int | None = None  # None: the sources' own cap


def make_body(
    pool: asyncpg.Pool,
    tz: ZoneInfo,
    batch_size: int,
    conversion: Conversion | None = None,
    sources: SourceSettings | None = None,
    http: aiohttp.ClientSession | None = None,
    workers: int = 1,
    konto: KontoSql | None = None,
) -> JobBody:
    """The job body; with ``sources`` set, each run asks them (over ``http``, or a session
    of its own). With ``konto``, Konto's tables are in that SQLite-family database
    (kontod/jobs/snapshots_lite.py); rates and the run's bookkeeping stay in ``pool``'s."""

    async def take(ctx: RunContext, rate_sources: rates.RateSources | None) -> None:
        if konto is None:
            await take_snapshots(
                pool,
                ctx,
                tz,
                batch_size,
                workers=workers,
                conversion=conversion,
                sources=rate_sources,
            )
            return
        # Imported here: the SQLite path builds on this module's helpers.
        from kontod.jobs.snapshots_lite import take_snapshots_lite

        await take_snapshots_lite(
            pool, konto, ctx, tz, batch_size, conversion=conversion, sources=rate_sources
        )

    async def body(ctx: RunContext) -> None:
        if sources is None:
            await take(ctx, None)
            return
        if http is not None:
            await take(ctx, _rate_sources(sources, http))
            return
        async with aiohttp.ClientSession() as session:
            await take(ctx, _rate_sources(sources, session))

    return body


def _rate_sources(settings: SourceSettings, http: aiohttp.ClientSession) -> rates.RateSources:
    return rates.RateSources(
        http,
        fiat_url=settings.fiat_url,
        crypto_url=settings.crypto_url,
        timeout=settings.timeout,
        attempts=settings.attempts,
        api_key=settings.crypto_api_key,
        max_body=settings.max_body,
    )
