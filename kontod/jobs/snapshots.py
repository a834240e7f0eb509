"""``daily-snapshots``: one wealth snapshot per user and category for the run's local date.

Users are processed in batches by id; each batch is one statement in one transaction, so the
number of round trips grows with the number of batches, never with the number of users, and no
transaction lasts longer than a batch.
"""

from __future__ import annotations

from datetime import date
from zoneinfo import ZoneInfo

import asyncpg

from kontod.job import JobBody, RunContext

# For the users with id > $1 (the next $2 of them), compute every category sum in SQL with exact
# numeric arithmetic, then in one statement delete the rows of that date that no longer apply
# and upsert the rest. Both parts see the same snapshot and touch disjoint rows.
BATCH_SQL = """
WITH batch AS (
    SELECT id FROM users WHERE id > $1 ORDER BY id LIMIT $2
),
parts AS (
    SELECT a.user_id, coalesce(nullif(a.type, ''), 'checking') AS category,
           coalesce(a.balance::numeric, 0) AS value
      FROM bank_accounts a JOIN batch b ON b.id = a.user_id
     WHERE coalesce(a.hidden::text, 'false') IN ('false', '0')
    UNION ALL
    SELECT s.user_id, coalesce(nullif(s.type, ''), 'other'),
           coalesce(s.current_value::numeric, s.purchase_price::numeric, 0)
      FROM assets s JOIN batch b ON b.id = s.user_id
),
categories AS (
    SELECT user_id, category, sum(value) AS total_value
      FROM parts GROUP BY user_id, category HAVING sum(value) <> 0
),
fresh AS (
    SELECT user_id, category, total_value FROM categories WHERE category <> 'total'
    UNION ALL
    SELECT b.id, 'total', coalesce(sum(c.total_value), 0)
      FROM batch b LEFT JOIN categories c ON c.user_id = b.id AND c.category <> 'total'
     GROUP BY b.id
),
removed AS (
    DELETE FROM patrimoine_snapshots p
     USING batch b
     WHERE p.user_id = b.id AND p.date::text = $3::date::text
       AND NOT EXISTS (SELECT 1 FROM fresh f
                        WHERE f.user_id = p.user_id AND f.category = p.category)
    RETURNING 1
),
written AS (
    INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)
    SELECT $3::date, user_id, category, total_value FROM fresh
    ON CONFLICT (date, user_id, category)
        DO UPDATE SET total_value = EXCLUDED.total_value, created_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM batch) AS users,
       (SELECT max(id) FROM batch) AS last_id,
       (SELECT count(*) FROM written) AS written,
       (SELECT count(*) FROM removed) AS removed
"""


def snapshot_date(ctx: RunContext, tz: ZoneInfo) -> date:
    """The local calendar date, in the configured zone, of the instant the run belongs to."""
    return ctx.at.astimezone(tz).date()


async def take_snapshots(
    pool: asyncpg.Pool, ctx: RunContext, tz: ZoneInfo, batch_size: int
) -> None:
    """Write the snapshot of every user for the run's date, batch by batch."""
    day = snapshot_date(ctx, tz)
    ctx.log.info("snapshots.started", date=day.isoformat(), batch_size=batch_size)
    for key in ("users", "rows_written", "rows_removed", "batches"):
        ctx.counts[key] += 0  # recorded even when there is no user
    last_id = 0
    async with pool.acquire() as conn:
        while True:
            async with conn.transaction():
                row = await conn.fetchrow(BATCH_SQL, last_id, batch_size, day)
            assert row is not None
            if row["users"] == 0:
                break
            last_id = row["last_id"]
            ctx.counts["users"] += row["users"]
            ctx.counts["items_users"] += row["users"]
            ctx.counts["rows_written"] += row["written"]
            ctx.counts["rows_removed"] += row["removed"]
            ctx.counts["batches"] += 1
            ctx.log.debug("snapshots.batch", last_user_id=last_id, users=row["users"])
            if row["users"] < batch_size:
                break
    ctx.log.info(
        "snapshots.written",
        date=day.isoformat(),
        users=ctx.counts["users"],
        rows_written=ctx.counts["rows_written"],
        rows_removed=ctx.counts["rows_removed"],
    )


def make_body(pool: asyncpg.Pool, tz: ZoneInfo, batch_size: int) -> JobBody:
    async def body(ctx: RunContext) -> None:
        await take_snapshots(pool, ctx, tz, batch_size)

    return body
