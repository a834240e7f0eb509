"""The benchmark's PostgreSQL and its cache of generated data sets, kept between runs.

Generating a million users with a month of snapshot history takes far longer than measuring
them, so each generated size is kept as a template database on a server that outlives the run:
an embedded PostgreSQL (pgserver) in ``$KONTOD_BENCH_STATE`` (default
``~/.cache/kontod-bench/pgdata``), stopped at the end of the run but never deleted, or the server
named by ``KONTOD_BENCH_DATABASE_URL``. A template's name carries a fingerprint of everything
that shaped it (the generation SQL, the history statement); the template also records a digest
of each migration it was built with. A migration added since is applied to each working copy;
a migration whose SQL changed since makes the size generated again instead of measuring stale
data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg

from kontod import db
from tests.pg import drop_database, with_database

# The repository: child processes run from here, so that ``bench`` and ``kontod`` import.
ROOT = Path(__file__).resolve().parent.parent
URL_VARIABLE = "KONTOD_BENCH_DATABASE_URL"
STATE_VARIABLE = "KONTOD_BENCH_STATE"
TEMPLATE_PREFIX = "kontod_bench_tpl"
COPY_PREFIX = "kontod_bench_run"

__all__ = ["drop_database", "with_database"]


def state_dir() -> Path:
    """Where the embedded benchmark server keeps its data between runs."""
    configured = os.environ.get(STATE_VARIABLE)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "kontod-bench"


@contextmanager
def server() -> Iterator[tuple[str, str]]:
    """The admin DSN of the benchmark server, and a line saying which server it is."""
    url = os.environ.get(URL_VARIABLE)
    if url:
        yield url, f"{URL_VARIABLE} (templates {TEMPLATE_PREFIX}_* are kept there)"
        return
    with warnings.catch_warnings():
        # pgserver warns when XDG_RUNTIME_DIR is unset, then picks /tmp: fine.
        warnings.simplefilter("ignore")
        import pgserver.postgres_server as pgserver

        folder = state_dir() / "pgdata"
        folder.parent.mkdir(parents=True, exist_ok=True)
        srv: Any = pgserver.get_server(str(folder), cleanup_mode="stop")
    try:
        yield str(srv.get_uri()), f"embedded PostgreSQL (pgserver) in {folder}, kept between runs"
    finally:
        srv.cleanup()


def free_bytes() -> int | None:
    """Free space where the embedded server keeps its data; None on an external server."""
    if os.environ.get(URL_VARIABLE):
        return None
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


def fingerprint(parts: Iterable[str]) -> str:
    """A short digest of the texts that shape a data set."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:10]


def migration_digests() -> dict[int, str]:
    """kontod's migrations as they are now: version to a digest of the SQL."""
    return {m.version: hashlib.sha256(m.sql.encode()).hexdigest()[:16] for m in db.migrations()}


def template_name(users: int, history_days: int, print_: str) -> str:
    return f"{TEMPLATE_PREFIX}_u{users}_h{history_days}_{print_}"


async def database_exists(admin_dsn: str, name: str) -> bool:
    conn = await asyncpg.connect(admin_dsn)
    try:
        found = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await conn.close()
    return found is not None


async def stale_templates(admin_dsn: str, keep: set[str]) -> list[str]:
    """Templates of this benchmark whose fingerprint no longer matches anything measured."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", TEMPLATE_PREFIX + "%"
        )
    finally:
        await conn.close()
    return [r["datname"] for r in rows if r["datname"] not in keep]


async def create_database(admin_dsn: str, name: str, *, template: str | None = None) -> None:
    """``CREATE DATABASE``, copying ``template`` file by file when the server can (15 and later).

    The default strategy of PostgreSQL 15 copies a template through the WAL, block by block,
    which for a data set of several gigabytes costs minutes; FILE_COPY costs one checkpoint.
    """
    conn = await asyncpg.connect(admin_dsn)
    try:
        clause = ""
        if template is not None:
            version = int(await conn.fetchval("SHOW server_version_num"))
            strategy = " STRATEGY = FILE_COPY" if version >= 150000 else ""
            clause = f' TEMPLATE "{template}"{strategy}'
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()


@asynccontextmanager
async def working_copy(admin_dsn: str, template: str) -> Any:
    """A copy of ``template`` for one run, dropped at the end; yields its DSN."""
    name = f"{COPY_PREFIX}_{uuid.uuid4().hex[:10]}"
    await create_database(admin_dsn, name, template=template)
    try:
        yield with_database(admin_dsn, name)
    finally:
        await drop_database(admin_dsn, name)
