"""``daily-snapshots`` on a Konto kept in the web app's SQLite/libSQL database (a ``KontoSql``).

The rows are those the PostgreSQL path (kontod/jobs/snapshots.py) writes for the same data, to
the last digit: the same category, total and holding rows, the same conversion, the same
values left out and counted, the same users failed alone, the same counts and log events. What
differs is where the work is done:

- Rates stay in PostgreSQL (``kontod_rates``): the sources are asked and their answers stored
  as on the PostgreSQL path, then the usable rate of each currency is read once for the run.
- The arithmetic is done in Python by PostgreSQL's numeric rules (kontod/jobs/pg_numeric.py):
  SQLite has only floats.
- The web app's bank_accounts and assets have no index on user_id, and kontod creates none on
  the web app's tables. So the run first reads each of them once, in rowid order and short
  chunks (rowid and user_id only), and notes for each batch of users the rowids of its rows
  (eight bytes a row); a batch then reads its rows by rowid, and the rows added since that pass
  (rowids above the last it saw). No read scans a table per batch,
  and every read is short: in rollback-journal mode a reader holds off the web app's commit.
- A batch reads what the date already holds for its users (the snapshot tables' unique keys
  serve that range), compares in Python, and writes only when something differs: one fenced
  write transaction (kontod/konto/fenced.py) of at most four statements, one per table and
  kind of change, each taking its rows as one JSON text through ``json_each``. The upserts
  change a row only when it still differs, so a row another writer put there in between is
  written over, never a reason to fail; the write lock is held for that one batch only.
  Measured against ``executemany`` (one statement run per row) on 10 000 rows of a 100 000-user
  file: 36-43 ms for the JSON statements, 36-42 ms for ``executemany``; the JSON text wins on a
  libSQL server, where it is one argument of one request instead of one statement per row.
- Holding rows are written without ``currency`` and ``amount``: the web app's holding_snapshots
  has no such columns (kontod/konto/lite_schema.py).

SQLite has one writer at a time, and in a rollback-journal file a read in flight holds off a
commit, so the batches run one at a time (``KONTOD_SNAPSHOT_WORKERS`` does not apply here).
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, localcontext
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from kontod.jobs import pg_numeric
from kontod.jobs.snapshots import (
    SHOWN,
    Conversion,
    batch_counts,
    begin,
    finish,
    id_ranges,
    log_batch_problems,
    record_rates,
    shown,
    snapshot_date,
)
from kontod.konto.fenced import FencedWriter
from kontod.konto.store import KontoSql, Row, Statement, Value
from kontod.providers import rates
from kontod.scheduler.contract import RunContext

# Rows per read of the first pass over bank_accounts and assets: a few milliseconds each.
CHUNK = 20_000

# The newest plausible rate of each currency within the maximum age, as the statement's
# ``rates`` part picks it; as text, so that each figure keeps its scale.
_RATES_SQL = f"""
SELECT DISTINCT ON (currency) currency, base_amount::text, currency_amount::text
  FROM kontod_rates
 WHERE base = $1 AND day <= $2::date AND day >= $2::date - $3::int AND {rates.PLAUSIBLE_SQL}
 ORDER BY currency, day DESC
"""

# Every batch_size-th user id: the ends of the batches' id ranges (users.id is the rowid).
_BOUNDS_SQL = """
SELECT id FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM users)
 WHERE n % ? = 0 ORDER BY id
"""
_ACCOUNT_IDS_SQL = """
SELECT rowid, user_id, currency FROM bank_accounts WHERE rowid > ? ORDER BY rowid LIMIT ?
"""
_ASSET_IDS_SQL = "SELECT rowid, user_id FROM assets WHERE rowid > ? ORDER BY rowid LIMIT ?"

_USERS_SQL = "SELECT id FROM users WHERE id BETWEEN ? AND ? ORDER BY id"
# A batch's rows: looked up by rowid, and the rows added since the first pass (rowids above the
# last it saw: a range of the rowid, not a scan). The user_id test drops a row moved to another
# user since. hidden: 0/1, NULL visible, as the PostgreSQL path reads an integer flag.
_ACCOUNTS_SQL = """
SELECT a.id, a.user_id, a.name, a.type, a.currency, a.balance
  FROM bank_accounts a
 WHERE (a.rowid IN (SELECT value FROM json_each(?1)) OR a.rowid > ?2)
   AND a.user_id BETWEEN ?3 AND ?4 AND coalesce(a.hidden, 0) = 0
