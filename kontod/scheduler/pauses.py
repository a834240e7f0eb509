"""Pausing jobs: the SQL of ``kontod_pauses`` and a short-lived cache of it.

A pause is stored in the database, so every replica obeys it: the runner reads it at each
tick, and health, metrics and the status page read a cache the board re-reads every
``CACHE_S`` seconds. A pause with ``until`` ends by itself once that instant has passed;
nothing has to clear it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from kontod.db import Executor

CACHE_S = 2.0
# A pause ends before this: later instants cannot be shown in every zone (Python stops at
# year 9999), and a pause meant to last for ever has no until.
LATEST_UNTIL = datetime(9000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Pause:
    """A pause in force: why, who asked, since when and until when (None: until resumed)."""

    job: str
    reason: str
    by: str
    since: datetime
    until: datetime | None


@dataclass(frozen=True)
class PauseState:
    """What the table says about one job: the pause in force, and when the last one ended."""

    pause: Pause | None = None
    last_ended_at: datetime | None = None


class AlreadyPaused(Exception):
    """The job has a pause in force; resume it first (the message says who paused it)."""


def shown_time(column: str) -> str:
    """``column`` clamped to what Python can hold and show in any zone: a row written by hand
    (until 'infinity', year 12000) is read, not a reason for every read to fail."""
    # least() and greatest() skip NULLs: without the CASE a NULL would become a date.
    return (
        f"CASE WHEN {column} IS NOT NULL THEN"
        f" least(greatest({column}, '0002-01-01 00:00+00'), '9999-12-30 00:00+00') END"
    )


# The pause in force per job ($1 = now), and the end of the most recent pause that is over.
STATE_SQL = f"""
SELECT j.name AS job, p.reason, p.paused_by, {shown_time("p.paused_at")} AS paused_at,
       {shown_time("p.until")} AS until, {shown_time("ended.at")} AS last_ended_at
  FROM unnest($2::text[]) AS j(name)
  LEFT JOIN kontod_pauses p
         ON p.job = j.name AND p.resumed_at IS NULL AND (p.until IS NULL OR p.until > $1)
  LEFT JOIN LATERAL (
       SELECT max(coalesce(resumed_at, until)) AS at FROM kontod_pauses q
        WHERE q.job = j.name AND coalesce(q.resumed_at, q.until) <= $1) ended ON true
"""


async def states(db: Executor, jobs: Iterable[str], now: datetime) -> dict[str, PauseState]:
    """Per job, the pause in force at ``now`` and the end of the last one, in one statement."""
    rows = await db.fetch(STATE_SQL, now, list(jobs))
    out: dict[str, PauseState] = {}
    for r in rows:
        pause = None
        if r["reason"] is not None:
            pause = Pause(r["job"], r["reason"], r["paused_by"], r["paused_at"], r["until"])
        out[r["job"]] = PauseState(pause, r["last_ended_at"])
    return out


async def current(db: Executor, job: str, now: datetime) -> Pause | None:
    """The pause of ``job`` in force at ``now``, if any."""
    return (await states(db, [job], now)).get(job, PauseState()).pause


async def pause(
    db: Executor, job: str, reason: str, by: str, now: datetime, until: datetime | None = None
) -> Pause:
    """Pause ``job``; raises AlreadyPaused when a pause is in force, ValueError on bad input."""
    if not reason.strip():
        raise ValueError("a pause needs a reason (what is going on, for whoever looks next)")
    if until is not None and until <= now:
        raise ValueError(f"until must be in the future, not {until.isoformat()}")
    if until is not None and until >= LATEST_UNTIL:
        raise ValueError(
            f"until must be before {LATEST_UNTIL.date().isoformat()}; leave it out to pause"
            " until resumed"
        )
    # A pause whose `until` has passed is closed first, so that it does not block the new one.
    await db.execute(
        """UPDATE kontod_pauses SET resumed_at = until, resumed_by = 'until'
            WHERE job = $1 AND resumed_at IS NULL AND until <= $2""",
        job,
        now,
    )
    row = await db.fetchrow(
        """INSERT INTO kontod_pauses (job, reason, paused_by, paused_at, until)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT DO NOTHING
           RETURNING job, reason, paused_by, paused_at, until""",
        job,
        reason.strip(),
        by,
        now,
        until,
    )
    if row is None:
        held = await current(db, job, now)
        who = f" by {held.by} since {held.since.isoformat()}: {held.reason}" if held else ""
        raise AlreadyPaused(f"{job} is already paused{who}")
    return Pause(row["job"], row["reason"], row["paused_by"], row["paused_at"], row["until"])


async def resume(db: Executor, job: str, by: str, now: datetime) -> Pause | None:
    """End the pause of ``job`` in force at ``now``; None when it was not paused."""
    row = await db.fetchrow(
        """UPDATE kontod_pauses SET resumed_at = $3, resumed_by = $2
            WHERE job = $1 AND resumed_at IS NULL AND (until IS NULL OR until > $3)
        RETURNING job, reason, paused_by, paused_at, until""",
        job,
        by,
        now,
    )
    if row is None:
        return None
    return Pause(row["job"], row["reason"], row["paused_by"], row["paused_at"], row["until"])


class PauseCache:
    """The pause state of every job as last read from the database.

    One owner (the board) calls ``refresh``; requests only read ``states``. A pause or resume
    made by this process is put in at once, before the next read confirms it.
    """

    def __init__(self, pool: asyncpg.Pool, jobs: Iterable[str]) -> None:
        self.pool = pool
        self.jobs = list(jobs)
        self.states: dict[str, PauseState] = {}

    async def refresh(self, now: datetime) -> Mapping[str, PauseState]:
        self.states = await states(self.pool, self.jobs, now)
        return self.states

    def put(self, job: str, pause: Pause | None, now: datetime) -> None:
        """What this process just wrote: ``pause`` in force, or None (resumed at ``now``)."""
        before = self.states.get(job, PauseState())
        ended = before.last_ended_at if pause is not None else now
        self.states = {**self.states, job: PauseState(pause, ended)}

    def pause_of(self, job: str, now: datetime) -> Pause | None:
        """The cached pause of ``job``, unless its ``until`` has passed since it was read."""
        held = self.states.get(job, PauseState()).pause
        if held is not None and held.until is not None and held.until <= now:
            return None
        return held
