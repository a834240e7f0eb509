"""Konto's SQLite file as kontod opens it: where it is, its schema, its fence, its lock. The
store's promises (schema checks, fencing, atomicity, foreign keys) are tested on both engines:
the local file and the same file behind a libSQL server (the Hrana sandbox)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kontod.config import ConfigError, KontoLocation, load_settings, parse_konto_location
from kontod.konto import lite_schema
from kontod.konto.schema import KontoSchemaError
from kontod.konto.sqlite import open_sqlite
from kontod.konto.store import Fence, Fenced, KontoBusy, KontoSql, KontoUnavailable, Statement
from tests.helpers import webapp_konto
from tests.konto_engines import ENGINES, konto_on


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Each engine in turn: ``sqlite`` (the file) and ``libsql`` (the file behind a server)."""
    return str(request.param)


@pytest.fixture
async def konto(tmp_path: Path, engine: str) -> AsyncIterator[KontoSql]:
    async with konto_on(engine, webapp_konto(tmp_path / "konto.db")) as db:
        await lite_schema.create_missing(db)
        yield db


@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [
        ("file:/srv/konto/db/konto.db", "sqlite", "/srv/konto/db/konto.db"),
        ("file:///srv/konto.db", "sqlite", "/srv/konto.db"),
        ("./db/konto.db", "sqlite", "./db/konto.db"),
        ("libsql://konto-acme.turso.io", "libsql", "https://konto-acme.turso.io"),
        ("http://127.0.0.1:8080/", "libsql", "http://127.0.0.1:8080"),
        ("postgresql://k@db/konto", "postgresql", "postgresql://k@db/konto"),
    ],
)
def test_a_konto_url_names_its_engine(text: str, kind: str, target: str) -> None:
    assert parse_konto_location(text) == KontoLocation(kind, target)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["mysql://x/y", "file:", "https://", "file://host/konto.db"])
def test_a_konto_url_kontod_cannot_use_is_refused_by_name(text: str) -> None:
    with pytest.raises(ConfigError, match="KONTOD_KONTO_URL"):
        load_settings({"KONTOD_KONTO_URL": text})


def test_the_web_apps_own_variables_are_read_and_the_token_never_shown() -> None:
    s = load_settings({"TURSO_DATABASE_URL": "libsql://k.turso.io", "TURSO_AUTH_TOKEN": "s3cret"})
    assert s.konto.location == KontoLocation("libsql", "https://k.turso.io")
    assert s.konto.auth_token == "s3cret"
    assert "s3cret" not in repr(s)


def test_a_postgresql_konto_url_must_be_kontods_own_database() -> None:
    s = load_settings({"KONTOD_KONTO_URL": "postgresql://k@db/konto"})
    assert s.konto.location is None and s.database.url == "postgresql://k@db/konto"
    with pytest.raises(ConfigError, match="same PostgreSQL database"):
        load_settings(
            {
                "KONTOD_KONTO_URL": "postgresql://k@db/a",
                "KONTOD_DATABASE_URL": "postgresql://k@db/b",
            }
        )


def test_a_missing_file_is_never_created(tmp_path: Path) -> None:
    with pytest.raises(KontoUnavailable, match="does not exist"):
        open_sqlite(str(tmp_path / "konto.db"), 1)
    assert not (tmp_path / "konto.db").exists()


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "konto.db").write_text("not a database, just text " * 100)
    with pytest.raises(KontoUnavailable, match="cannot be opened"):
        open_sqlite(str(tmp_path / "konto.db"), 1)


async def test_the_web_apps_tables_pass_and_only_kontods_two_are_added(
    tmp_path: Path, engine: str
) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    before = _tables(path)
    info_before = _tables_info(path)
    async with konto_on(engine, path) as db:
        await lite_schema.create_missing(db)
        await lite_schema.load(db)
    assert _tables(path) - before == {"holding_snapshots", "kontod_fence"}
    assert _tables_info_of(before, path) == info_before