"""
_ASSETS_SQL = """
SELECT s.id, s.user_id, s.name, s.type, s.current_value, s.purchase_price
  FROM assets s
 WHERE (s.rowid IN (SELECT value FROM json_each(?1)) OR s.rowid > ?2)
   AND s.user_id BETWEEN ?3 AND ?4
"""
_STORED_SQL = """
SELECT user_id, category, total_value FROM patrimoine_snapshots
 WHERE date = ? AND user_id BETWEEN ? AND ?
"""
_HOLDINGS_STORED_SQL = """
SELECT user_id, holding_key, kind, ref_id, name, type, value FROM holding_snapshots
 WHERE date = ? AND user_id BETWEEN ? AND ?
"""

# The writes of one batch; ?1 is the date, ?2 the rows as a JSON array of arrays.
_REMOVE_SQL = """
DELETE FROM patrimoine_snapshots
 WHERE date = ?1 AND (user_id, category) IN (SELECT value->>0, value->>1 FROM json_each(?2))
"""
# An upsert that changes a row only when its value differs (``WHERE true``: SQLite's parser
# needs it before ON CONFLICT in an INSERT ... SELECT). created_at: see _created_at.
_UPSERT_SQL = """
INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)
SELECT ?1, value->>0, value->>1, value->>2 FROM json_each(?2) WHERE true
ON CONFLICT (date, user_id, category) DO UPDATE
   SET total_value = excluded.total_value{created_at}
 WHERE total_value IS NOT excluded.total_value
"""
_HOLDINGS_REMOVE_SQL = """
DELETE FROM holding_snapshots
 WHERE date = ?1 AND (user_id, holding_key) IN (SELECT value->>0, value->>1 FROM json_each(?2))
"""
_HOLDINGS_UPSERT_SQL = """
INSERT INTO holding_snapshots (date, user_id, holding_key, kind, ref_id, name, type, value)
SELECT ?1, value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6
  FROM json_each(?2) WHERE true
ON CONFLICT (date, user_id, holding_key) DO UPDATE
   SET kind = excluded.kind, ref_id = excluded.ref_id, name = excluded.name,
       type = excluded.type, value = excluded.value
 WHERE (kind, ref_id, name, type, value)
       IS NOT (excluded.kind, excluded.ref_id, excluded.name, excluded.type, excluded.value)
