"""PostgreSQL: the connection pool, the embedded server, and the migrations shipped in the package."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import platform
import re
import shlex
import sys
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

# One connection, taken from a pool or not; and anything that runs a statement.
Connection = asyncpg.Connection | PoolConnectionProxy
Executor = asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy

log = structlog.get_logger("kontod.db")


class _Database(Protocol):
    @property
    def url(self) -> str | None: ...
    @property
    def embedded(self) -> bool: ...
    @property
    def state_dir(self) -> Path: ...


class _Runner(Protocol):
    @property
    def instance(self) -> str: ...


class _Snapshots(Protocol):
    @property
    def workers(self) -> int: ...


class DatabaseSettings(Protocol):
    """What opening the database reads of kontod's settings (``kontod.config.Settings`` has
    it); a protocol, so that this bottom layer imports nothing above it."""

    @property
    def database(self) -> _Database: ...
    @property
    def runner(self) -> _Runner: ...
    @property
    def snapshots(self) -> _Snapshots: ...


# Any fixed 64-bit number works; this one spells "kontod" in ASCII.
MIGRATION_LOCK = 0x6B6F6E746F64


class EmbeddedUnavailable(Exception):
    """The embedded PostgreSQL cannot run here; the message says what to do instead."""


class NoDatabase(Exception):
    """No database URL is set and no embedded database may be created; the message says which
    setting to give."""


def new_instance_name() -> str:
    """A name for this process's database sessions, unique per start (kontod-<12 hex>)."""
    return f"kontod-{uuid.uuid4().hex[:12]}"


CONNECT_TIMEOUT_S = 10.0
POOL_SIZE = 10
# Connections a process needs beside the snapshot workers: the refresh job's writes, the
# leases, housekeeping and outcomes of the runs, the board's reads and /health.
POOL_HEADROOM = 9
POOL_CLOSE_S = 2.0


def pool_size(workers: int) -> int:
    """The one pool size of kontod, daemon and commands alike: one connection per snapshot
    worker (each holds its own for the whole run) plus ``POOL_HEADROOM``."""
    return workers + POOL_HEADROOM


async def create_pool(
    dsn: str,
    instance: str,
    *,
    max_size: int = POOL_SIZE,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> asyncpg.Pool:
    """A pool whose sessions carry ``instance`` as their application_name.

    Nothing else is set on the session: liveness comes from leases, and the limits that guard
    a run's writes are set inside each write transaction (see runs.fence), so a pooler in
    transaction mode (PgBouncer) works. A connection attempt gives up after
    ``connect_timeout`` seconds.
    """
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_size,
        server_settings={"application_name": instance[:63]},
        command_timeout=None,
        timeout=connect_timeout,
    )
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool, within_s: float) -> None:
    """Close gracefully within ``within_s`` seconds, then drop whatever connection is left."""
    try:
        await asyncio.wait_for(pool.close(), timeout=within_s)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        pool.terminate()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The SQL files of ``kontod/migrations``, in order."""
    found: list[Migration] = []
    folder = importlib.resources.files("kontod") / "migrations"
    for entry in folder.iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(found, key=lambda mig: mig.version)


async def migrate(conn: asyncpg.Connection | PoolConnectionProxy) -> list[str]:
    """Apply the migrations not yet applied, all in one transaction; return their names.

    A transaction-level advisory lock makes processes that start together take turns (and,
    unlike a session lock, it works through a pooler in transaction mode).
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        # CREATE TABLE IF NOT EXISTS still needs the CREATE privilege; a role that only uses
        # an already migrated schema must be able to start.
        if await conn.fetchval("SELECT to_regclass('kontod_migrations')") is None:
            await conn.execute(
                """CREATE TABLE kontod_migrations (
                       version     integer PRIMARY KEY,
                       name        text NOT NULL,
                       applied_at  timestamptz NOT NULL DEFAULT now())"""
            )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM kontod_migrations")}
        applied: list[str] = []
        for mig in migrations():
            if mig.version in done:
                continue
            await conn.execute(mig.sql)
            await conn.execute(
                "INSERT INTO kontod_migrations (version, name) VALUES ($1, $2)",
                mig.version,
                mig.name,
            )
            applied.append(f"{mig.version:04d}_{mig.name}")
        return applied


class EmbeddedPostgres:
    """A private PostgreSQL in ``state_dir``, started through pgserver and stopped with kontod."""

    def __init__(self, state_dir: Path, *, create: bool = True) -> None:
        self.data_dir = state_dir / "pgdata"
        self.create = create
        self._server: Any = None
        self._starting: asyncio.Future[Any] | None = None

    def exists(self) -> bool:
        """Whether the data folder holds a database already (initdb has run there)."""
        return (self.data_dir / "PG_VERSION").is_file()

    async def start(self) -> str:
        """Start (or reuse) the server; return its DSN. Without ``create``, a folder that holds
        no database yet raises NoDatabase instead of getting a new, empty one."""
        if not self.create and not self.exists():
            raise NoDatabase(command_without_database(self.data_dir.parent))
        try:
            with warnings.catch_warnings():
                # pgserver warns, on import and start, when XDG_RUNTIME_DIR is unset; it then
                # uses /tmp, which is fine.
                warnings.simplefilter("ignore")
                import pgserver.postgres_server as pgserver
        except ImportError:
            raise EmbeddedUnavailable(
                "no KONTOD_DATABASE_URL is set and the embedded PostgreSQL is not installed: "
                + _embedded_hint()
            ) from None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # pgserver runs initdb and pg_ctl, which block: keep them off the event loop. A start
        # that is cancelled (a signal) goes on in its thread; stop() waits for it, then stops
        # the server, so that none is left behind.
        self._starting = asyncio.ensure_future(
            asyncio.to_thread(_start_pgserver, pgserver, self.data_dir)
        )
        self._server = await asyncio.shield(self._starting)
        uri: str = self._server.get_uri()
        return uri

    async def stop(self) -> None:
        if self._server is None and self._starting is not None:
            with contextlib.suppress(Exception):
                self._server = await self._starting
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.cleanup)


