"""Konto-shaped data at any size, generated in set-based SQL and cached as a template database.

User u owns 1 to 8 bank accounts: most in EUR (checking, savings, investment, or no type),
about a tenth loans (negative), about 8 % in USD, CHF or GBP and 4 % crypto wallets (BTC or
ETH, providers ``blockchain``, ``coinbase`` and ``binance``), about a tenth hidden; and 0 to 2
assets, some valued only at their purchase price. Amounts are deterministic functions of the
user and account numbers, so every generation of a size holds the same data.

The snapshot tables then get ``history_days`` days of history, written by the floor statement
itself (one ``INSERT … SELECT`` per day, see ``bench/floor.py``), so that they hold exactly what
a month of kontod runs would have left. The history is loaded with the tables' secondary indexes
dropped and rebuilt afterwards, then vacuumed and analysed as an old table would be.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

import asyncpg

from bench import floor
from bench.state import (
    create_database,
    database_exists,
    drop_database,
    fingerprint,
    migration_digests,
    template_name,
    with_database,
)
from kontod import db
from kontod.demo import rates_sandbox

# The history's days end long before any date the benchmark writes, so every timed pass writes
# the newest date of the table, as the daily job does.
HISTORY_END = date(2025, 12, 31)

# h: PostgreSQL's own integer hash (hashint8, the one hash partitioning uses, stable across
# versions), spreading user and account numbers evenly over 0 .. 2^31.
SEED_SQL: tuple[str, ...] = (
    """
INSERT INTO users (id, email, name)
SELECT u, 'bench' || u || '@example.org', 'User ' || u FROM generate_series(1, $1::int) u
""",
    """
INSERT INTO bank_accounts
       (user_id, provider, provider_account_id, name, type, subtype, balance, hidden, currency)
SELECT u, p.provider, CASE WHEN p.provider IS NULL THEN NULL ELSE (u * 10 + k)::text END,
       'account ' || k, p.type, p.subtype, p.balance, (h >> 10) % 10 = 0, p.currency
  FROM generate_series(1, $1::int) u
 CROSS JOIN LATERAL generate_series(1, 1 + abs(hashint8(u)::bigint) % 8) k
 CROSS JOIN LATERAL (SELECT abs(hashint8(u::bigint * 16 + k)::bigint) AS h) r
 CROSS JOIN LATERAL (
     SELECT CASE WHEN h % 100 < 4 THEN (ARRAY['blockchain', 'coinbase', 'binance'])[1 + h / 100 % 3]
                 WHEN h % 100 < 70 THEN 'powens' END AS provider,
            CASE WHEN h % 100 < 4 THEN 'investment'
                 WHEN h % 100 < 12 THEN (ARRAY['checking', 'savings'])[1 + h / 100 % 2]
                 WHEN h % 100 < 22 THEN 'loan'
                 ELSE (ARRAY['checking', 'checking', 'savings', 'investment', NULL])[1 + h / 100 % 5]
            END AS type,
            CASE WHEN h % 100 < 4 THEN 'crypto' END AS subtype,
            CASE WHEN h % 100 < 4 THEN (ARRAY['BTC', 'ETH'])[1 + h / 1000 % 2]
                 WHEN h % 100 < 12 THEN (ARRAY['USD', 'CHF', 'GBP'])[1 + h / 1000 % 3]
                 ELSE 'EUR' END AS currency,
            CASE WHEN h % 100 < 4 THEN round((h / 7 % 500000)::numeric / 100000, 5)
                 WHEN h % 100 BETWEEN 12 AND 21 THEN -round((h / 3 % 30000000)::numeric / 100, 2)
                 ELSE round((h / 3 % 5000000)::numeric / 100, 2) END AS balance
 ) p
""",
    """
