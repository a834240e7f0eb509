"""``kontod reconcile transactions``: the unkeyed twins an earlier kontod made are removed, the
web app's keyed rows and every other row stay, and a second run removes nothing; on PostgreSQL
and on SQLite/libSQL."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from kontod.konto.reconcile import konto_key, reconcile_lite
from tests.helpers import WEBAPP_SCHEMA, webapp_konto
from tests.integration.test_cli import kontod
from tests.konto_engines import ENGINES, konto_on

# (account, date, amount, label, tx_hash): accounts 1 and 2 of user 1.
ROWS: list[tuple[int, str, float, str | None, str | None]] = [
    # One keyed row, one twin: the twin goes.
    (1, "2026-01-05", -12.5, "CARTE MONOP", "powens_101"),
    (1, "2026-01-05", -12.5, "CARTE MONOP", None),
    # Two keyed rows, three unkeyed: two go, one stays (multiplicity).
    (1, "2026-01-06", -3.0, "BOULANGERIE", "powens_102"),
    (1, "2026-01-06", -3.0, "BOULANGERIE", "powens_103"),
    (1, "2026-01-06", -3.0, "BOULANGERIE", None),
    (1, "2026-01-06", -3.0, "BOULANGERIE", None),
    (1, "2026-01-06", -3.0, "BOULANGERIE", None),
    # NULL labels are equal.
    (1, "2026-01-07", 20.0, None, "powens_104"),
    (1, "2026-01-07", 20.0, None, None),
    # No keyed twin: another label, another day, a key that is not the web app's.
    (1, "2026-01-05", -12.5, "CARTE MONOP 2", None),
    (1, "2026-01-08", -7.0, "SNCF", None),
    (1, "2026-01-09", 1.0, "MANUAL", "manual_1"),
    (1, "2026-01-09", 1.0, "MANUAL", None),
    # Account 2: the same transaction as account 1's is not a twin; a fallback key is.
    (2, "2026-01-05", -12.5, "CARTE MONOP", None),
    (2, "2026-02-01", 5.0, "VIREMENT", "powens_f_0123456789abcdef0123"),
    (2, "2026-02-01", 5.0, "VIREMENT", None),
]
# The ids (1-based insertion order) of the twins that must go.
TWINS = {2, 5, 6, 9, 16}


def seed_lite(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO users (id, email) VALUES (1, 'u1@example.org')")
        conn.executemany(
            "INSERT INTO bank_accounts (id, user_id, name) VALUES (?, 1, ?)",
            [(1, "Compte courant"), (2, "Livret")],
        )
        conn.executemany(
            "INSERT INTO transactions (id, bank_account_id, date, amount, label, tx_hash)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(i, *row) for i, row in enumerate(ROWS, 1)],
        )
    conn.close()


def ids_lite(path: Path) -> set[int]:
    with sqlite3.connect(path) as conn:
        found = {int(r[0]) for r in conn.execute("SELECT id FROM transactions")}
    conn.close()
    return found


EVERY = set(range(1, len(ROWS) + 1))


async def records(pool: asyncpg.Pool) -> list[tuple[str, int, str, int, str]]:
    rows = await pool.fetch(
        "SELECT konto_location, bank_account_id, tx_hash, twin_id, state"
        " FROM kontod_reconciled ORDER BY konto_location, twin_id"
    )
    return [tuple(r) for r in rows]


@pytest.mark.parametrize("engine", ENGINES)
async def test_twins_are_removed_once_on_both_sqlite_engines(
    tmp_path: Path, engine: str, pool: asyncpg.Pool
) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    seed_lite(path)
    async with konto_on(engine, path) as konto:
        dry = await reconcile_lite(konto, pool, dry_run=True)
        assert (dry.found, dry.removed) == ({1: 4, 2: 1}, {})
        assert ids_lite(path) == EVERY and await records(pool) == []
        done = await reconcile_lite(konto, pool, dry_run=False)
        assert (done.found, done.removed) == ({1: 4, 2: 1}, {1: 4, 2: 1})
        assert ids_lite(path) == EVERY - TWINS
        where = konto_key(konto.location)
        assert await records(pool) == [
            (where, 1, "powens_101", 2, "done"),
            (where, 1, "powens_102", 5, "done"),
            (where, 1, "powens_103", 6, "done"),
            (where, 1, "powens_104", 9, "done"),
            (where, 2, "powens_f_0123456789abcdef0123", 16, "done"),
        ]
        # The third BOULANGERIE (id 7) is genuine: a second run leaves it.
        again = await reconcile_lite(konto, pool, dry_run=False)
        assert (again.found, again.removed) == ({}, {})
        assert ids_lite(path) == EVERY - TWINS


async def test_two_konto_files_keep_their_records_apart(tmp_path: Path, pool: asyncpg.Pool) -> None:
    first, second = webapp_konto(tmp_path / "a.db"), webapp_konto(tmp_path / "b.db")
    seed_lite(first)
    seed_lite(second)
    for path in (first, second):
        async with konto_on("sqlite", path) as konto:
            report = await reconcile_lite(konto, pool, dry_run=False)
        assert report.removed == {1: 4, 2: 1}
        assert ids_lite(path) == EVERY - TWINS
    assert {r[0] for r in await records(pool)} == {
        f"sqlite:{first.resolve()}",
        f"sqlite:{second.resolve()}",
    }


async def test_a_run_that_stopped_midway_is_settled(tmp_path: Path, pool: asyncpg.Pool) -> None:
    """Pending records as a kontod that died mid-run leaves them: powens_101's before the delete
    (its twin 2 still there), powens_102's after it (its twin 5 gone)."""
    path = webapp_konto(tmp_path / "konto.db")
    seed_lite(path)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM transactions WHERE id = 5")
    conn.close()
    where = f"sqlite:{path.resolve()}"
    await pool.executemany(
        "INSERT INTO kontod_reconciled (konto_location, bank_account_id, tx_hash, twin_id, state)"
        " VALUES ($1, 1, $2, $3, 'pending')",
        [(where, "powens_101", 2), (where, "powens_102", 5)],
    )
    async with konto_on("sqlite", path) as konto:
        # powens_102 does not pair again: powens_103 takes 6, and 7 stays.
        dry = await reconcile_lite(konto, pool, dry_run=True)
        assert (dry.found, dry.removed) == ({1: 3, 2: 1}, {})
        assert [r[4] for r in await records(pool)] == ["pending", "pending"]
        done = await reconcile_lite(konto, pool, dry_run=False)
        assert done.removed == {1: 3, 2: 1}
        assert ids_lite(path) == EVERY - TWINS
        assert [(r[2], r[3], r[4]) for r in await records(pool)] == [
            ("powens_101", 2, "done"),
            ("powens_102", 5, "done"),
            ("powens_103", 6, "done"),
            ("powens_104", 9, "done"),
            ("powens_f_0123456789abcdef0123", 16, "done"),
        ]
        again = await reconcile_lite(konto, pool, dry_run=False)
        assert again.found == {}