"""


@dataclass(frozen=True)
class Rate:
    """``currency_amount`` units of a currency are worth ``base_amount`` of the base."""

    base_amount: Decimal
    currency_amount: Decimal


# A holding row as written: (kind, ref_id, name, type, value).
Holding = tuple[str, int, Value, str, float]


@dataclass
class Wanted:
    """What the date should hold for one batch of users, and what was left out."""

    users: int
    rows: dict[tuple[int, str], float] = field(default_factory=dict)
    holdings: dict[tuple[int, str], Holding] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    invalid: list[str] = field(default_factory=list)
    unconverted: Counter[str] = field(default_factory=Counter)


async def take_snapshots_lite(
    pool: asyncpg.Pool,
    konto: KontoSql,
    ctx: RunContext,
    tz: ZoneInfo,
    batch_size: int,
    *,
    conversion: Conversion | None = None,
    sources: rates.RateSources | None = None,
) -> None:
    """Write the snapshot of every user of Konto's SQLite-family database for the run's
    date, batch by batch, as ``snapshots.take_snapshots`` does on PostgreSQL."""
    # The fence first, before any read: a late transaction of an older run then fails.
    writer = await FencedWriter.start(konto, pool, ctx)
    conv = conversion or Conversion()
    day = snapshot_date(ctx, tz)
    # One batch in flight (see the module's docstring): the setting's workers do not apply.
    begin(ctx, day, batch_size, 1, conv)
    expected = _scalar(await konto.read("SELECT count(*) FROM users"))
    bounds = [_int(r[0]) for r in await konto.read(_BOUNDS_SQL, (batch_size,))]
    ranges = id_ranges(bounds)
    rows = await index_rows(konto, bounds, len(ranges))
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
        in_use=rows.currencies,
    )
    record_rates(ctx, report)
    usable = await usable_rates(pool, conv.base, day, conv.max_age_days)
    batch = _Batch(ctx, konto, writer, day, conv.base, usable, await _created_at(konto), rows)
    ctx.report_progress(0, expected)
    await batch.run_all(ranges, expected)
    finish(ctx, day, conv)


@dataclass
class RowIndex:
    """For each batch (by its index in the id ranges), the rowids of its users' accounts and
    assets; and every currency an account uses (``rates.currencies_in_use``'s answer)."""

    accounts: list[array[int]]
    assets: list[array[int]]
    currencies: set[str] = field(default_factory=set)
    # The last rowid the first pass saw in each table.
    last_account: int = -(2**63)
    last_asset: int = -(2**63)


async def index_rows(
    konto: KontoSql, bounds: Sequence[int], batches: int, chunk: int = CHUNK
) -> RowIndex:
    """Read bank_accounts and assets once each, in rowid order and chunks of ``chunk`` rows,
    and sort their rowids into the batches their user_id falls in."""
    index = RowIndex([array("q") for _ in range(batches)], [array("q") for _ in range(batches)])
    async for row in _chunks(konto, _ACCOUNT_IDS_SQL, chunk):
        index.currencies.add(rates.account_currency(row[2]))
        index.last_account = _note(index.accounts, bounds, row)
    async for row in _chunks(konto, _ASSET_IDS_SQL, chunk):
        index.last_asset = _note(index.assets, bounds, row)
    return index


async def _chunks(konto: KontoSql, sql: str, size: int) -> AsyncIterator[Row]:
    """The rows of ``sql`` (rowid first; ? after, ? limit) read ``size`` rows at a time."""
    after = -(2**63)
    while True:
        rows = await konto.read(sql, (after, size))
        for row in rows:
            yield row
        if len(rows) < size:
            return
        after = _scalar(rows[-1:])


def _note(batches: list[array[int]], bounds: Sequence[int], row: Row) -> int:
    """Put the row's rowid in its user's batch; return the rowid."""
    rowid, user_id = _int(row[0]), row[1]
    # A row with no user (NULL, or text SQLite let in) belongs to no snapshot.
    if isinstance(user_id, int):
        batches[bisect_left(bounds, user_id)].append(rowid)
    return rowid


async def usable_rates(pool: asyncpg.Pool, base: str, day: date, max_age: int) -> dict[str, Rate]:
    """The rate each currency is converted with on ``day`` (none: left unconverted)."""
    found = await pool.fetch(_RATES_SQL, base, day, max_age)
    return {r[0]: Rate(Decimal(r[1]), Decimal(r[2])) for r in found}


async def _created_at(konto: KontoSql) -> str:
    """How an update sets patrimoine_snapshots.created_at: to the column's own default, as the
    PostgreSQL path does (``created_at = DEFAULT``, which SQLite's UPDATE lacks), using the
    default expression the web app declared; nothing when the table has no such column."""
    for column in await konto.read("PRAGMA table_info(patrimoine_snapshots)"):
        if column[1] == "created_at":
            default = column[4]
            return (
                f", created_at = ({default})" if isinstance(default, str) else ", created_at = NULL"
            )
    return ""


@dataclass(frozen=True)
class _Batch:
    ctx: RunContext
    konto: KontoSql
    writer: FencedWriter
    day: date
    base: str
    rates: dict[str, Rate]
    created_at: str
    index: RowIndex

    async def run_all(self, ranges: Sequence[tuple[int, int]], expected: int) -> None:
        """Every batch, one after another: read, compute, write. Nothing overlaps the write
        transaction: in a rollback-journal file a read in flight would hold off its commit
        (and the web app's writers queued behind it), and computing on another thread would
        keep the transaction waiting for the interpreter lock."""
        for number, (low, high) in enumerate(ranges):
            fetched = await self.fetch(number, low, high)
            if fetched is not None:
                self.record(await self.write(*self.plan(fetched), low), expected)

    async def fetch(self, number: int, low: int, high: int) -> _Fetched | None:
        """The batch's users, accounts, assets and the rows the date holds for them (None: no
        user in the range)."""
        konto, day = self.konto, self.day.isoformat()
        users = await konto.read(_USERS_SQL, (low, high))
        if not users:
            return None
        return _Fetched(
            users,
            await konto.read(
                _ACCOUNTS_SQL,
                (_ids(self.index.accounts[number]), self.index.last_account, low, high),
            ),
            await konto.read(
                _ASSETS_SQL, (_ids(self.index.assets[number]), self.index.last_asset, low, high)
            ),
            await konto.read(_STORED_SQL, (day, low, high)),
            await konto.read(_HOLDINGS_STORED_SQL, (day, low, high)),
        )

    def plan(self, fetched: _Fetched) -> tuple[Wanted, Plan]:
        """What the batch should hold, and what it changes (on a thread: no await here)."""
        wanted = compute(fetched.users, fetched.accounts, fetched.assets, self.rates, self.base)
        return wanted, compare(wanted, fetched.stored, fetched.held)

    async def write(self, wanted: Wanted, plan: Plan, low: int) -> tuple[dict[str, Any], int]:
        """The batch's write transaction, when anything differs; its result row."""
        done: dict[str, int] = {}
        if plan.changes:
            steps, kinds = plan.statements(self.day.isoformat(), self.created_at)
            results = await self.writer.write(steps)
            done = {kind: result.changes for kind, result in zip(kinds, results, strict=True)}
        row = report(
            wanted,
            done.get("written", 0),
            done.get("removed", 0),
            done.get("holdings_written", 0),
            done.get("holdings_removed", 0),
        )
        return row, low

    def record(self, outcome: tuple[dict[str, Any], int], expected: int) -> None:
        row, low = outcome
        ctx = self.ctx
        ctx.counts.update(batch_counts(row))
        log_batch_problems(ctx, row)
        ctx.report_progress(ctx.counts["users"], max(expected, ctx.counts["users"]))
        ctx.log.debug("snapshots.batch", from_id=shown(low), users=row["users"])


@dataclass(frozen=True)
class _Fetched:
    users: list[Row]
    accounts: list[Row]
    assets: list[Row]
    stored: list[Row]
    held: list[Row]


def _ids(rowids: array[int]) -> str:
    return json.dumps(rowids.tolist())


def compute(
    users: Sequence[Row],
    accounts: Sequence[Row],
    assets: Sequence[Row],
    usable: dict[str, Rate],
    base: str,
) -> Wanted:
    """The rows one batch should hold, by the rules of the PostgreSQL statement (its parts
    ``accounts`` .. ``fresh``), in exact numeric arithmetic."""
    wanted = Wanted(users=len(users))
    by_user: defaultdict[int, list[_Holding]] = defaultdict(list)
    currencies: dict[Value, str] = {}  # as stored -> as the statement reads it
    with localcontext(pg_numeric.EXACT):
        for acc_id, user_id, name, typ, currency, balance in accounts:
            ref = _int(acc_id)
            cur = currencies.get(currency)
            if cur is None:
                cur = currencies[currency] = rates.account_currency(currency)
            amount = _ZERO if balance is None else _money(balance)
            if amount is None:
                wanted.invalid.append(f"account:{ref}")
                continue
            if cur == base or not amount:
                value = amount
            else:
                rate = usable.get(cur)
                if rate is None:
                    wanted.unconverted[cur] += 1
                    continue
                value = pg_numeric.convert(amount, rate.base_amount, rate.currency_amount)
            holding = (f"account:{ref}", "account", ref, name, _text(typ) or "checking", value)
            by_user[_int(user_id)].append(holding)
        for asset_id, user_id, name, typ, current, purchase in assets:
            ref = _int(asset_id)
            if current is not None:
                value_or_none = _money(current)
            elif purchase is not None:
                value_or_none = _money(purchase)
            else:
                value_or_none = _ZERO
            if value_or_none is None:
                wanted.invalid.append(f"asset:{ref}")
                continue
            holding = (f"asset:{ref}", "asset", ref, name, _text(typ) or "other", value_or_none)
            by_user[_int(user_id)].append(holding)
        totals = _categories(by_user, wanted)
        for user in users:
            uid = _int(user[0])
            if uid not in wanted.failed:
                wanted.rows[(uid, "total")] = float(totals.get(uid, _ZERO))
    wanted.invalid.sort()
    return wanted


# A holding before it is written: (key, kind, ref_id, name, type, exact value).
_Holding = tuple[str, str, int, Value, str, Decimal]
_ZERO = Decimal(0)
# Floats this far inside a double column's range are values it holds for sure; outside, the
# exact test decides (pg_numeric.fits_double).
_SURELY_FITS = (1e-307, 1e308)


def _fits(value: Decimal, as_float: float) -> bool:
    """Whether a double column holds ``value`` (``as_float``: its nearest float)."""
    low, high = _SURELY_FITS
    return low < abs(as_float) < high or pg_numeric.fits_double(value)


def _categories(by_user: dict[int, list[_Holding]], wanted: Wanted) -> dict[int, Decimal]:
    """Each user's non-zero category rows (the 'total' type left out, as the statement does)
    and holding rows into ``wanted``, and each user's total; a user with a value that does
    not fit a float column is failed instead."""
    totals: dict[int, Decimal] = {}
    for uid, holdings in by_user.items():
        sums: dict[str, Decimal] = {}
        floats: list[float] = []
        fits = True
        for _key, _kind, _ref, _name, typ, value in holdings:
            sums[typ] = sums.get(typ, _ZERO) + value
            as_float = float(value)
            floats.append(as_float)
            fits = fits and _fits(value, as_float)
        kept = {typ: (s, float(s)) for typ, s in sums.items() if s and typ != "total"}
        total = sum((s for s, _ in kept.values()), _ZERO)
        fits = fits and all(_fits(s, f) for s, f in kept.values())
        if not fits or not _fits(total, float(total)):
            wanted.failed.add(uid)
            continue
        totals[uid] = total
        for typ, (_, as_float) in kept.items():
            wanted.rows[(uid, typ)] = as_float
        for (key, kind, ref, name, typ, _), as_float in zip(holdings, floats, strict=True):
            wanted.holdings[(uid, key)] = (kind, ref, name, typ, as_float)
    return totals


def _money(value: Value) -> Decimal | None:
    """A REAL read from SQLite as PostgreSQL reads a double as numeric; None when it is not a
    number (Infinity, or text or a blob that SQLite let into the column)."""
    if isinstance(value, float):
        return pg_numeric.from_float(value)
    if isinstance(value, int):
        return pg_numeric.from_float(float(value))
    return None


def _text(value: Value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


@dataclass
class Plan:
    """What one batch changes: rows to remove and rows to insert or update, per table."""

    removed: list[list[Value]] = field(default_factory=list)
    upserted: list[list[Value]] = field(default_factory=list)
    holdings_removed: list[list[Value]] = field(default_factory=list)
    holdings_upserted: list[list[Value]] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return (
            len(self.removed)
            + len(self.upserted)
            + len(self.holdings_removed)
            + len(self.holdings_upserted)
        )

    def statements(self, day: str, created_at: str) -> tuple[list[Statement], list[str]]:
        """The batch's write transaction: one statement per non-empty kind of change, and the
        kind of each (its changes are that count)."""
        steps, kinds = [], []
        for kind, sql, rows in (
            ("removed", _REMOVE_SQL, self.removed),
            ("written", _UPSERT_SQL.format(created_at=created_at), self.upserted),
            ("holdings_removed", _HOLDINGS_REMOVE_SQL, self.holdings_removed),
            ("holdings_written", _HOLDINGS_UPSERT_SQL, self.holdings_upserted),
        ):
            if rows:
                text = json.dumps(rows, separators=(",", ":"), allow_nan=False)
                steps.append(Statement(sql, (day, text)))
                kinds.append(kind)
        return steps, kinds


def compare(wanted: Wanted, stored: Sequence[Row], held: Sequence[Row]) -> Plan:
    """Set what the date holds for the batch against what it should hold (the statement's
    ``diff`` and ``holdings_diff``); a failed user's rows are left as they are."""
    plan = Plan()
    have: dict[tuple[int, str], Value] = {}
    for user_id, category, total in stored:
        if isinstance(user_id, int) and user_id not in wanted.failed:
            have[(user_id, str(category))] = total
    for key, value in wanted.rows.items():
        if key not in have or _differs(have[key], value):
            plan.upserted.append([key[0], key[1], value])
    plan.removed = [[uid, cat] for uid, cat in have if (uid, cat) not in wanted.rows]
    have_holdings: dict[tuple[int, str], tuple[Value, ...]] = {}
    for user_id, holding_key, *rest in held:
        if isinstance(user_id, int) and user_id not in wanted.failed:
            have_holdings[(user_id, str(holding_key))] = tuple(rest)
    for (uid, hkey), holding in wanted.holdings.items():
        old = have_holdings.get((uid, hkey))
        if old is None or any(_differs(a, b) for a, b in zip(old, holding, strict=True)):
            plan.holdings_upserted.append([uid, hkey, *holding])
    plan.holdings_removed = [
        [uid, hkey] for uid, hkey in have_holdings if (uid, hkey) not in wanted.holdings
    ]
    return plan


def _differs(old: Value, new: Value) -> bool:
    """SQL's IS DISTINCT FROM on two values as SQLite holds them (1 and 1.0 are equal)."""
    if old is None or new is None:
        return old is not new
    if isinstance(old, int | float) and isinstance(new, int | float):
        return old != new
    return type(old) is not type(new) or old != new


def report(
    wanted: Wanted, written: int, removed: int, holdings_written: int, holdings_removed: int
) -> dict[str, Any]:
    """The batch's outcome under the names of the PostgreSQL statement's result row, for the
    counts and log lines both engines share (``snapshots.batch_counts``)."""
    unconverted = sorted(wanted.unconverted.items())
    return {
        "users": wanted.users,
        "fresh_rows": len(wanted.rows),
        "written": written,
        "removed": removed,
        "holdings": len(wanted.holdings),
        "holdings_written": holdings_written,
        "holdings_removed": holdings_removed,
        "unconverted_currencies": [cur for cur, _ in unconverted],
        "unconverted_accounts": [n for _, n in unconverted],
        "invalid": len(wanted.invalid),
        "invalid_keys": wanted.invalid[:SHOWN],
        "failed": len(wanted.failed),
        "failed_users": sorted(wanted.failed)[:SHOWN],
    }


def _scalar(rows: Sequence[Row]) -> int:
    return _int(rows[0][0] if rows else None)


def _int(value: Value) -> int:
    """An id read from Konto's database (the reads select integer ids only)."""
    if not isinstance(value, int):
        raise TypeError(f"expected an integer id from Konto's database, got {value!r}")
    return value
