"""Konto's SQLite-family database on either engine, for tests that must hold on both: the
local file (``SqliteKonto``) and the same file behind the Hrana sandbox (``LibsqlKonto``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from kontod.demo.hrana_sandbox import HranaSandbox
from kontod.konto.libsql import LibsqlKonto
from kontod.konto.sqlite import open_sqlite
from kontod.konto.store import KontoSql

ENGINES = ("sqlite", "libsql")
# The sandbox's token in tests (a made-up one, not a secret).
SANDBOX_TOKEN = "sandbox-token-5f1c"


@asynccontextmanager
async def konto_on(engine: str, path: Path, busy_timeout: float = 5.0) -> AsyncIterator[KontoSql]:
    """Konto's existing SQLite file at ``path`` through ``engine`` (for ``libsql``: served by a
    Hrana sandbox on loopback, with a token), closed at the end."""
    if engine == "sqlite":
        db: KontoSql = open_sqlite(str(path), busy_timeout)
        try:
            yield db
        finally:
            await db.close()
        return
    async with HranaSandbox(path, SANDBOX_TOKEN).serve() as url:
        db = LibsqlKonto(url, SANDBOX_TOKEN, busy_timeout)
        try:
            yield db
        finally:
            await db.close()
