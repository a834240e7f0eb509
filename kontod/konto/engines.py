"""Open Konto's database where the settings say it is: kontod's own PostgreSQL (nothing to open
here), a SQLite file, or a libSQL server."""

from __future__ import annotations

from kontod.config import KontoSettings
from kontod.konto.libsql import open_libsql
from kontod.konto.sqlite import open_sqlite
from kontod.konto.store import KontoSql


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
