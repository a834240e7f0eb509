"""A SQLite Konto wired into kontod: the daemon and the commands read and check Konto's tables in
the file, never the empty copies migration 0001 leaves in kontod's PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sqlite3
import sys
from datetime import date, datetime, time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from kontod import db
from kontod.config import KontoLocation, load_settings
from kontod.demo.rates_sandbox import RateSandbox
from kontod.demo.rates_sandbox import urls as rate_urls
from kontod.konto.tokens import WrongKey, encrypt
from tests.daemon_harness import running_daemon, settings_for
from tests.helpers import PARIS, add_user, webapp_konto
from tests.integration.test_cli import kontod
from tests.integration.test_http import samples

KEY = bytes.fromhex("71" * 32)
OTHER_KEY = bytes.fromhex("2c" * 32)
LATEST = ("kontod_snapshot_latest_date_timestamp_seconds", ())


def konto_file(tmp_path: Path, *, snapshot: str | None = None, token_key: bytes = KEY) -> Path:
    """A Konto file with one user, an encrypted bank token and, with ``snapshot``, a total row
    of that date."""
    path = webapp_konto(tmp_path / "konto.db")
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO users (id, email) VALUES (1, 'a@example.org')")
        conn.execute(
            "INSERT INTO bank_connections (user_id, powens_token, status) VALUES (1, ?, 'active')",
            (encrypt("a-bank-token-long-enough-to-look-encrypted", token_key),),
        )
        if snapshot is not None:
            conn.execute(
                """INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)
                   VALUES (?, 1, 'total', 1234.5)""",
                (snapshot,),
            )
    conn.close()
    return path


def tables(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every table of the file and its ``PRAGMA table_info``."""
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")]
        return {n: conn.execute(f"PRAGMA table_info({n})").fetchall() for n in sorted(names)}
    finally:
        conn.close()


async def pg_decoy(pool: asyncpg.Pool) -> None:
    """Konto's tables in PostgreSQL hold a newer snapshot and a token under another key: any
    reader that reaches them instead of the file gives itself away."""
    uid = await add_user(pool, accounts=[("checking", "1.00", False)])
    await pool.execute(
        """INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)
           VALUES (DATE '2031-01-01', $1, 'total', 99)""",
        uid,
    )
    await pool.execute(
        """INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)
           VALUES ($1, '9', $2, 'active')""",
        uid,
        encrypt("a-token-under-another-key-entirely", OTHER_KEY),
    )