async def test_the_command_on_a_sqlite_konto(tmp_path: Path, dsn: str) -> None:
    path = webapp_konto(tmp_path / "konto.db")
    seed_lite(path)
    env = {"KONTOD_KONTO_URL": f"file:{path}", "KONTOD_DATABASE_URL": dsn}
    code, out, err = await kontod("reconcile", "transactions", "--dry-run", env=env)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["ACCOUNT", "FOUND", "REMOVED"]
    assert lines[1].split() == ["1", "4", "0"] and lines[2].split() == ["2", "1", "0"]
    assert lines[3] == (
        "5 duplicate transaction(s) in 2 account(s); would remove 5 (dry run: nothing changed)"
    )
    assert ids_lite(path) == EVERY
    code, out, err = await kontod("reconcile", "transactions", "--json", env=env)
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "dry_run": False,
        "accounts": [
            {"bank_account_id": 1, "found": 4, "removed": 4},
            {"bank_account_id": 2, "found": 1, "removed": 1},
        ],
        "found": 5,
        "removed": 5,
    }
    assert ids_lite(path) == EVERY - TWINS
    code, out, err = await kontod("reconcile", "transactions", env=env)
    assert (code, err) == (0, "")
    assert out == "0 duplicate transaction(s) in 0 account(s); removed 0\n"
    assert ids_lite(path) == EVERY - TWINS


async def test_the_command_on_konto_in_postgresql(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(WEBAPP_SCHEMA)
        await conn.execute("INSERT INTO users (id, email) VALUES (1, 'u1@example.org')")
        await conn.execute(
            "INSERT INTO bank_accounts (id, user_id, name) VALUES (1, 1, 'a'), (2, 1, 'b')"
        )
        await conn.executemany(
            "INSERT INTO transactions (id, bank_account_id, date, amount, label, tx_hash)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [(i, *row) for i, row in enumerate(ROWS, 1)],
        )
        env = {"KONTOD_DATABASE_URL": empty_dsn}
        code, out, err = await kontod("reconcile", "transactions", "--dry-run", env=env)
        assert (code, err) == (0, "")
        assert out.splitlines()[-1].startswith("5 duplicate transaction(s) in 2 account(s)")
        remaining = {r["id"] for r in await conn.fetch("SELECT id FROM transactions")}
        assert remaining == EVERY
        assert await conn.fetchval("SELECT count(*) FROM kontod_reconciled") == 0
        code, out, err = await kontod("reconcile", "transactions", env=env)
        assert (code, err) == (0, "")
        assert out.splitlines()[-1] == "5 duplicate transaction(s) in 2 account(s); removed 5"
        remaining = {r["id"] for r in await conn.fetch("SELECT id FROM transactions")}
        assert remaining == EVERY - TWINS
        recorded = await conn.fetch(
            "SELECT konto_location, twin_id, state FROM kontod_reconciled ORDER BY twin_id"
        )
        assert [tuple(r) for r in recorded] == [
            ("postgresql", twin, "done") for twin in sorted(TWINS)
        ]
        # The third BOULANGERIE (id 7) is genuine: a second run leaves it.
        code, out, err = await kontod("reconcile", "transactions", env=env)
        assert (code, err) == (0, "")
        assert out == "0 duplicate transaction(s) in 0 account(s); removed 0\n"
        remaining = {r["id"] for r in await conn.fetch("SELECT id FROM transactions")}
        assert remaining == EVERY - TWINS
    finally:
        await conn.close()
