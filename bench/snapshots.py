"""The old daily-snapshots job, re-implemented as it runs in Konto's web app today.

The reference page describes the job as it first was (defect 1: two reads and a write per
category row, one after another) and what the web app writes today: every balance converted to
EUR and one ``holding_snapshots`` row per account and per asset beside the category rows. This
is that job: the rates read once, then for each user read the accounts, read the assets,
convert and sum them in the application (exact ``Decimal``) and write each holding row, each
non-zero category row and the total one statement at a time, each statement committing on its
own as SQLite's autocommit did. It writes the rows kontod and the floor write, so the three
are compared on the same work. It is the benchmark's lower bar: kontod's job must beat it by
far, not merely match it.
"""

from __future__ import annotations

from datetime import date
from decimal import ROUND_HALF_UP, Decimal

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# The old job, statement by statement. "INSERT OR REPLACE" of SQLite becomes an upsert.
OLD_RATES_SQL = """
SELECT DISTINCT ON (currency) currency, base_amount, currency_amount FROM kontod_rates
 WHERE base = $2 AND day <= $1 AND day >= $1 - $3::int ORDER BY currency, day DESC
"""
OLD_USERS_SQL = "SELECT id FROM users ORDER BY id"
OLD_ACCOUNTS_SQL = """
SELECT id, name, type, currency, balance FROM bank_accounts WHERE user_id = $1 AND NOT hidden
"""
OLD_ASSETS_SQL = (
    "SELECT id, name, type, purchase_price, current_value FROM assets WHERE user_id = $1"
)
OLD_WRITE_SQL = """
INSERT INTO patrimoine_snapshots (date, user_id, category, total_value) VALUES ($1, $2, $3, $4)
ON CONFLICT (date, user_id, category)
    DO UPDATE SET total_value = EXCLUDED.total_value, created_at = now()
"""
OLD_HOLDING_SQL = """
INSERT INTO holding_snapshots
       (date, user_id, holding_key, kind, ref_id, name, type, value, currency, amount)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (date, user_id, holding_key)
    DO UPDATE SET kind = EXCLUDED.kind, ref_id = EXCLUDED.ref_id, name = EXCLUDED.name,
                  type = EXCLUDED.type, value = EXCLUDED.value, currency = EXCLUDED.currency,
                  amount = EXCLUDED.amount
"""
EIGHT_PLACES = Decimal("0.00000001")

Rates = dict[str, tuple[Decimal, Decimal]]  # currency -> (base amount, currency amount)
Conn = asyncpg.Connection | PoolConnectionProxy


async def old_snapshots(
    conn: Conn,
    day: date,
    *,
    base: str = "EUR",
    max_age_days: int = 7,
    commit_per_user: bool = False,
) -> tuple[int, int]:
    """The old job for ``day``, one round trip per read and per written row; (users, rows).

    Each statement commits on its own, as the old job's did; with ``commit_per_user`` a user's
    statements share one transaction instead, which leaves the round trips and takes most of
    the commits (and their waits for the disk) away.
    """
    rates: Rates = {
        r["currency"]: (r["base_amount"], r["currency_amount"])
        for r in await conn.fetch(OLD_RATES_SQL, day, base, max_age_days)
    }
    users = await conn.fetch(OLD_USERS_SQL)
    written = errors = 0
    for user in users:
        try:
            if commit_per_user:
                async with conn.transaction():
                    written += await _old_user(conn, day, user["id"], base, rates)
            else:
                written += await _old_user(conn, day, user["id"], base, rates)
        except asyncpg.PostgresError:
            # The old job logged, counted and went on; the benchmark's data never fails.
            errors += 1
    if errors:
        raise RuntimeError(f"the old snapshot job failed for {errors} user(s)")
    return len(users), written


def _converted(amount: Decimal, currency: str, base: str, rates: Rates) -> Decimal | None:
    """``amount`` in the base currency; None when there is no rate (left out, as kontod does)."""
    if currency == base or amount == 0:
        return amount
    rate = rates.get(currency)
    if rate is None:
        return None
    base_amount, currency_amount = rate
    # Rounded once, half away from zero, as PostgreSQL's round() does in the floor and kontod.
    return (amount * base_amount / currency_amount).quantize(EIGHT_PLACES, ROUND_HALF_UP)


def _holding(
    kind: str,
    row: asyncpg.Record,
    category: str,
    value: Decimal,
    currency: str | None,
    amount: Decimal | None,
) -> tuple[object, ...]:
    """The columns of a holding row after its date and user: key, kind, ref_id, name, type,
    value, currency, amount."""
    return (f"{kind}:{row['id']}", kind, row["id"], row["name"], category, value, currency, amount)


async def _old_user(conn: Conn, day: date, user_id: int, base: str, rates: Rates) -> int:
    """One user's snapshot the old way: two reads, sums in Python, one write per row."""
    sums: dict[str, Decimal] = {}
    written = 0
    for a in await conn.fetch(OLD_ACCOUNTS_SQL, user_id):
        category = a["type"] or "checking"
        currency = (a["currency"] or "").strip().upper() or "EUR"
        amount = a["balance"] if a["balance"] is not None else Decimal(0)
        value = _converted(amount, currency, base, rates)
        if value is None:
            continue
        sums[category] = sums.get(category, Decimal(0)) + value
        await conn.execute(
            OLD_HOLDING_SQL,
            day,
            user_id,
            *_holding("account", a, category, value, currency, amount),
        )
        written += 1
    for s in await conn.fetch(OLD_ASSETS_SQL, user_id):
        category = s["type"] or "other"
        value = s["current_value"]
        if value is None:
            value = s["purchase_price"]
        value = value if value is not None else Decimal(0)
        sums[category] = sums.get(category, Decimal(0)) + value
        await conn.execute(
            OLD_HOLDING_SQL, day, user_id, *_holding("asset", s, category, value, None, None)
        )
        written += 1
    total = Decimal(0)
    for category, value in sums.items():
        if value != 0 and category != "total":
            await conn.execute(OLD_WRITE_SQL, day, user_id, category, value)
            total += value
            written += 1
    await conn.execute(OLD_WRITE_SQL, day, user_id, "total", total)
    return written + 1
