"""The PostgreSQL the benchmarks run on: embedded through pgserver, or KONTOD_TEST_DATABASE_URL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from kontod import db

URL_VARIABLE = "KONTOD_TEST_DATABASE_URL"


def with_database(dsn: str, name: str) -> str:
    """The same server DSN pointing at another database."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


@contextmanager
def server() -> Iterator[tuple[str, str]]:
    """The admin DSN of a server for the whole run, and a line saying which server it is."""
    url = os.environ.get(URL_VARIABLE)
    if url:
        yield url, f"{URL_VARIABLE} (databases kontod_bench_* are created and dropped)"
        return
    folder = tempfile.mkdtemp(prefix="kontod-bench-pg-")
    with warnings.catch_warnings():
        # pgserver warns when XDG_RUNTIME_DIR is unset and then picks /tmp, which is fine.
        warnings.simplefilter("ignore")
        import pgserver.postgres_server as pgserver

        srv: Any = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        yield str(srv.get_uri()), f"embedded PostgreSQL (pgserver) in {folder}, deleted at the end"
    finally:
        srv.cleanup()


async def create_database(admin_dsn: str, *, template: str | None = None) -> str:
    """A new database (a copy of ``template`` when given); return its name."""
    name = f"kontod_bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        copy = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
    finally:
        await conn.close()
    return name


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        for _ in range(50):
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except asyncpg.ObjectInUseError:
                await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def settle(conn: asyncpg.Connection | PoolConnectionProxy) -> None:
    """Write out the dirty pages left by what came before, so a timed pass does not pay for them.

    Needs a superuser (or pg_checkpoint) on an external server; without it nothing is done.
    """
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


@asynccontextmanager
async def migrated_database(admin_dsn: str) -> AsyncIterator[str]:
    """A new database with kontod's migrations applied, dropped on exit; yields its name."""
    name = await create_database(admin_dsn)
    try:
        conn = await asyncpg.connect(with_database(admin_dsn, name))
        try:
            await db.migrate(conn)
        finally:
            await conn.close()
        yield name
    finally:
        await drop_database(admin_dsn, name)


@asynccontextmanager
async def copy_of(admin_dsn: str, template: str) -> AsyncIterator[str]:
    """A copy of database ``template`` (which must have no session open), dropped on exit."""
    name = await create_database(admin_dsn, template=template)
    try:
        yield name
    finally:
        await drop_database(admin_dsn, name)
