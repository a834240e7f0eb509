"""Fixtures: a real PostgreSQL database per test, copied from a migrated template."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import pytest

from kontod.demo.sandbox import Sandbox
from tests import pg
from tests.helpers import UNREACHABLE_DVF_URL
from tests.sandbox_helpers import Bank

# No test may reach the public DVF files: the kontod processes tests start read the
# environment, and settings_for (tests/daemon_harness.py) gives in-process daemons the same.
os.environ["KONTOD_DVF_URL"] = UNREACHABLE_DVF_URL

# How far the clock may be past the asked time when it is checked: the session's start and the
# start of its PostgreSQL come within this, a wrong zone or no fake clock are hours off.
CLOCK_SLACK = timedelta(minutes=5)


def asked_clock() -> datetime | None:
    """The time ``scripts/test-at-clock`` set the clocks to, if the suite runs under it."""
    asked = os.environ.get("KONTOD_TEST_CLOCK")
    return datetime.fromisoformat(asked) if asked else None


def check_clock(name: str, now: datetime) -> None:
    """Fail the session when ``now`` is not the time ``scripts/test-at-clock`` asked for."""
    asked = asked_clock()
    if asked is not None and not asked <= now <= asked + CLOCK_SLACK:
        pytest.exit(f"the clock of {name} is {now.isoformat()}, not {asked.isoformat()}", 2)


def pytest_report_header() -> str | None:
    asked = asked_clock()
    if asked is None:
        return None
    return f"clock: {datetime.now(asked.tzinfo).isoformat()} (asked {asked.isoformat()})"


def pytest_sessionstart() -> None:
    check_clock("pytest", datetime.now(UTC))


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    with pg.server() as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def template_ready(admin_dsn: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        check_clock("PostgreSQL", await conn.fetchval("SELECT now()"))
    finally:
        await conn.close()
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
