"""Where Konto's own tables are, when they are not in kontod's PostgreSQL: a SQLite file the web
app writes, or a libSQL server (Turso, or a self-hosted ``sqld``).

kontod's bookkeeping (runs, leases, pauses, rates, its per-connection records) always lives in
PostgreSQL. Konto's tables may live there too (one database for both), or in the web app's
libSQL/SQLite database. This module names that second kind of place and the one interface both
engines give the jobs (``KontoSql``): reads, and short write transactions that check the run's
fence first.

Fencing across two stores. A run's claim and lease live in PostgreSQL, its writes go to SQLite,
so no lock of one can stop a write to the other. Konto's database therefore holds one
``kontod_fence`` row per job: the token (the run's id, which only grows) of the run allowed to
write. A run raises it once when it starts writing (``advance_fence``: a newer token already
there means a newer run took over, and this one stops); every write transaction reads it first,
inside the same SQLite transaction, and writes nothing unless it is still its own. A takeover
raises it before its first write, so the late transaction of a frozen run fails its check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from kontod.config import KontoLocation

# A value SQLite stores: what kontod binds and what a read returns.
Value = int | float | str | bytes | None
Row = tuple[Value, ...]

Engine = Literal["sqlite", "libsql"]

FENCE_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS kontod_fence (
    job TEXT PRIMARY KEY,
    token INTEGER NOT NULL,
    taken_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)"""
# Raises the job's token to the run's own; never lowers it (an older run cannot undo a takeover).
RAISE_FENCE_SQL = """
INSERT INTO kontod_fence (job, token) VALUES (?, ?)
ON CONFLICT (job) DO UPDATE
   SET token = excluded.token, taken_at = excluded.taken_at
 WHERE excluded.token > kontod_fence.token"""
READ_FENCE_SQL = "SELECT token FROM kontod_fence WHERE job = ?"


class KontoError(Exception):
    """Konto's database refused or failed a statement; the message says which and why."""


class KontoUnavailable(KontoError):
    """Konto's database cannot be reached or opened (a missing file, a server that does not
    answer, a wrong token); the message names the place, never a secret."""


class KontoBusy(KontoError):
    """Another writer held Konto's database for longer than kontod waits (the busy timeout)."""


class Fenced(KontoError):
    """A newer run took this job over: the write was not made. The job turns it into a lost
    claim (``kontod.scheduler.contract.ClaimLost``)."""


@dataclass(frozen=True)
class Statement:
    """One SQL statement and its parameters (``?`` placeholders)."""

    sql: str
    params: Sequence[Value] = ()


@dataclass(frozen=True)
class Result:
    """What a statement of a write transaction gave: its rows (RETURNING) and rows changed."""

    rows: list[Row]
    changes: int


@dataclass(frozen=True)
class Fence:
    """The run a write belongs to: ``job``'s fence must hold ``token``."""

    job: str
    token: int


class KontoSql(Protocol):
    """Konto's tables in a SQLite-family database, whichever engine serves them."""

    @property
    def engine(self) -> Engine: ...

    @property
    def location(self) -> KontoLocation: ...

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        """The rows of one query, read outside any write transaction."""
        ...

    async def write(self, steps: Sequence[Statement], fence: Fence | None) -> list[Result]:
        """Run ``steps`` in one write transaction, all or nothing. With a fence, the job's
        token is read first inside the transaction, and a token other than the fence's raises
        ``Fenced`` with nothing written. A writer holding the database is waited for, and the
        transaction retried, up to the busy timeout (then ``KontoBusy``)."""
        ...

    async def advance_fence(self, fence: Fence) -> None:
        """Raise the job's token to the fence's; ``Fenced`` when a newer run holds it."""
        ...

    async def close(self) -> None: ...


def fence_steps(fence: Fence) -> list[Statement]:
    """The statements of ``advance_fence``: raise the token, then read what it is now."""
    return [
        Statement(RAISE_FENCE_SQL, (fence.job, fence.token)),
        Statement(READ_FENCE_SQL, (fence.job,)),
    ]


def check_fence(fence: Fence, rows: list[Row]) -> None:
    """Raise ``Fenced`` unless ``rows`` (the fence read) hold the fence's own token."""
    held = rows[0][0] if rows else None
    if held != fence.token:
        held = held if isinstance(held, int) else None
        raise Fenced(
            f"job {fence.job}: Konto's kontod_fence holds run {held}, not run {fence.token};"
            " a newer run took the job over"
        )
