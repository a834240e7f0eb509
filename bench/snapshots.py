"""The old daily-snapshots job, re-implemented as the reference page describes it (defect 1).

List the users, then for each user read the accounts, read the assets, sum them in the
application (exact ``Decimal``) and write each non-zero category row and the total one
statement at a time, each statement committing on its own as SQLite's autocommit did. It is
the benchmark's lower bar: kontod's job must beat it by far, not merely match it.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# The old job, statement by statement. "INSERT OR REPLACE" of SQLite becomes an upsert.
OLD_USERS_SQL = "SELECT id FROM users ORDER BY id"
OLD_ACCOUNTS_SQL = "SELECT type, balance FROM bank_accounts WHERE user_id = $1 AND NOT hidden"
OLD_ASSETS_SQL = "SELECT type, purchase_price, current_value FROM assets WHERE user_id = $1"
OLD_WRITE_SQL = """
INSERT INTO patrimoine_snapshots (date, user_id, category, total_value) VALUES ($1, $2, $3, $4)
ON CONFLICT (date, user_id, category)
    DO UPDATE SET total_value = EXCLUDED.total_value, created_at = now()
"""


async def old_snapshots(
    conn: asyncpg.Connection | PoolConnectionProxy, day: date, *, commit_per_user: bool = False
) -> tuple[int, int]:
    """The old job for ``day``, one round trip per read and per written row; (users, rows).

    Each statement commits on its own, as the old job's did; with ``commit_per_user`` a user's
    statements share one transaction instead, which leaves the round trips and takes most of
    the commits (and their waits for the disk) away.
    """
    users = await conn.fetch(OLD_USERS_SQL)
    written = errors = 0
    for user in users:
        try:
            if commit_per_user:
                async with conn.transaction():
                    written += await _old_user(conn, day, user["id"])
            else:
                written += await _old_user(conn, day, user["id"])
        except asyncpg.PostgresError:
            # The old job logged, counted and went on; the benchmark's data never fails.
            errors += 1
    if errors:
        raise RuntimeError(f"the old snapshot job failed for {errors} user(s)")
    return len(users), written


async def _old_user(conn: asyncpg.Connection | PoolConnectionProxy, day: date, user_id: int) -> int:
    """One user's snapshot the old way: two reads, sums in Python, one write per row."""
    sums: dict[str, Decimal] = {}
    for account in await conn.fetch(OLD_ACCOUNTS_SQL, user_id):
        category = account["type"] or "checking"
        sums[category] = sums.get(category, Decimal(0)) + account["balance"]
    for asset in await conn.fetch(OLD_ASSETS_SQL, user_id):
        category = asset["type"] or "other"
        value = asset["current_value"]
        if value is None:
            value = asset["purchase_price"]
        sums[category] = sums.get(category, Decimal(0)) + (value or Decimal(0))
    total = Decimal(0)
    written = 0
    for category, value in sums.items():
        if value != 0:
            await conn.execute(OLD_WRITE_SQL, day, user_id, category, value)
            total += value
            written += 1
    await conn.execute(OLD_WRITE_SQL, day, user_id, "total", total)
    return written + 1