async def test_a_missing_column_is_named_with_its_table(tmp_path: Path, engine: str) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE transactions DROP COLUMN category")
    conn.close()
    async with konto_on(engine, path) as db:
        await lite_schema.create_missing(db)
        with pytest.raises(KontoSchemaError, match="table transactions has no column category"):
            await lite_schema.load(db)


async def test_a_newer_run_fences_an_older_one_out(konto: KontoSql) -> None:
    await konto.advance_fence(Fence("daily-snapshots", 7))
    await konto.write(
        [Statement("INSERT INTO users (email) VALUES ('a@x')")], Fence("daily-snapshots", 7)
    )
    await konto.advance_fence(Fence("daily-snapshots", 8))
    with pytest.raises(Fenced, match="holds run 8, not run 7"):
        await konto.write(
            [Statement("INSERT INTO users (email) VALUES ('b@x')")], Fence("daily-snapshots", 7)
        )
    with pytest.raises(Fenced):
        await konto.advance_fence(Fence("daily-snapshots", 7))
    assert await konto.read("SELECT email FROM users") == [("a@x",)]


async def test_a_failed_statement_leaves_nothing_of_its_transaction(konto: KontoSql) -> None:
    with pytest.raises(Exception, match="UNIQUE"):
        await konto.write(
            [
                Statement("INSERT INTO users (email) VALUES ('a@x')"),
                Statement("INSERT INTO users (email) VALUES ('a@x')"),
            ],
            None,
        )
    assert await konto.read("SELECT count(*) FROM users") == [(0,)]


async def test_foreign_keys_are_enforced_on_kontods_writes(konto: KontoSql) -> None:
    with pytest.raises(Exception, match="FOREIGN KEY"):
        await konto.write(
            [Statement("INSERT INTO bank_accounts (user_id, name) VALUES (99, 'x')")], None
        )


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'").fetchall()
    conn.close()
    return {r[0] for r in rows} - {"sqlite_sequence"}


def _tables_info(path: Path) -> dict[str, list[tuple[object, ...]]]:
    return _tables_info_of(_tables(path), path)


def _tables_info_of(tables: set[str], path: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(path) as conn:
        info = {t: conn.execute(f"PRAGMA table_info({t})").fetchall() for t in sorted(tables)}
    conn.close()
    return info


def _hold_exclusive(path: Path, seconds: float, held: threading.Event) -> None:
    """Another process's view: a connection that holds the file's exclusive lock (no reader
    gets in) for ``seconds``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    held.set()
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()


async def test_a_read_waits_out_a_writer_holding_the_file_longer_than_one_attempt(
    tmp_path: Path,
) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    db = open_sqlite(str(path), busy_timeout=10)
    try:
        held = threading.Event()
        holder = threading.Thread(target=_hold_exclusive, args=(path, 2.5, held))
        holder.start()
        held.wait()
        # SQLite's busy handler gives up after ATTEMPT_WAIT_S (1 s); kontod tries again.
        assert await db.read("SELECT count(*) FROM users") == [(0,)]
        holder.join()
    finally:
        await db.close()


async def test_a_read_blocked_past_the_busy_timeout_is_a_clear_error(tmp_path: Path) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    db = open_sqlite(str(path), busy_timeout=1.5)
    try:
        held = threading.Event()
        holder = threading.Thread(target=_hold_exclusive, args=(path, 4, held))
        holder.start()
        held.wait()
        with pytest.raises(KontoBusy, match=r"stayed locked .* 1\.5 s"):
            await db.read("SELECT count(*) FROM users")
        holder.join()
    finally:
        await db.close()


async def test_a_step_reports_the_rows_it_changed_whatever_its_form(konto: KontoSql) -> None:
    results = await konto.write(
        [
            Statement("INSERT INTO users (email) VALUES ('a@x'), ('b@x'), ('c@x')"),
            Statement(
                "WITH gone AS (SELECT id FROM users WHERE email <> 'a@x')"
                " UPDATE users SET name = 'n' WHERE id IN (SELECT id FROM gone)"
            ),
            Statement("SELECT count(*) FROM users"),
        ],
        None,
    )
    assert [r.changes for r in results] == [3, 2, 0]