async def test_the_daemon_opens_checks_and_reads_the_sqlite_konto(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = konto_file(tmp_path, snapshot="2026-03-01")
    before = tables(path)
    await pg_decoy(pool)
    settings = settings_for(
        dsn,
        konto={"location": KontoLocation("sqlite", str(path))},
        refresh={"db_encryption_key": KEY},
    )
    async with running_daemon(settings) as (daemon, base):
        assert daemon.konto is not None and daemon.konto.engine == "sqlite"
        await daemon._refresh_stats()
        async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as resp:
            text = await resp.text()
    # The freshness probe read the file's date, not PostgreSQL's newer one.
    assert samples(text)[LATEST] == datetime.combine(date(2026, 3, 1), time(), PARIS).timestamp()
    after = tables(path)
    assert set(after) - set(before) == {"holding_snapshots", "kontod_fence"}
    assert {t: after[t] for t in before} == before


async def test_a_key_that_opens_none_of_the_files_tokens_stops_the_start(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await pg_decoy(pool)  # a token OTHER_KEY opens, in PostgreSQL: not where Konto is
    path = konto_file(tmp_path)
    settings = settings_for(
        dsn,
        konto={"location": KontoLocation("sqlite", str(path))},
        refresh={"db_encryption_key": OTHER_KEY},
    )
    with pytest.raises(WrongKey, match=r"bank_connections\.powens_token"):
        async with running_daemon(settings):
            pass


async def test_the_embedded_postgresql_holds_kontods_tables_beside_a_sqlite_konto(
    tmp_path: Path,
) -> None:
    env = {"KONTOD_KONTO_URL": "file:/srv/konto/db/konto.db", "KONTOD_STATE_DIR": str(tmp_path)}
    settings = load_settings(env)
    assert settings.database.embedded and settings.database.url is None
    assert db.refusal(settings, create=True) is None
    # An explicit choice is kept, and a DSN given is used.
    assert not load_settings(env | {"KONTOD_EMBEDDED": "0"}).database.embedded
    assert not load_settings(env | {"KONTOD_DATABASE_URL": "postgresql://k@h/d"}).database.embedded
    # Without a Konto elsewhere, the refusal stands: it guards Konto's own data.
    assert db.refusal(load_settings({"KONTOD_STATE_DIR": str(tmp_path)}), create=True)


async def test_migrate_adds_kontods_two_tables_and_changes_no_other(
    dsn: str, tmp_path: Path
) -> None:
    path = konto_file(tmp_path)
    before = tables(path)
    env = {"KONTOD_DATABASE_URL": dsn, "KONTOD_KONTO_URL": f"file:{path}"}
    code, _, err = await kontod("migrate", env=env)
    assert code == 0, err
    after = tables(path)
    assert set(after) - set(before) == {"holding_snapshots", "kontod_fence"}
    assert {t: after[t] for t in before} == before
    # Again: nothing more.
    code, _, err = await kontod("migrate", env=env)
    assert code == 0, err
    assert tables(path) == after


async def test_history_reads_the_snapshots_of_the_sqlite_konto(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    today = datetime.now(PARIS).date().isoformat()
    path = konto_file(tmp_path, snapshot=today)
    await pg_decoy(pool)
    await pool.execute(
        "INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)"
        " SELECT current_date, user_id, 'total', 5 FROM patrimoine_snapshots LIMIT 1"
    )
    env = {
        "KONTOD_DATABASE_URL": dsn,
        "KONTOD_KONTO_URL": str(path),
        "KONTOD_TIMEZONE": "Europe/Paris",
    }
    code, out, err = await kontod("history", env=env)
    assert code == 0, err
    assert out.splitlines()[1].split() == [today, "1", "1", "1,234.50"], out


async def test_a_missing_file_stops_every_command_that_reads_konto(
    dsn: str, tmp_path: Path
) -> None:
    missing = tmp_path / "db" / "konto.db"
    env = {"KONTOD_DATABASE_URL": dsn, "KONTOD_KONTO_URL": f"file:{missing}"}
    for command in (("migrate",), ("history",), ("jobs", "run", "daily-snapshots")):
        code, _, err = await kontod(*command, env=env)
        assert code == 2, (command, err)
        assert f"Konto's SQLite file {missing} does not exist" in err, (command, err)
    assert not missing.exists() and not missing.parent.exists()


@pytest.mark.parametrize("engine", ["sqlite", "libsql"])
async def test_the_demo_keeps_its_konto_in_a_sqlite_file_and_says_where(
    tmp_path: Path, engine: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KONTOD_", "DATABASE_URL"))}
    env = {**clean, "KONTOD_STATE_DIR": str(tmp_path), "KONTOD_LISTEN": "127.0.0.1:0"}
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod",
        "demo",
        "--konto",
        engine,
        env={**env, "KONTOD_LOG_FORMAT": "json"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    printed: list[str] = []
    logged: list[str] = []
    opened: dict[str, str] = {}
    try:
        assert demo.stderr is not None
        async with asyncio.timeout(120):
            while not printed or printed[-1] != "Ctrl-C stops it.":
                line = (await demo.stderr.readline()).decode()
                assert line, "the demo ended before printing its commands:\n" + "\n".join(printed)
                logged.append(line)
                if not line.startswith("{"):
                    printed.append(line.strip())
                elif '"konto.opened"' in line:
                    opened = json.loads(line)
        assert opened["engine"] == engine, opened
        path = tmp_path / "demo" / "konto.db"
        where = next(line for line in printed if line.startswith("Konto's tables:"))
        assert where.startswith(f"Konto's tables: the SQLite file {path}")
        command = shlex.split(next(line for line in printed if line.startswith("sqlite3 ")))
        assert command[-2] == str(path)
        # The printed query, on the file: the demo's three users' snapshot of today.
        snapshot = query_file(path, command[-1])
        assert {row[1] for row in snapshot} == {1, 2, 3}
        assert ("total" in {row[2] for row in snapshot}) and len(snapshot) >= 3
        # The refresh job wrote Bruno's balances from the sandbox bank into the file.
        synced = query_file(
            path, "SELECT count(*) FROM bank_accounts WHERE user_id = 2 AND last_sync IS NOT NULL"
        )
        assert synced == [(3,)], "".join(logged)
        # Both jobs ran on the file and left every table of the web app as it was made.
        fresh = tables(webapp_konto(tmp_path / "fresh.db"))
        assert {t: info for t, info in tables(path).items() if t in fresh} == fresh
        export = next(line for line in printed if line.startswith("export "))
        assignments = dict(word.split("=", 1) for word in shlex.split(export)[1:])
        if engine == "sqlite":
            assert assignments["KONTOD_KONTO_URL"] == f"file:{path}"
        else:
            # The file behind a libSQL server: the other commands reach it there, with its token.
            url = assignments["KONTOD_KONTO_URL"]
            assert where.endswith(f"served as a libSQL server (Hrana over HTTP) at {url}")
            assert url.startswith("http://127.0.0.1:")
            assert assignments["KONTOD_KONTO_AUTH_TOKEN"]
        code, out, err = await kontod("history", env=assignments)
        assert code == 0, err
        assert out.splitlines()[1].split()[2] == "3", out
    finally:
        if demo.returncode is None:
            demo.send_signal(signal.SIGINT)
            await asyncio.wait_for(demo.wait(), timeout=60)


def query_file(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_jobs_run_writes_the_snapshot_into_the_sqlite_konto(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = konto_file(tmp_path)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO bank_accounts (user_id, name, type, balance) VALUES (1, 'a', 'savings', 12.5)"
        )
    conn.close()
    async with RateSandbox().serve() as rates_root:
        fiat, crypto = rate_urls(rates_root)
        env = {
            "KONTOD_DATABASE_URL": dsn,
            "KONTOD_KONTO_URL": str(path),
            "KONTOD_FIAT_RATES_URL": fiat,
            "KONTOD_CRYPTO_PRICES_URL": crypto,
        }
        code, out, err = await kontod("jobs", "run", "daily-snapshots", env=env)
    assert code == 0, err
    assert "success" in out, out
    rows = query_file(path, "SELECT category, total_value FROM patrimoine_snapshots ORDER BY 1")
    assert rows == [("savings", 12.5), ("total", 12.5)]
    # PostgreSQL's copy of Konto's tables was neither read nor written.
    assert await pool.fetchval("SELECT count(*) FROM patrimoine_snapshots") == 0
    [run] = await pool.fetch("SELECT status, counts FROM kontod_runs")
    assert run["status"] == "success" and json.loads(run["counts"])["users"] == 1
