"""``kontod doctor`` on a Konto in the web app's SQLite file (and in PostgreSQL): ok on a healthy
one; a second writer of today's snapshot rows is a warning (exit 1); a missing column is a
failure (exit 2). Real sandboxes answer for Powens and the rate sources."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg

from kontod.demo.rates_sandbox import RateSandbox
from kontod.demo.rates_sandbox import urls as rate_urls
from kontod.demo.sandbox import Sandbox, token_for
from kontod.konto.tokens import encrypt
from tests.helpers import WEBAPP_SCHEMA, webapp_konto
from tests.integration.test_cli import kontod

KEY = bytes.fromhex("5f" * 16 + "a3" * 16)
ZONE = "Europe/Paris"


def today() -> str:
    return datetime.now(ZoneInfo(ZONE)).date().isoformat()


@asynccontextmanager
async def sandboxes(dsn: str) -> AsyncIterator[dict[str, str]]:
    """The environment of a doctor run: kontod's database, the sandbox bank and rate sources."""
    async with Sandbox().serve() as bank, RateSandbox().serve() as rates_root:
        fiat, crypto = rate_urls(rates_root)
        yield {
            "KONTOD_DATABASE_URL": dsn,
            "KONTOD_TIMEZONE": ZONE,
            "KONTOD_POWENS_URL": bank,
            "KONTOD_FIAT_RATES_URL": fiat,
            "KONTOD_CRYPTO_PRICES_URL": crypto,
            "KONTOD_DB_ENCRYPTION_KEY": KEY.hex(),
        }


async def a_snapshot_run(dsn: str, days_ago: int = 0) -> None:
    """A daily-snapshots run of kontod that ended ``days_ago`` days ago and took a minute."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO kontod_runs (job, trigger, started_at, finished_at, status, instance,
                                        lease_until)
               SELECT 'daily-snapshots', 'manual', ended - interval '1 minute', ended,
                      'success', 'test', ended
                 FROM (SELECT now() - make_interval(days => $1) AS ended) AS t""",
            days_ago,
        )
    finally:
        await conn.close()


def healthy_konto(path: Path) -> Path:
    """One user, an encrypted token, keyed transactions and today's snapshot rows written now."""
    webapp_konto(path)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO users (id, email) VALUES (1, 'u1@example.org')")
        conn.execute("INSERT INTO bank_accounts (id, user_id, name) VALUES (1, 1, 'Compte')")
        conn.execute(
            "INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)"
            " VALUES (1, '1', ?, 'active')",
            (encrypt(token_for(1), KEY),),
        )
        conn.execute(
            "INSERT INTO transactions (bank_account_id, date, amount, label, tx_hash)"
            " VALUES (1, '2020-01-02', -4.5, 'CAFE', 'powens_1')"
        )
        conn.execute(
            "INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)"
            " VALUES (?, 1, 'total', 100)",
            (today(),),
        )
    conn.close()
    return path


async def test_doctor_on_a_sqlite_konto(dsn: str, tmp_path: Path) -> None:
    path = healthy_konto(tmp_path / "konto.db")
    await a_snapshot_run(dsn)
    async with sandboxes(dsn) as env:
        env["KONTOD_KONTO_URL"] = f"file:{path}"
        code, out, err = await kontod("doctor", "--json", env=env)
        assert (code, err) == (0, ""), out
        report = json.loads(out)
        statuses = {c["name"]: c["status"] for c in report["checks"]}
        assert report["status"] == "ok"
        assert statuses == {
            name: "ok"
            for name in (
                "kontod database",
                "konto database",
                "konto tables",
                "konto users",
                "bank tokens",
                "clock",
                "snapshot writers",
                "web app jobs",
                "powens api",
                "fiat rates",
                "crypto prices",
            )
        }
        assert token_for(1) not in out
        # The web app's dashboard writes a row of today two hours before kontod's run.
        with sqlite3.connect(path) as conn:
            conn.execute(
                "INSERT INTO patrimoine_snapshots (date, user_id, category, total_value,"
                " created_at) VALUES (?, 1, 'bank', 60, datetime('now', '-2 hours'))",
                (today(),),
            )
        conn.close()
        code, out, err = await kontod("doctor", env=env)
        assert (code, err) == (1, "")
        lines = out.splitlines()
        assert "ok    web app jobs" in out
        [writer] = [i for i, line in enumerate(lines) if line.startswith("warn  snapshot writers")]
        assert "1 of today's 2 snapshot row(s) were written outside any kontod run" in lines[writer]
        assert re.search(r" [+-]\d\d:\d\d$", lines[writer])  # local, with its offset
        assert "dashboard auto-snapshot" in lines[writer + 1]
        assert lines[-1] == "overall: warn"
        # kontod first ran three days ago; the web app's job imported a transaction of
        # yesterday without a key since.
        await a_snapshot_run(dsn, days_ago=3)
        with sqlite3.connect(path) as conn:
            conn.execute(
                "INSERT INTO transactions (bank_account_id, date, amount, label)"
                " VALUES (1, date('now', '-1 day'), -9.9, 'BOULANGERIE')"
            )
        conn.close()
        code, out, err = await kontod("doctor", env=env)
        assert (code, err) == (1, "")
        assert "warn  web app jobs" in out
        assert "1 transaction(s) without tx_hash dated after kontod's first run" in out
        # A column kontod needs is gone.
        with sqlite3.connect(path) as conn:
            conn.execute("DROP INDEX idx_transactions_hash")
            conn.execute("ALTER TABLE transactions DROP COLUMN tx_hash")
        conn.close()
        code, out, err = await kontod("doctor", env=env)
        assert (code, err) == (2, "")
        assert "fail  konto tables" in out
        assert "Konto's table transactions has no column tx_hash" in out
        assert out.splitlines()[-1] == "overall: fail"


async def test_doctor_fails_on_an_empty_konto_in_postgresql(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(WEBAPP_SCHEMA)
    finally:
        await conn.close()
    async with sandboxes(empty_dsn) as env:
        code, out, err = await kontod("doctor", "--json", env=env)
        assert err == ""
        statuses = {c["name"]: c["status"] for c in json.loads(out)["checks"]}
        # Never migrated (the doctor applies nothing), no user.
        assert statuses["kontod database"] == "warn"
        assert statuses["konto tables"] == "ok"
        assert statuses["konto users"] == "fail"
        assert code == 2
        code, _, err = await kontod("migrate", env=env)
        assert code == 0, err
        code, out, _ = await kontod("doctor", "--json", env=env)
        statuses = {c["name"]: c["status"] for c in json.loads(out)["checks"]}
        assert statuses["kontod database"] == "ok"
        assert statuses["powens api"] == "ok" and statuses["clock"] == "ok"