INSERT INTO assets (user_id, name, type, purchase_price, current_value)
SELECT u, 'asset ' || k,
       (ARRAY['real_estate', 'vehicle', 'valuable', 'other', NULL])[1 + h % 5],
       CASE WHEN h / 10 % 10 < 9 THEN round((h / 3 % 50000000)::numeric / 100, 2) END,
       CASE WHEN h / 10 % 10 < 6 OR h / 10 % 10 = 9
            THEN round((h / 7 % 60000000)::numeric / 100, 2) + 1 END
  FROM generate_series(1, $1::int) u
 CROSS JOIN LATERAL generate_series(1, abs(hashint8(u) / 8)::int % 3) k
 CROSS JOIN LATERAL (SELECT abs(hashint8(-(u::bigint * 16 + k))::bigint) AS h) r
""",
)

# A rate for every currency the accounts use on every day the benchmark may write ($1: first
# day, $2: last day), in kontod's table: the same figures every day, the ones the rate sandbox
# serves (kontod.rates_sandbox), so a run that fetches them stores nothing new and every date's
# rows are comparable with every other's.
RATES_SQL: tuple[str, ...] = (
    """
INSERT INTO kontod_rates (base, currency, day, currency_amount, base_amount, source)
SELECT 'EUR', q.currency, d::date, q.currency_amount, q.base_amount, q.source
  FROM generate_series($1::date, $2::date, interval '1 day') d,
       unnest($3::text[], $4::numeric[], $5::numeric[], $6::text[])
           AS q (currency, currency_amount, base_amount, source)
""",
)

SIZES_SQL = """
SELECT (SELECT count(*) FROM users) AS users,
       (SELECT count(*) FROM bank_accounts) AS accounts,
       (SELECT count(*) FROM bank_accounts WHERE hidden) AS hidden,
       (SELECT count(*) FROM bank_accounts WHERE currency <> 'EUR') AS foreign_accounts,
       (SELECT count(*) FROM assets) AS assets,
       (SELECT count(*) FROM patrimoine_snapshots) AS snapshot_rows,
       (SELECT count(*) FROM holding_snapshots) AS holding_rows,
       pg_database_size(current_database()) AS bytes
"""

# The secondary indexes and unique constraints of a table, to drop before a bulk load and
# rebuild after it (the primary key stays: appending to it is cheap).
BUILDING_PREFIX = "kontod_bench_building"
BUILT_WITH_SQL = "SELECT version, digest FROM kontod_bench_migrations"

INDEXES_SQL = """
SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition,
       c.conname AS constraint_name, pg_get_constraintdef(c.oid) AS constraint_definition
  FROM pg_index i
  LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.contype = 'u'
 WHERE i.indrelid = $1::regclass AND NOT i.indisprimary
