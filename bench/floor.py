"""What PostgreSQL itself needs for a day's snapshot: the yardsticks kontod's job is held to.

``floor``: every user's rows for one date, written by one ``INSERT … SELECT`` per snapshot table
in one transaction, on a date that holds no row yet (nothing to update or delete), so nothing
but computing and writing the rows is paid. ``aggregate``: the same SELECT, counted, nothing
written: the cost of reading and summing alone, which a re-run of an unchanged day should stay
close to.

Both compute exactly the rows ``kontod.jobs.snapshots`` writes, for all users at once instead
of batch by batch; the benchmark checks that kontod's rows and the floor's are equal. This is
the one place to change when the job's rules change.
"""

from __future__ import annotations

# Every user's category rows, as the job computes them: account balances that are not hidden
# by type (none: checking), assets by type (none: other) at current value, else purchase
# price, else 0; a row per category whose sum is not 0, and a total row for every user.
ROWS_SQL = """
WITH parts AS (
    SELECT a.user_id, coalesce(nullif(a.type, ''), 'checking') AS category,
           coalesce(a.balance, 0) AS value
      FROM bank_accounts a
     WHERE a.hidden IS NOT TRUE
    UNION ALL
    SELECT s.user_id, coalesce(nullif(s.type, ''), 'other'),
           coalesce(s.current_value, s.purchase_price, 0)
      FROM assets s
),
categories AS (
    SELECT user_id, category, sum(value) AS total_value
      FROM parts GROUP BY user_id, category HAVING sum(value) <> 0
),
fresh AS (
    SELECT user_id, category, total_value FROM categories WHERE category <> 'total'
    UNION ALL
    SELECT u.id, 'total', coalesce(sum(c.total_value), 0)
      FROM users u LEFT JOIN categories c ON c.user_id = u.id AND c.category <> 'total'
     GROUP BY u.id
)
"""

# The floor: one statement per table, all in one transaction ($1: the date).
FLOOR_SQL: tuple[str, ...] = (
    ROWS_SQL
    + """
INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)
SELECT $1::date, user_id, category, total_value FROM fresh
""",
)

# The history the data sets start with: the floor's rows in user order, laid out in the table as
# kontod's batches (each one range of users) leave them, not in the floor's hash order.
HISTORY_SQL: tuple[str, ...] = tuple(sql.rstrip() + " ORDER BY user_id\n" for sql in FLOOR_SQL)

# The aggregate: the same rows, counted and summed so that none is skipped, nothing written
# ($1: the date, which the rows do not depend on until rates are looked up by date).
AGGREGATE_SQL = (
    ROWS_SQL
    + """
SELECT $1::date AS day, count(*) AS rows, coalesce(sum(total_value), 0) AS value FROM fresh
"""
)

# The tables a day's snapshot writes, with the columns that identify a row and its value;
# the benchmark compares two dates of each, row for row.
SNAPSHOT_TABLES: tuple[tuple[str, str], ...] = (
    ("patrimoine_snapshots", "user_id, category, total_value"),
)
