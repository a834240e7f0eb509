"""daily-snapshots on a Konto kept in the web app's SQLite file: kontod against SQLite's floor
and the web app's own per-user loop, with a writer standing in for the web app beside it.

The data set (``konto_file``): a SQLite file made with the web app's own table definitions
(kontod/demo/webapp_tables.sql) and the tables kontod adds (kontod/konto/lite_schema.py), with
the PostgreSQL data set's shape (bench/dataset.py): user u owns 1 to 8 accounts (a tenth
hidden, a tenth loans, 8 % in USD, CHF or GBP, 4 % in BTC or ETH) and 0 to 2 assets, amounts
from a fixed hash of the user and account numbers. Accounts and assets are inserted in hash
order, not user order, as a web app that has run for years holds them: a batch's rows are
spread over the whole table. The history (``history_days`` days) is written by the floor. The
file is generated once per size and shape, kept under the benchmark's state folder, and copied
for each run. Its journal mode is SQLite's default (a rollback journal), which kontod never
changes; in that mode a reader also holds off the web app's commit.

Rates and the run's bookkeeping live in a PostgreSQL database of the run's own (the benchmark
server's), with the data set's rates for every day (``dataset.RATES_SQL``).

The passes, on dates of their own:

| variant | what runs | its time |
|---|---|---|
| ``kontod`` | one scheduled run in a process of its own (``bench/lite_job.py``), batches of 1 000 users, one at a time; meanwhile a writer commits one small transaction every 50 ms (an ``audit_log`` row, as the web app writes on each request) with a 5 s busy timeout | the run's recorded duration |
| ``rerun`` | a later tick of the same date, nothing changed | the same |
| ``floor`` | one transaction: an ``INSERT … SELECT`` of every holding row, then one of every category and total row from them | the transaction |
| ``aggregate`` | the floor's rows computed, counted and summed, nothing written | the statement |
| ``old`` | the web app's loop: per user, two reads (its accounts, its assets: each a scan, as the web app's tables have no index on user_id), sums in the application, then each holding, category and total row written by its own autocommitted ``INSERT OR REPLACE``; on an even sample of users, its time per user times the users | extrapolated |

kontod's rows are compared with the floor's, and the sampled users' rows of the old loop with
the floor's, to the cent (the floor and the old loop compute in floats, kontod in exact decimals).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from bench import dataset
from bench.state import (
    ROOT,
    create_database,
    drop_database,
    fingerprint,
    state_dir,
    with_database,
)
from kontod import db
from kontod.konto import lite_schema
from kontod.konto.store import FENCE_TABLE_SQL

Progress = Callable[[str], None]

# The writer beside the run: one transaction every 50 ms, waiting up to 5 s for the lock.
WRITER_EVERY_S = 0.05
WRITER_BUSY_S = 5.0
# The Hrana sandbox's token: a new one for each benchmark run.
SANDBOX_TOKEN = uuid.uuid4().hex
# Users the old loop runs on, spread evenly over the ids.
OLD_SAMPLE = 200
# The first date the passes write: after the history.
FIRST_DAY = date(2026, 1, 1)

# A fixed hash of an integer (Knuth's multiplicative hash, 31 bits): the same data every time.
_H = "((({x}) * 2654435761) % 2147483648)"

SEED_SQL: tuple[str, ...] = (
    """
WITH RECURSIVE n(u) AS (SELECT 1 UNION ALL SELECT u + 1 FROM n WHERE u < ?1)
INSERT INTO users (id, email, name) SELECT u, 'bench' || u || '@example.org', 'User ' || u FROM n
""",
    f"""
