"""Open Konto's database where the settings say it is: kontod's own PostgreSQL (nothing to open
here), a SQLite file, or a libSQL server; and make it ready the way every process of kontod
does before it uses it (``open_checked``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from kontod.config import KontoSettings
from kontod.konto import lite_schema, tokens
from kontod.konto.libsql import LibsqlKonto, open_libsql
from kontod.konto.sqlite import open_sqlite
from kontod.konto.store import KontoBusy, KontoError, KontoSql, KontoUnavailable


def open_konto(settings: KontoSettings) -> KontoSql | None:
    """Konto's SQLite-family database, or None when Konto's tables are in kontod's PostgreSQL.
    Raises ``KontoUnavailable`` naming the place when it cannot be opened."""
    location = settings.location
    if location is None or location.kind == "postgresql":
        return None
    busy = settings.busy_timeout.total_seconds()
    if location.kind == "sqlite":
        return open_sqlite(location.target, busy)
    # A libSQL server: nothing is sent yet; the daemon's first read (the schema check, or
    # ``LibsqlKonto.check``) finds an unreachable server or a refused token.
    return open_libsql(location.target, settings.auth_token, busy)


async def open_checked(settings: KontoSettings, key: bytes | None) -> KontoSql | None:
    """Konto's SQLite-family database made ready (None when Konto's tables are in kontod's
    PostgreSQL, which ``kontod.db``'s check covers): the two tables kontod adds created where
    absent, every table and column kontod uses checked, and the bank-token key, when one is
    set, tried on the stored tokens.

    Raises ``KontoUnavailable`` (no such file, a server that refuses, a file kontod may not
    write), ``KontoSchemaError`` or ``WrongKey``, each naming what is wrong and never a
    secret; the database is closed first.
    """
    db = open_konto(settings)
    if db is None:
        return None
    try:
        if isinstance(db, LibsqlKonto):
            await db.check()  # a server that is not one, or refuses the token, at once
        try:
            await lite_schema.create_missing(db)
        except (KontoBusy, KontoUnavailable):
            raise
        except KontoError as exc:
            # A read-only file or a token without write access: nothing kontod could run on.
            raise KontoUnavailable(f"kontod cannot write to Konto's database: {exc}") from exc
        await lite_schema.load(db)
        if key is not None:
            rows = await db.read(tokens.LITE_KEY_SAMPLE_SQL, (tokens.KEY_CHECK_SAMPLE,))
            tokens.check_key_rows([str(r[0]) for r in rows], key)
    except BaseException:
        await db.close()
        raise
    return db


@asynccontextmanager
async def opened(settings: KontoSettings, key: bytes | None) -> AsyncIterator[KontoSql | None]:
    """``open_checked`` for a one-shot command: closed when the command is done."""
    db = await open_checked(settings, key)
    try:
        yield db
    finally:
        if db is not None:
            await db.close()
