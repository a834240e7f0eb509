"""The real PostgreSQL behind the suite: embedded through pgserver, or KONTOD_TEST_DATABASE_URL."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from kontod import db

TEMPLATE = "kontod_test_template"


def with_database(dsn: str, name: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@contextmanager
def server() -> Iterator[str]:
    """The admin DSN of a PostgreSQL server for the whole session."""
    url = os.environ.get("KONTOD_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pgserver.postgres_server as pgserver

    folder = tempfile.mkdtemp(prefix="kontod-test-pg-")
    srv: Any = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        yield str(srv.get_uri())
    finally:
        srv.cleanup()


async def build_template(admin_dsn: str) -> None:
    """A database with every migration applied, copied for each test."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        await conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(with_database(admin_dsn, TEMPLATE))
    try:
        await db.migrate(conn)
    finally:
        await conn.close()


async def create_database(
    admin_dsn: str, *, template: str | None = TEMPLATE, prefix: str = "kontod_test"
) -> str:
    """A new database (a copy of ``template`` when given); return its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    conn = await asyncpg.connect(admin_dsn)
    try:
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