WITH RECURSIVE n(u) AS (SELECT 1 UNION ALL SELECT u + 1 FROM n WHERE u < ?1),
k(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM k WHERE k < 8),
a AS (
    SELECT u, k, {_H.format(x="u * 16 + k")} AS h FROM n JOIN k ON k.k <= 1 + {_H.format(x="u")} % 8
)
INSERT INTO bank_accounts (user_id, provider, name, type, subtype, balance, hidden, currency)
SELECT u,
       CASE WHEN h % 100 < 4 THEN 'blockchain' WHEN h % 100 < 70 THEN 'powens' END,
       'account ' || k,
       CASE WHEN h % 100 < 4 THEN 'investment'
            WHEN h % 100 < 12 THEN CASE h / 100 % 2 WHEN 0 THEN 'checking' ELSE 'savings' END
            WHEN h % 100 < 22 THEN 'loan'
            ELSE CASE h / 100 % 5 WHEN 0 THEN 'checking' WHEN 1 THEN 'checking'
                 WHEN 2 THEN 'savings' WHEN 3 THEN 'investment' ELSE '' END END,
       CASE WHEN h % 100 < 4 THEN 'crypto' END,
       CASE WHEN h % 100 < 4 THEN round((h / 7 % 500000) / 100000.0, 5)
            WHEN h % 100 BETWEEN 12 AND 21 THEN -round((h / 3 % 30000000) / 100.0, 2)
            ELSE round((h / 3 % 5000000) / 100.0, 2) END,
       (h >> 10) % 10 = 0,
       CASE WHEN h % 100 < 4 THEN CASE h / 1000 % 2 WHEN 0 THEN 'BTC' ELSE 'ETH' END
            WHEN h % 100 < 12 THEN CASE h / 1000 % 3 WHEN 0 THEN 'USD' WHEN 1 THEN 'CHF'
                                   ELSE 'GBP' END
            ELSE 'EUR' END
  FROM a ORDER BY {_H.format(x="h + 7")}
""",
    f"""
WITH RECURSIVE n(u) AS (SELECT 1 UNION ALL SELECT u + 1 FROM n WHERE u < ?1),
k(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM k WHERE k < 2),
s AS (
    SELECT u, k, {_H.format(x="-(u * 16 + k) + 4294967296")} AS h
      FROM n JOIN k ON k.k <= {_H.format(x="u")} / 8 % 3
)
INSERT INTO assets (user_id, name, type, purchase_price, current_value)
SELECT u, 'asset ' || k,
       CASE h % 4 WHEN 0 THEN 'real_estate' WHEN 1 THEN 'vehicle' WHEN 2 THEN 'valuable'
            ELSE 'other' END,
       CASE WHEN h / 10 % 10 < 9 THEN round((h / 3 % 50000000) / 100.0, 2) END,
       CASE WHEN h / 10 % 10 < 6 OR h / 10 % 10 = 9
            THEN round((h / 7 % 60000000) / 100.0, 2) + 1 END
  FROM s ORDER BY {_H.format(x="h + 3")}
""",
)

# The floor's rows, as kontod's rules give them, in floats. ?1: the date, ?2: the rates as
# JSON [[currency, base amount, currency amount], ...], ?3: the base currency.
_HOLDINGS_SQL = """
WITH rates(currency, base_amount, currency_amount) AS (
    SELECT value->>0, value->>1, value->>2 FROM json_each(?2)
),
accounts AS (
    SELECT a.user_id, a.id, a.name, coalesce(nullif(a.type, ''), 'checking') AS type,
           coalesce(nullif(upper(trim(a.currency)), ''), 'EUR') AS currency,
           coalesce(a.balance, 0) AS amount
      FROM bank_accounts a WHERE coalesce(a.hidden, 0) = 0 AND a.user_id IS NOT NULL
),
holdings AS (
    SELECT c.user_id, 'account:' || c.id AS holding_key, 'account' AS kind, c.id AS ref_id,
           c.name, c.type,
           CASE WHEN c.currency = ?3 OR c.amount = 0 THEN c.amount
                ELSE round(c.amount * r.base_amount / r.currency_amount, 8) END AS value
      FROM accounts c LEFT JOIN rates r ON r.currency = c.currency
     WHERE c.currency = ?3 OR c.amount = 0 OR r.currency IS NOT NULL
    UNION ALL
    SELECT s.user_id, 'asset:' || s.id, 'asset', s.id, s.name, coalesce(nullif(s.type, ''), 'other'),
           coalesce(s.current_value, s.purchase_price, 0)
      FROM assets s
)"""
FLOOR_HOLDINGS_SQL = (
    _HOLDINGS_SQL
    + """
INSERT INTO holding_snapshots (date, user_id, holding_key, kind, ref_id, name, type, value)
SELECT ?1, user_id, holding_key, kind, ref_id, name, type, value FROM holdings
"""
)
# The category and total rows, from the holding rows of the date just written.
FLOOR_CATEGORIES_SQL = """
WITH categories AS (
    SELECT user_id, type AS category, sum(value) AS total_value FROM holding_snapshots
     WHERE date = ?1 GROUP BY user_id, type HAVING sum(value) <> 0
)
INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)
SELECT ?1, user_id, category, total_value FROM categories WHERE category <> 'total'
UNION ALL
SELECT ?1, u.id, 'total', coalesce(sum(c.total_value), 0)
  FROM users u LEFT JOIN categories c ON c.user_id = u.id AND c.category <> 'total'
 GROUP BY u.id