"""

# The currencies of the generated accounts other than EUR, and the price API's ids of the crypto
# ones (those kontod ships: kontod.rates.SHIPPED_CRYPTO_IDS).
FIAT = ("USD", "CHF", "GBP")
CRYPTO = {"BTC": "bitcoin", "ETH": "ethereum"}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Sizes:
    users: int
    accounts: int
    hidden: int
    foreign_accounts: int
    assets: int
    snapshot_rows: int
    holding_rows: int
    bytes: int


def rate_quotes() -> tuple[list[str], list[Decimal], list[Decimal], list[str]]:
    """(currency, units of it, worth in EUR, source) of each currency the data set uses, as the
    rate sandbox quotes them."""
    fiat = [(cur, rates_sandbox.DEMO_ECB_RATES[cur], Decimal(1), "ecb") for cur in FIAT]
    crypto = [
        (cur, Decimal(1), rates_sandbox.DEMO_PRICES[coin]["eur"], "crypto")
        for cur, coin in CRYPTO.items()
    ]
    rows = fiat + crypto
    return (
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
    )


def estimated_bytes(users: int, days: int) -> int:
    """The size of a generated data set: about 3 KiB per user and 1.6 KiB per user and day of
    history, indexes included (measured: 4.85 GiB for 100 000 users with 30 days)."""
    return users * (3 * 1024 + days * 1640)


def history_days(days: int) -> list[date]:
    return [HISTORY_END - timedelta(days=n) for n in range(days - 1, -1, -1)]


def shape_fingerprint() -> str:
    return fingerprint(
        [*SEED_SQL, *RATES_SQL, floor.HISTORY_SQL, repr(rate_quotes()), HISTORY_END.isoformat()]
    )


async def sizes(conn: asyncpg.Connection) -> Sizes:
    row = await conn.fetchrow(SIZES_SQL)
    assert row is not None
    return Sizes(**dict(row))


async def ensure_template(
    admin_dsn: str, users: int, days: int, progress: Progress
) -> tuple[str, float | None]:
    """The template database for this size, generated when missing; (name, seconds spent
    generating it, or None when it was cached)."""
    name = template_name(users, days, shape_fingerprint())
    if await database_exists(admin_dsn, name):
        if await _migrations_still_apply(with_database(admin_dsn, name)):
            return name, None
        progress(f"{name}: a migration it was built with has changed since; generating it again")
        await drop_database(admin_dsn, name)
    started = time.perf_counter()
    # Not under the templates' prefix, so that no other run takes it for a stale template.
    building = f"{BUILDING_PREFIX}_u{users}_{uuid.uuid4().hex[:8]}"
    await create_database(admin_dsn, building)
    try:
        conn = await asyncpg.connect(with_database(admin_dsn, building))
        try:
            await _generate(conn, users, days, progress)
        finally:
            await conn.close()
        admin = await asyncpg.connect(admin_dsn)
        try:
            # Renamed only once complete: an interrupted generation never looks finished.
            await admin.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
        finally:
            await admin.close()
    except BaseException:
        await drop_database(admin_dsn, building)
        raise
    return name, time.perf_counter() - started


async def _migrations_still_apply(dsn: str) -> bool:
    """Whether every migration the template was built with still has the same SQL (migrations
    added since are applied to each copy)."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('kontod_bench_migrations')") is None:
            return False
        built = {r["version"]: r["digest"] for r in await conn.fetch(BUILT_WITH_SQL)}
    finally:
        await conn.close()
    now = migration_digests()
    return all(now.get(version) == digest for version, digest in built.items())


async def _generate(conn: asyncpg.Connection, users: int, days: int, progress: Progress) -> None:
    await db.migrate(conn)
    digests = migration_digests()
    await conn.execute(
        "CREATE TABLE kontod_bench_migrations (version integer PRIMARY KEY, digest text NOT NULL)"
    )
    await conn.execute(
        "INSERT INTO kontod_bench_migrations SELECT * FROM unnest($1::int[], $2::text[])",
        list(digests),
        list(digests.values()),
    )
    progress(f"generating {users} users with accounts and assets")
    async with conn.transaction():
        for sql in SEED_SQL:
            await conn.execute(sql, users)
        days_list = history_days(days)
        currencies, amounts, bases, sources = rate_quotes()
        for sql in RATES_SQL:
            await conn.execute(
                sql, days_list[0], date(2027, 12, 31), currencies, amounts, bases, sources
            )
    await conn.execute("ANALYZE")
    tables = [table for table, _ in floor.SNAPSHOT_TABLES]
    rebuild: list[str] = []
    for table in tables:
        for row in await conn.fetch(INDEXES_SQL, table):
            if row["constraint_name"]:
                await conn.execute(
                    f'ALTER TABLE {table} DROP CONSTRAINT "{row["constraint_name"]}"'
                )
                rebuild.append(
                    f'ALTER TABLE {table} ADD CONSTRAINT "{row["constraint_name"]}"'
                    f" {row['constraint_definition']}"
                )
            else:
                await conn.execute(f"DROP INDEX {row['name']}")
                rebuild.append(row["definition"])
    for n, day in enumerate(days_list, start=1):
        if n == 1 or n % 10 == 0:
            progress(f"history: day {n} of {days} ({day.isoformat()})")
        async with conn.transaction():
            await conn.execute(floor.HISTORY_SQL, day, floor.BASE_CURRENCY, floor.RATE_MAX_AGE_DAYS)
    progress("history: rebuilding the snapshot tables' indexes")
    await conn.execute("SET maintenance_work_mem = '512MB'")
    for sql in rebuild:
        await conn.execute(sql)
    await conn.execute("VACUUM (ANALYZE)")
    await conn.execute("CHECKPOINT")