Check = Callable[[PoolConnectionProxy], Awaitable[object]]


def refusal(settings: DatabaseSettings, *, create: bool) -> str | None:
    """Why no database would be opened with ``settings``, or None when one would.

    Only a process allowed to ``create`` (``kontod run``, ``kontod demo``) may create an
    embedded database, and only with ``KONTOD_EMBEDDED=1``; any other opens an existing one.
    """
    if settings.database.url is not None:
        return None
    if create:
        return None if settings.database.embedded else run_without_url(settings.database.state_dir)
    if EmbeddedPostgres(settings.database.state_dir, create=False).exists():
        return None
    return command_without_database(settings.database.state_dir)


class Database:
    """The database of one kontod process: the external one or the embedded one, migrated, with
    the pool on it; made by ``open``.

    ``start`` brings it up (the daemon calls it, then ``close`` or ``abort``); ``async with``
    does both for a one-shot command and yields the pool.
    """

    def __init__(self, settings: DatabaseSettings, *, create: bool, check: Check | None) -> None:
        self.settings = settings
        self.create = create
        self.check = check
        self.embedded: EmbeddedPostgres | None = None
        self.pool: asyncpg.Pool | None = None

    async def start(self) -> asyncpg.Pool:
        """Start or reach the database, open the pool, migrate, then run ``check`` on the same
        connection. NoDatabase when there is none to open (see ``refusal``)."""
        s = self.settings
        why = refusal(s, create=self.create)
        if why is not None:
            raise NoDatabase(why)
        dsn = s.database.url
        if dsn is None:
            # Set before its start is awaited: a start that is cancelled (a signal) is still
            # stopped by close or abort.
            self.embedded = EmbeddedPostgres(s.database.state_dir, create=self.create)
            log.info("database.embedded", data_dir=str(self.embedded.data_dir))
            dsn = await self.embedded.start()
        self.pool = await create_pool(
            dsn, s.runner.instance, max_size=pool_size(s.snapshots.workers)
        )
        async with self.pool.acquire() as conn:
            applied = await migrate(conn)
            if self.check is not None:
                await self.check(conn)
        if applied:
            log.info("database.migrated", applied=applied)
        return self.pool

    async def close(self, within_s: float = POOL_CLOSE_S) -> None:
        """Close the pool within ``within_s`` seconds (then drop what is left), then stop the
        embedded server if there is one."""
        if self.pool is not None:
            await close_pool(self.pool, within_s)
        await self._stop_embedded()

    async def abort(self) -> None:
        """The quickest clean end: drop every connection, then stop the embedded server."""
        if self.pool is not None:
            self.pool.terminate()
        await self._stop_embedded()

    async def _stop_embedded(self) -> None:
        if self.embedded is not None:
            await self.embedded.stop()

    async def __aenter__(self) -> asyncpg.Pool:
        try:
            return await self.start()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def open(
    settings: DatabaseSettings, *, create: bool = False, check: Check | None = None
) -> Database:
    """The database of ``settings``, not yet started: the one ``KONTOD_DATABASE_URL`` names, or
    the embedded one in ``KONTOD_STATE_DIR``, which only a process allowed to ``create`` (the
    daemon, the demo) may create. ``check`` runs once migrated (the Konto schema, the key)."""
    return Database(settings, create=create, check=check)


EXAMPLE_URL = "postgresql://user:password@host:5432/dbname"


def run_without_url(state_dir: Path) -> str:
    """Why ``kontod run`` does not start without a database URL, and the two ways out."""
    return (
        "no KONTOD_DATABASE_URL is set: set it to the web app's PostgreSQL "
        f"({EXAMPLE_URL}), or set KONTOD_EMBEDDED=1 to run on kontod's own embedded "
        f"PostgreSQL in {state_dir / 'pgdata'}, which starts empty"
    )


def command_without_database(state_dir: Path) -> str:
    """Why a command other than ``run`` and ``demo`` opens no database here, and what to set."""
    demo = state_dir / "demo"
    hint = (
        "for the database of a `kontod demo`, the `export ...` line the demo prints "
        "(it sets KONTOD_STATE_DIR to the demo's folder and the sandboxes' URLs)"
    )
    if (demo / "pgdata" / "PG_VERSION").is_file():
        hint += f"; the demo's folder here: export KONTOD_STATE_DIR={shlex.quote(str(demo))}"
    return (
        f"no KONTOD_DATABASE_URL is set and {state_dir / 'pgdata'} holds no embedded database; "
        f"this command creates none. Set KONTOD_DATABASE_URL={EXAMPLE_URL}, or, {hint}"
    )


def _start_pgserver(module: Any, data_dir: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # see EmbeddedPostgres.start
        return module.get_server(str(data_dir), cleanup_mode="stop")


def _embedded_hint() -> str:
    machine = platform.machine().lower()
    supported = (
        sys.platform == "darwin" or (sys.platform == "linux" and machine == "x86_64")
    ) and ((3, 9) <= sys.version_info[:2] <= (3, 12))
    if supported:
        return "install it with `pip install 'kontod[embedded]'`, or set KONTOD_DATABASE_URL"
    return (
        f"pgserver has no build for {sys.platform}/{machine} with Python "
        f"{sys.version_info.major}.{sys.version_info.minor}; set KONTOD_DATABASE_URL to a "
        "PostgreSQL server (postgresql://user:password@host:5432/dbname)"
    )