"""
# The aggregate: the same rows computed, counted and summed, nothing written.
AGGREGATE_SQL = (
    _HOLDINGS_SQL
    + """,
categories AS (
    SELECT user_id, type AS category, sum(value) AS total_value FROM holdings
     GROUP BY user_id, type HAVING sum(value) <> 0
)
SELECT (SELECT count(*) FROM holdings) + (SELECT count(*) FROM categories)
     + (SELECT count(*) FROM users), (SELECT total(total_value) FROM categories)
"""
)

# Rows of date ?1 that date ?2 lacks or holds with a value more than half a cent away (each
# looked up by the table's unique key); with equal row counts, none means the same rows.
_DIFFER_SQL = """
SELECT count(*) FROM {table} a
  LEFT JOIN {table} b ON b.date = ?2 AND {match}
 WHERE a.date = ?1 AND (b.rowid IS NULL OR abs(a.{value} - b.{value}) > 0.005) {users}
"""
_COUNT_SQL = "SELECT count(*) FROM {table} WHERE date = ? {users}"

# The web app's loop, statement by statement.
OLD_ACCOUNTS_SQL = (
    "SELECT id, name, type, currency, balance FROM bank_accounts WHERE user_id = ? AND hidden = 0"
)
OLD_ASSETS_SQL = (
    "SELECT id, name, type, purchase_price, current_value FROM assets WHERE user_id = ?"
)
OLD_HOLDING_SQL = """
INSERT OR REPLACE INTO holding_snapshots (date, user_id, holding_key, kind, ref_id, name, type, value)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
OLD_WRITE_SQL = """
INSERT OR REPLACE INTO patrimoine_snapshots (date, user_id, category, total_value)
VALUES (?, ?, ?, ?)
"""


@dataclass
class LitePass:
    variant: str
    day: date
    seconds: float
    rows: int = 0
    peak_rss_kib: int | None = None
    writes: dict[str, Any] = field(default_factory=dict)
    writer: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class LiteResult:
    users: int
    accounts: int
    assets: int
    history_days: int
    file_bytes: int
    batch_size: int
    passes: list[LitePass] = field(default_factory=list)
    # Rows of kontod's date that differ from the floor's (by more than half a cent, or absent).
    kontod_differs: int | None = None
    libsql_differs: int | None = None
    old_differs: int | None = None
    old_users: int = 0

    def seconds(self, variant: str) -> list[float]:
        return [p.seconds for p in self.passes if p.variant == variant]

    def median(self, variant: str) -> float | None:
        found = self.seconds(variant)
        return statistics.median(found) if found else None

    def ratio(self, top: str, bottom: str) -> float | None:
        a, b = self.median(top), self.median(bottom)
        return None if a is None or not b else a / b

    @property
    def peak_rss_kib(self) -> int | None:
        found = [p.peak_rss_kib for p in self.passes if p.peak_rss_kib is not None]
        return max(found) if found else None

    def writer_wait(self, key: str, variant: str = "kontod") -> float | None:
        """The concurrent writer's worst ``key`` (p99, max) over the passes of ``variant``
        (kontod, floor), in s."""
        found = [p.writer[key] for p in self.passes if p.variant == variant and key in p.writer]
        return max(found) if found else None

    def lock_held(self, key: str) -> float | None:
        """kontod's longest write transaction (``key``: p99, max) over its passes, in s."""
        found = [p.writes[key] for p in self.passes if p.variant == "kontod" and p.writes.get(key)]
        return max(found) if found else None

    @property
    def rerun_rows(self) -> int:
        return sum(p.rows for p in self.passes if p.variant == "rerun")


def shape_fingerprint(history_days: int) -> str:
    script = resources.files("kontod.demo").joinpath("webapp_tables.sql").read_text()
    return fingerprint(
        [
            script,
            lite_schema.HOLDINGS_TABLE_SQL,
            FENCE_TABLE_SQL,
            *SEED_SQL,
            FLOOR_HOLDINGS_SQL,
            FLOOR_CATEGORIES_SQL,
            repr(rates_json()),
            str(history_days),
        ]
    )


def rates_json() -> str:
    """The data set's rates (the same every day) as the floor's JSON parameter."""
    currencies, amounts, bases, _ = dataset.rate_quotes()
    return json.dumps(
        [[c, float(b), float(a)] for c, a, b in zip(currencies, amounts, bases, strict=True)]
    )


