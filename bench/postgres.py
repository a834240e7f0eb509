"""The PostgreSQL the benchmarks run on: embedded through pgserver, or KONTOD_TEST_DATABASE_URL."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from kontod import db
from tests import pg

URL_VARIABLE = "KONTOD_TEST_DATABASE_URL"
# The same server and per-database helpers as the test suite's.
with_database = pg.with_database
drop_database = pg.drop_database


@contextmanager
def server() -> Iterator[tuple[str, str]]:
    """The admin DSN of a server for the whole run, and a line saying which server it is."""
    where = (
        f"{URL_VARIABLE} (databases kontod_bench_* are created and dropped)"
        if os.environ.get(URL_VARIABLE)
        else "embedded PostgreSQL (pgserver) in a temporary folder, deleted at the end"
    )
    if not os.environ.get(URL_VARIABLE):
        with warnings.catch_warnings():
            # pgserver warns on import when XDG_RUNTIME_DIR is unset, then picks /tmp: fine.
            warnings.simplefilter("ignore")
            import pgserver.postgres_server  # noqa: F401
    with pg.server() as admin_dsn:
        yield admin_dsn, where


async def create_database(admin_dsn: str, *, template: str | None = None) -> str:
    """A new database (a copy of ``template`` when given); return its name."""
    return await pg.create_database(admin_dsn, template=template, prefix="kontod_bench")


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
