"""What PostgreSQL itself needs for a day's snapshot: the yardsticks kontod's job is held to.

``floor``: every user's rows for one date, written by one statement (an ``INSERT … SELECT`` per
snapshot table) in one transaction, on a date that holds no row yet (nothing to update or delete), so nothing
but computing and writing the rows is paid. ``parallel floor``: the same statement restricted
to a range of user ids (``PARALLEL_FLOOR_SQL``), one range per connection, as many connections
as kontod has workers, all run at once: the floor with kontod's own parallelism, which is what
kontod's time is held to. ``aggregate``: the same SELECT, counted, nothing written: the cost of
reading and summing alone, which a re-run of an unchanged day should stay close to.

Both compute exactly the rows ``kontod.jobs.snapshots`` writes, for all users at once instead
of batch by batch; the benchmark checks that kontod's rows and the floor's are equal. This is
the one place to change when the job's rules change.
"""

from __future__ import annotations

# Every user's rows for the date $1, in base currency $2 with rates at most $3 days old, as the
# job computes them: each visible account converted with the newest usable rate of its
# currency (none: left out), each asset in the base currency at its current value, else its
# purchase price, else 0 (a 0 falls through as NULL does); a holding row per converted account
# and per asset; a row per category (account type, none: checking; asset type, none: other)
# whose sum is not 0, and a total row for every user; a holding is named name || '' (kontod's
# own tables, which this runs on, have no custom_name or address). ``{users}``, ``{accounts}`` and ``{assets}`` restrict the rows to a
# range of user ids, or to nothing (every user).
_ROWS_SQL = """
WITH rates AS (
    SELECT DISTINCT ON (currency) currency, base_amount,
           round(currency_amount, greatest(scale(currency_amount), 24)) AS currency_amount
      FROM kontod_rates
     WHERE base = $2 AND day <= $1::date AND day >= $1::date - $3::int
     ORDER BY currency, day DESC
),
accounts AS (
    SELECT a.user_id, a.id, coalesce(nullif(a.name, ''), '') AS name,
           coalesce(nullif(a.type, ''), 'checking') AS type,
           coalesce(nullif(upper(btrim(a.currency)), ''), 'EUR') AS currency,
           coalesce(a.balance::numeric, 0) AS amount
      FROM bank_accounts a
     WHERE a.hidden IS NOT TRUE{accounts}
),
converted AS (
    SELECT c.*,
           CASE WHEN c.currency = $2 OR c.amount = 0 THEN c.amount
                ELSE round(c.amount * r.base_amount / r.currency_amount, 8) END AS value
      FROM accounts c LEFT JOIN rates r ON r.currency = c.currency
),
holdings AS MATERIALIZED (
    SELECT user_id, 'account:' || id AS holding_key, 'account' AS kind, id AS ref_id, name,
           type, value, currency, amount
      FROM converted WHERE value IS NOT NULL
    UNION ALL
    SELECT s.user_id, 'asset:' || s.id, 'asset', s.id, coalesce(nullif(s.name, ''), ''),
           coalesce(nullif(s.type, ''), 'other'),
           coalesce(nullif(s.current_value::numeric, 0), nullif(s.purchase_price::numeric, 0), 0),
           NULL, NULL
      FROM assets s{assets}
),
categories AS (
    SELECT user_id, type AS category, sum(value) AS total_value
      FROM holdings GROUP BY user_id, type HAVING sum(value) <> 0
),
fresh AS (
    SELECT user_id, category, total_value FROM categories WHERE category <> 'total'
    UNION ALL
    SELECT u.id, 'total', coalesce(sum(c.total_value), 0)
      FROM users u LEFT JOIN categories c ON c.user_id = u.id AND c.category <> 'total'{users}
     GROUP BY u.id
)"""
ROWS_SQL = _ROWS_SQL.format(users="", accounts="", assets="")
# The same rows for the users whose id is in [$4, $5] (inclusive, as kontod's batches).
RANGED_ROWS_SQL = _ROWS_SQL.format(
    users="\n     WHERE u.id BETWEEN $4::bigint AND $5::bigint",
    accounts=" AND a.user_id BETWEEN $4::bigint AND $5::bigint",
    assets="\n     WHERE s.user_id BETWEEN $4::bigint AND $5::bigint",
)

# The floor: both tables written by one statement, in one transaction, the rows computed once.
_WRITES_SQL = """,
written AS (
    INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)
    SELECT $1::date, user_id, category, total_value FROM fresh{order}
    RETURNING 1
),
holdings_written AS (
    INSERT INTO holding_snapshots
           (date, user_id, holding_key, kind, ref_id, name, type, value, currency, amount)
    SELECT $1::date, user_id, holding_key, kind, ref_id, name, type, value, currency, amount
      FROM holdings{order}
    RETURNING 1
)
SELECT (SELECT count(*) FROM written) + (SELECT count(*) FROM holdings_written) AS rows
"""
_FLOOR_SQL = ROWS_SQL + _WRITES_SQL
FLOOR_SQL = _FLOOR_SQL.format(order="")
# One part of the parallel floor: the users whose id is in [$4, $5].
PARALLEL_FLOOR_SQL = RANGED_ROWS_SQL + _WRITES_SQL.format(order="")
# The last id of each of $1 parts of the users, all but the last part: with
# ``kontod.jobs.snapshots.id_ranges`` they cut the ids into $1 ranges of about as many users.
PARTS_SQL = """
SELECT max(id)::bigint AS id FROM (SELECT id, ntile($1) OVER (ORDER BY id) AS part FROM users) u
 GROUP BY part HAVING part < $1 ORDER BY 1
"""

# The history the data sets start with: the same rows in user order, laid out in the tables as
# kontod's batches (each one range of users) leave them, not in the floor's hash order.
HISTORY_SQL = _FLOOR_SQL.format(order=" ORDER BY user_id")

# The aggregate: the same rows, counted and summed so that none is skipped, nothing written.
AGGREGATE_SQL = (
    ROWS_SQL
    + """
SELECT (SELECT count(*) FROM fresh) + (SELECT count(*) FROM holdings) AS rows,
       (SELECT coalesce(sum(total_value), 0) FROM fresh) AS value
"""
)

# The parameters after the date: kontod's defaults (KONTOD_BASE_CURRENCY, KONTOD_RATE_MAX_AGE).
BASE_CURRENCY = "EUR"
RATE_MAX_AGE_DAYS = 7

# The tables a day's snapshot writes, with the columns that identify a row and its value;
# the benchmark compares two dates of each, row for row.
SNAPSHOT_TABLES: tuple[tuple[str, str], ...] = (
    ("patrimoine_snapshots", "user_id, category, total_value"),
    (
        "holding_snapshots",
        "user_id, holding_key, kind, ref_id, name, type, value, currency, amount",
    ),
)