def konto_file(users: int, history_days: int, progress: Progress) -> Path:
    """The cached data set file for this size, generated when missing."""
    folder = state_dir() / "lite"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"konto_u{users}_h{history_days}_{shape_fingerprint(history_days)}.db"
    if path.exists():
        return path
    for stale in folder.glob(f"konto_u{users}_h{history_days}_*.db"):
        stale.unlink()
    building = path.with_suffix(f".{uuid.uuid4().hex[:8]}.building")
    progress(f"lite: generating a Konto SQLite file of {users} users")
    conn = sqlite3.connect(building, isolation_level=None)
    try:
        script = resources.files("kontod.demo").joinpath("webapp_tables.sql").read_text()
        conn.executescript(script)
        conn.execute(lite_schema.HOLDINGS_TABLE_SQL)
        conn.execute(FENCE_TABLE_SQL)
        conn.execute("BEGIN")
        for sql in SEED_SQL:
            conn.execute(sql, (users,))
        conn.execute("COMMIT")
        for n in range(history_days):
            day = (FIRST_DAY - timedelta(days=history_days - n)).isoformat()
            _floor(conn, day)
        conn.execute("ANALYZE")
        conn.execute("VACUUM")
    finally:
        conn.close()
    building.rename(path)
    return path


def _floor(conn: sqlite3.Connection, day: str) -> int:
    """The floor: every user's rows for ``day``, two statements in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        before = conn.total_changes
        conn.execute(FLOOR_HOLDINGS_SQL, (day, rates_json(), "EUR"))
        conn.execute(FLOOR_CATEGORIES_SQL, (day,))
        rows = conn.total_changes - before
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return rows


@asynccontextmanager
async def hrana_sandbox(path: Path) -> AsyncIterator[str]:
    """The Hrana sandbox serving ``path``, in a process of its own; its URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod.demo.hrana_sandbox",
        "--db",
        str(path),
        "--token",
        SANDBOX_TOKEN,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if "KONTOD_KONTO_URL=" not in line:
            raise RuntimeError(f"the Hrana sandbox did not start: {line!r}")
        yield line.split("KONTOD_KONTO_URL=", 1)[1].strip()
    finally:
        proc.terminate()
        await proc.wait()


