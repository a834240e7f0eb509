"""Fixtures: a real PostgreSQL database per test, copied from a migrated template."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import aiohttp
import asyncpg
import pytest

from kontod.sandbox import Sandbox
from tests import pg
from tests.sandbox_helpers import Bank


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    with pg.server() as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def template_ready(admin_dsn: str) -> str:
    await pg.build_template(admin_dsn)
    return pg.TEMPLATE


@pytest.fixture
async def dsn(admin_dsn: str, template_ready: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    name = await pg.create_database(admin_dsn, template=template_ready)
    try:
        yield pg.with_database(admin_dsn, name)
    finally:
        await pg.drop_database(admin_dsn, name)


@pytest.fixture
async def empty_dsn(admin_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no migration applied."""
    name = await pg.create_database(admin_dsn, template="template0")
    try:
        yield pg.with_database(admin_dsn, name)
    finally:
        await pg.drop_database(admin_dsn, name)


@asynccontextmanager
async def _pool_on(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(dsn, min_size=1, max_size=10)
    assert p is not None
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with _pool_on(dsn) as p:
        yield p


@pytest.fixture
async def empty_pool(empty_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database with no migration applied (``empty_dsn``)."""
    async with _pool_on(empty_dsn) as p:
        yield p


@pytest.fixture
async def bank() -> AsyncIterator[Bank]:
    """The sandbox bank on loopback, with its counters and fault injection."""
    sandbox = Sandbox()
    async with sandbox.serve() as url:
        yield Bank(sandbox, url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
