"""A run's writes to Konto's SQLite-family database, fenced on both sides.

Each write transaction to Konto's database is made inside a PostgreSQL transaction that holds
the run's claim (``RunContext.check_claim``: the run row stays locked against a takeover until
it ends), and checks the job's ``kontod_fence`` token inside the SQLite transaction itself
(kontod/konto/store.py). So a run that lost its claim is stopped by PostgreSQL before it
writes; and should it have been frozen past its lease and taken over, its late transaction
finds the newer run's token (raised when that run started, before it read anything) and writes
nothing. Either way the run ends with ``ClaimLost``. The token is what makes the promise hold:
the PostgreSQL guard only stops a run early, and keeps the reaper waiting while a write is
under way, for as long as the server keeps the guard (see ``_guarded``).

One case SQLite itself imposes: a process frozen *inside* a write transaction on a local file
keeps the file's write lock until it dies or resumes. The takeover's first step (raising the
fence) waits for that lock, so the frozen transaction, should it resume, commits before the
takeover's and is overwritten by it; meanwhile every other writer of the file waits too. The
docs/high-availability.md says what an operator does then.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg
import structlog
from asyncpg.transaction import Transaction

from kontod.konto.store import Fence, Fenced, KontoSql, Result, Statement
from kontod.scheduler.contract import ClaimLost, RunContext

log = structlog.get_logger("kontod.konto.fenced")
T = TypeVar("T")


class FencedWriter:
    """The write side of one run on Konto's database: made by ``start`` when the run starts."""

    def __init__(self, db: KontoSql, pool: asyncpg.Pool, ctx: RunContext) -> None:
        self.db = db
        self.pool = pool
        self.ctx = ctx
        self.fence = Fence(ctx.job, ctx.run_id)

    @classmethod
    async def start(cls, db: KontoSql, pool: asyncpg.Pool, ctx: RunContext) -> FencedWriter:
        """Raise the job's fence to this run before it reads anything, so that a transaction
        of an older run, should one come late, fails its check, and anything it wrote before
        is seen by this run's reads and written over."""
        writer = cls(db, pool, ctx)
        await writer._guarded(lambda: db.advance_fence(writer.fence))
        return writer

    async def write(self, steps: Sequence[Statement]) -> list[Result]:
        """``steps`` in one Konto transaction, under the run's claim; ``ClaimLost`` when the
        run no longer holds it (nothing written)."""
        return await self._guarded(lambda: self.db.write(steps, self.fence))

    async def _guarded(self, konto_write: Callable[[], Awaitable[T]]) -> T:
        """Check the claim in a PostgreSQL transaction, make the Konto write inside it, then
        end it.

        The guard may end before the Konto write does: the claim check gives it an idle limit
        of a third of the lease (``runs.fence``), and a write that waits longer for the web
        app's lock (up to ``KONTOD_KONTO_BUSY_TIMEOUT``) leaves it idle that long, so the
        server ends the session. The Konto write then stands: it was fenced inside its own
        transaction, and the run's next claim check finds whether the run still holds its
        lease. A transient lock thus delays the run and never fails it."""
        async with self.pool.acquire() as conn:
            guard = conn.transaction()
            await guard.start()
            try:
                await self.ctx.check_claim(conn)
                try:
                    return await konto_write()
                except Fenced as exc:
                    raise ClaimLost(str(exc)) from exc
            finally:
                await _end(guard)


async def _end(guard: Transaction) -> None:
    """Roll the guard back (it wrote nothing); a session the server ended meanwhile ended it."""
    try:
        await guard.rollback()
    except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError) as exc:
        log.info("konto.guard_ended", error=type(exc).__name__)