@asynccontextmanager
async def bookkeeping(admin_dsn: str) -> Any:
    """A PostgreSQL database of this run's own: kontod's tables and the data set's rates."""
    name = f"kontod_bench_lite_{uuid.uuid4().hex[:8]}"
    await create_database(admin_dsn, name)
    dsn = with_database(admin_dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await db.migrate(conn)
            currencies, amounts, bases, sources = dataset.rate_quotes()
            for sql in dataset.RATES_SQL:
                await conn.execute(
                    sql,
                    FIRST_DAY - timedelta(days=30),
                    date(2027, 12, 31),
                    currencies,
                    amounts,
                    bases,
                    sources,
                )
        finally:
            await conn.close()
        yield dsn
    finally:
        await drop_database(admin_dsn, name)


class Writer:
    """The web app beside the run: one small transaction every ``WRITER_EVERY_S``, open loop
    (each is due at a fixed time and its wait counts from then), on a thread of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.waits: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lite-writer", daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=WRITER_BUSY_S, isolation_level=None)
        try:
            due = time.perf_counter()
            while not self._stop.is_set():
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO audit_log (user_id, action, resource, status)"
                    " VALUES (1, 'GET', '/api/dashboard', 'ok')"
                )
                conn.execute("COMMIT")
                self.waits.append(time.perf_counter() - due)
                due += WRITER_EVERY_S
                pause = due - time.perf_counter()
                if pause > 0:
                    self._stop.wait(pause)
        finally:
            conn.close()

    def summary(self) -> dict[str, Any]:
        if len(self.waits) < 2:
            return {"transactions": len(self.waits)}
        cuts = statistics.quantiles(self.waits, n=100, method="inclusive")
        return {
            "transactions": len(self.waits),
            "p50": cuts[49],
            "p99": cuts[98],
            "max": max(self.waits),
        }


async def kontod_pass(
    dsn: str,
    path: Path,
    tick: datetime,
    batch_size: int,
    variant: str,
    libsql: str | None = None,
) -> LitePass:
    """One scheduled run in a process of its own, the writer committing beside it; through
    the libSQL server at ``libsql`` when given, else on the file itself."""
    where = ["--libsql", libsql, "--token", SANDBOX_TOKEN] if libsql else ["--konto", str(path)]
    with Writer(path) as writer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.lite_job",
            "--dsn",
            dsn,
            *where,
            "--tick",
            tick.isoformat(),
            "--batch-size",
            str(batch_size),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"the SQLite snapshot run for {tick.isoformat()} failed (exit {proc.returncode}):"
            f" {out.decode()[-400:]} {err.decode()[-2000:]}"
        )
    found: dict[str, Any] = json.loads(lines[-1])
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT extract(epoch FROM finished_at - started_at)::float8 AS seconds, counts"
            " FROM kontod_runs WHERE id = $1",
            found["run_id"],
        )
    finally:
        await conn.close()
    assert row is not None
    counts = json.loads(row["counts"]) if isinstance(row["counts"], str) else row["counts"]
    written = ("rows_written", "rows_removed", "holdings_written", "holdings_removed")
    return LitePass(
        variant=variant,
        day=tick.date(),
        seconds=row["seconds"],
        rows=sum(int(counts.get(k, 0)) for k in written),
        peak_rss_kib=found.get("VmHWM"),
        writes=found.get("writes", {}),
        writer=writer.summary(),
    )


def floor_pass(path: Path, day: date) -> LitePass:
    """The floor, the writer committing beside it too: the floor holds the write lock for its
    whole transaction, which is what the web app would wait for."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        with Writer(path) as writer:
            time.sleep(WRITER_EVERY_S * 2)
            started = time.perf_counter()
            rows = _floor(conn, day.isoformat())
            spent = time.perf_counter() - started
            time.sleep(WRITER_EVERY_S * 2)
        return LitePass("floor", day, spent, rows, writer=writer.summary())
    finally:
        conn.close()


def aggregate_pass(path: Path, day: date) -> LitePass:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        started = time.perf_counter()
        rows, _ = conn.execute(AGGREGATE_SQL, (day.isoformat(), rates_json(), "EUR")).fetchone()
        return LitePass("aggregate", day, time.perf_counter() - started, rows)
    finally:
        conn.close()


def old_pass(path: Path, day: date, users: int, sample: int) -> LitePass:
    """The web app's loop on ``sample`` users spread over the ids; its time per user times
    ``users``."""
    step = max(1, users // sample)
    chosen = list(range(1, users + 1, step))[:sample]
    rates = {c: (b, a) for c, b, a in json.loads(rates_json())}
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        started = time.perf_counter()
        rows = sum(_old_user(conn, day.isoformat(), u, rates) for u in chosen)
        spent = time.perf_counter() - started
    finally:
        conn.close()
    return LitePass(
        "old",
        day,
        spent / len(chosen) * users,
        rows,
        note=f"{len(chosen)} users measured ({spent:.1f} s), extrapolated to {users}",
    )


def _old_user(
    conn: sqlite3.Connection, day: str, user_id: int, rates: dict[str, tuple[float, float]]
) -> int:
    """One user the web app's way: two reads, sums in floats, one autocommitted write a row."""
    sums: dict[str, float] = {}
    written = 0
    for acc_id, name, typ, currency, balance in conn.execute(OLD_ACCOUNTS_SQL, (user_id,)):
        category = typ or "checking"
        cur = (currency or "").strip().upper() or "EUR"
        amount = balance or 0.0
        if cur == "EUR" or amount == 0:
            value = amount
        elif cur in rates:
            base_amount, currency_amount = rates[cur]
            value = round(amount * base_amount / currency_amount, 8)
        else:
            continue
        sums[category] = sums.get(category, 0.0) + value
        conn.execute(
            OLD_HOLDING_SQL,
            (day, user_id, f"account:{acc_id}", "account", acc_id, name, category, value),
        )
        written += 1
    for asset_id, name, typ, purchase, current in conn.execute(OLD_ASSETS_SQL, (user_id,)):
        category = typ or "other"
        value = current if current is not None else purchase if purchase is not None else 0.0
        sums[category] = sums.get(category, 0.0) + value
        conn.execute(
            OLD_HOLDING_SQL,
            (day, user_id, f"asset:{asset_id}", "asset", asset_id, name, category, value),
        )
        written += 1
    total = 0.0
    for category, value in sums.items():
        if value != 0 and category != "total":
            conn.execute(OLD_WRITE_SQL, (day, user_id, category, value))
            total += value
            written += 1
    conn.execute(OLD_WRITE_SQL, (day, user_id, "total", total))
    return written + 1


def differing(path: Path, day: date, floor_day: date, users: list[int] | None = None) -> int:
    """Rows of ``day`` that are not ``floor_day``'s to the cent, and the difference in their
    numbers of rows (only ``users``' rows when given)."""
    conn = sqlite3.connect(path)
    try:
        only = ""
        if users is not None:
            only = f"AND user_id IN (SELECT value FROM json_each('{json.dumps(users)}'))"
        found = 0
        for table, key, value in (
            ("patrimoine_snapshots", ("user_id", "category"), "total_value"),
            ("holding_snapshots", ("user_id", "holding_key"), "value"),
        ):
            match = " AND ".join(f"b.{k} = a.{k}" for k in key)
            sql = _DIFFER_SQL.format(
                table=table, match=match, value=value, users=only.replace("user_id", "a.user_id")
            )
            found += conn.execute(sql, (day.isoformat(), floor_day.isoformat())).fetchone()[0]
            count = _COUNT_SQL.format(table=table, users=only)
            ours = conn.execute(count, (day.isoformat(),)).fetchone()[0]
            floors = conn.execute(count, (floor_day.isoformat(),)).fetchone()[0]
            found += abs(ours - floors)
        return found
    finally:
        conn.close()


def _sizes(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        accounts = conn.execute("SELECT count(*) FROM bank_accounts").fetchone()[0]
        assets = conn.execute("SELECT count(*) FROM assets").fetchone()[0]
        return accounts, assets
    finally:
        conn.close()


async def measure(
    admin_dsn: str,
    users: int,
    *,
    history_days: int,
    repetitions: int,
    batch_size: int,
    old_sample: int,
    progress: Progress,
) -> LiteResult:
    """Every variant on a copy of the size's file, ``repetitions`` times (the old loop once)."""
    template = await asyncio.to_thread(konto_file, users, history_days, progress)
    path = template.parent / f"work_{uuid.uuid4().hex[:8]}_u{users}.db"
    shutil.copyfile(template, path)
    # Written to disk now, so that the first passes' commits do not pay for the copy.
    with path.open("rb+") as copied:
        os.fsync(copied.fileno())
    accounts, assets = _sizes(path)
    result = LiteResult(
        users,
        accounts,
        assets,
        history_days,
        path.stat().st_size,
        batch_size,
    )
    day = FIRST_DAY
    floor_day = kontod_day = libsql_day = FIRST_DAY
    try:
        async with bookkeeping(admin_dsn) as dsn, hrana_sandbox(path) as url:
            for rep in range(repetitions):
                tick = datetime(day.year, day.month, day.day, 1, 0, tzinfo=UTC)  # 02:00 Paris
                progress(f"lite: {users} users, repetition {rep + 1}: kontod on {day}")
                p = await kontod_pass(dsn, path, tick, batch_size, "kontod")
                result.passes.append(p)
                kontod_day = day
                progress(f"lite: {users} users: re-run of {day}")
                result.passes.append(
                    await kontod_pass(dsn, path, tick + timedelta(minutes=5), batch_size, "rerun")
                )
                day += timedelta(days=1)
                progress(f"lite: {users} users: floor on {day}")
                result.passes.append(await asyncio.to_thread(floor_pass, path, day))
                floor_day = day
                result.passes.append(await asyncio.to_thread(aggregate_pass, path, day))
                day += timedelta(days=1)
                progress(f"lite: {users} users: kontod through a libSQL server on {day}")
                tick = datetime(day.year, day.month, day.day, 1, 0, tzinfo=UTC)
                result.passes.append(
                    await kontod_pass(dsn, path, tick, batch_size, "libsql", libsql=url)
                )
                libsql_day = day
                day += timedelta(days=1)
            result.libsql_differs = await asyncio.to_thread(differing, path, libsql_day, floor_day)
            result.kontod_differs = await asyncio.to_thread(differing, path, kontod_day, floor_day)
            if old_sample:
                progress(f"lite: {users} users: the web app's loop on {old_sample} users")
                old = await asyncio.to_thread(old_pass, path, day, users, old_sample)
                result.passes.append(old)
                step = max(1, users // old_sample)
                chosen = list(range(1, users + 1, step))[:old_sample]
                result.old_users = len(chosen)
                result.old_differs = await asyncio.to_thread(
                    differing, path, day, floor_day, chosen
                )
    finally:
        path.unlink(missing_ok=True)
        for extra in path.parent.glob(path.name + "-*"):
            extra.unlink()
    return result
