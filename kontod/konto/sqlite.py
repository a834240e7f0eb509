"""Konto's tables in a local SQLite file, the one the web app writes (``KontoSql`` for it).

The file belongs to the web app, and SQLite lets one writer in at a time, so kontod:
- opens the file read-write but never creates it (a missing file is an error, not a new empty
  Konto), and changes none of its persistent settings (journal mode, page size...): those are
  the web app's;
- turns ``foreign_keys`` on for its own connections (a per-connection setting, not stored in
  the file), so that a row it writes must point at rows that exist, as the web app declared;
- takes the write lock at the start of each transaction (``BEGIN IMMEDIATE``), so that two
  writers never both read and then both fail to upgrade, and holds it for one batch only;
- waits when another writer holds the file (SQLite's busy handler, ``ATTEMPT_WAIT`` a time)
  and then tries the whole transaction again, until ``busy_timeout`` has passed in all: a
  transient lock delays a run, never fails it.

The standard ``sqlite3`` module runs every call in a thread of its own (one per connection: a
writer and a reader), so the event loop never waits on the file, and SQLite releases the GIL
while it works.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import structlog

from kontod.config import KontoLocation
from kontod.konto.store import (
    Engine,
    Fence,
    KontoBusy,
    KontoError,
    KontoUnavailable,
    Result,
    Row,
    Statement,
    Value,
    check_fence,
    fence_steps,
)

log = structlog.get_logger("kontod.konto.sqlite")

# How long SQLite's own busy handler waits for the lock before kontod starts the transaction
# over (and logs that it waits).
ATTEMPT_WAIT_S = 1.0
# SQLite's primary result codes for "another connection holds the lock".
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

T = TypeVar("T")


def is_busy(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite saying another connection holds the database."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.OperationalError)
        and code is not None
        and code & 0xFF in (_BUSY_CODES)
    )


class SqliteKonto:
    """Konto's SQLite file, a writer and a reader connection, each on a thread of its own."""

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._writer = _open(path)
        self._reader = _open(path)
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="konto-sqlite-write")
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="konto-sqlite-read")

    @property
    def engine(self) -> Engine:
        return "sqlite"

    @property
    def location(self) -> KontoLocation:
        return KontoLocation("sqlite", str(self.path))

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        conn = self._reader

        def run() -> list[Row]:
            return [tuple(r) for r in conn.execute(sql, tuple(params)).fetchall()]

        return await self._patiently(self._read_thread, conn, run)

    async def write(self, steps: Sequence[Statement], fence: Fence | None) -> list[Result]:
        conn = self._writer
        return await self._patiently(
            self._write_thread, conn, lambda: _transaction(conn, steps, fence)
        )

    async def advance_fence(self, fence: Fence) -> None:
        results = await self.write(fence_steps(fence), None)
        check_fence(fence, results[-1].rows)

    async def close(self) -> None:
        for conn, thread in ((self._writer, self._write_thread), (self._reader, self._read_thread)):
            await asyncio.get_running_loop().run_in_executor(thread, conn.close)
            thread.shutdown(wait=True)

    async def _patiently(
        self, thread: ThreadPoolExecutor, conn: sqlite3.Connection, fn: Callable[[], T]
    ) -> T:
        """Run ``fn`` on the connection's thread, again while another connection holds the
        file, until ``busy_timeout`` has passed; SQLite's errors become ``KontoError``."""
        deadline = time.monotonic() + self.busy_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                return await _call(thread, conn, fn)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise KontoError(f"Konto's SQLite file {self.path}: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise KontoBusy(
                        f"Konto's SQLite file {self.path} stayed locked by another writer for"
                        f" more than {self.busy_timeout:g} s (busy timeout)"
                    ) from exc
                log.info("konto.busy", path=str(self.path), attempt=attempt)
                await asyncio.sleep(min(0.05 * attempt, 0.5))
            except sqlite3.DatabaseError as exc:
                raise KontoError(f"Konto's SQLite file {self.path}: {exc}") from exc


async def _call(thread: ThreadPoolExecutor, conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the connection's thread; a cancelled caller interrupts the statement, so
    that the transaction it was in rolls back instead of running on."""
    future = asyncio.get_running_loop().run_in_executor(thread, fn)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        conn.interrupt()
        # The thread ends its statement and rolls back; its outcome no longer matters.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


def _open(path: Path) -> sqlite3.Connection:
    """A connection to an existing file (``mode=rw``: never creates one), in autocommit mode
    (kontod begins its transactions itself), with foreign keys enforced."""
    if not path.is_file():
        raise KontoUnavailable(f"Konto's SQLite file {path} does not exist")
    try:
        conn = sqlite3.connect(
            f"file:{path}?mode=rw",
            uri=True,
            timeout=ATTEMPT_WAIT_S,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA foreign_keys = ON")
        # Reading one page proves it is a database, not some other file.
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    except sqlite3.DatabaseError as exc:
        raise KontoUnavailable(f"Konto's SQLite file {path} cannot be opened: {exc}") from exc
    return conn


def _transaction(
    conn: sqlite3.Connection, steps: Sequence[Statement], fence: Fence | None
) -> list[Result]:
    """One write transaction on the writer's thread: lock, check the fence, run, commit."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if fence is not None:
            rows = conn.execute(fence_steps(fence)[-1].sql, (fence.job,)).fetchall()
            check_fence(fence, [tuple(r) for r in rows])
        results = []
        for step in steps:
            # The rows a step changed, whatever its form: the cursor's rowcount stays -1 for a
            # statement that starts with WITH, the connection's running total does not.
            before = conn.total_changes
            rows = [tuple(r) for r in conn.execute(step.sql, tuple(step.params)).fetchall()]
            results.append(Result(rows, conn.total_changes - before))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


def open_sqlite(path: str, busy_timeout: float) -> SqliteKonto:
    """Open Konto's SQLite file at ``path`` (``KontoUnavailable`` when it is not one)."""
    return SqliteKonto(Path(path), busy_timeout)
