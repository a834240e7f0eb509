"""A run's writes to Konto's SQLite-family database, fenced on both sides.

Each write transaction to Konto's database is made inside a PostgreSQL transaction that holds
the run's claim (``RunContext.check_claim``: the run row stays locked against a takeover until
it ends), and checks the job's ``kontod_fence`` token inside the SQLite transaction itself
(kontod/konto/store.py). So a run that lost its claim is stopped by PostgreSQL before it
writes; and should it have been frozen past its lease and taken over, its late transaction
finds the newer run's token (raised when that run started, before it read anything) and writes
nothing. Either way the run ends with ``ClaimLost``.

One case SQLite itself imposes: a process frozen *inside* a write transaction on a local file
keeps the file's write lock until it dies or resumes. The takeover's first step (raising the
fence) waits for that lock, so the frozen transaction, should it resume, commits before the
takeover's and is overwritten by it; meanwhile every other writer of the file waits too. The
README's high-availability section says what an operator does then.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from kontod.konto.store import Fence, Fenced, KontoSql, Result, Statement
from kontod.scheduler.contract import ClaimLost, RunContext


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
        async with pool.acquire() as conn, conn.transaction():
            await ctx.check_claim(conn)
            try:
                await db.advance_fence(writer.fence)
            except Fenced as exc:
                raise ClaimLost(str(exc)) from exc
        return writer

    async def write(self, steps: Sequence[Statement]) -> list[Result]:
        """``steps`` in one Konto transaction, under the run's claim; ``ClaimLost`` when the
        run no longer holds it (nothing written)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self.ctx.check_claim(conn)
            try:
                return await self.db.write(steps, self.fence)
            except Fenced as exc:
                raise ClaimLost(str(exc)) from exc
