"""The run table: claiming attempts, leases, fencing, recording outcomes, reading history back.

Every function takes a connection (or pool) and issues one statement. Every change of a run's
state is a compare-and-set whose row count the caller checks: a run moves out of ``running``
once, by its owner (``finish``) or by whoever finds its lease expired (``reap_expired``).
Times that decide a lease are the database's (``now()``), never a replica's clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kontod.db import Executor
from kontod.scheduler.contract import SkipReason


@dataclass(frozen=True)
class JobStats:
    """What the run table says about one job; every field survives a restart."""

    registered_at: datetime | None = None
    runs: int = 0
    errors: int = 0
    last_started_at: datetime | None = None
    last_status: str | None = None
    last_finished_at: datetime | None = None
    last_finished_status: str | None = None
    last_error: str | None = None
    last_duration_s: float | None = None
    last_counts: Mapping[str, int] = field(default_factory=dict)
    last_success_at: datetime | None = None
    running_since: datetime | None = None
    running_instance: str | None = None
    # The newest scheduled tick that has a run (not interrupted): decides lateness without
    # comparing kontod's clock with the database's.
    last_tick_run: datetime | None = None
    # The newest attempt at the newest scheduled tick: what decides a retry.
    latest_attempt: TickState | None = None


@dataclass(frozen=True)
class TickState:
    """The newest attempt at one scheduled tick."""

    tick: datetime
    attempt: int
    status: str
    finished_at: datetime | None


@dataclass(frozen=True)
class RunRecord:
    id: int
    job: str
    trigger: str
    scheduled_for: datetime | None
    attempt: int
    started_at: datetime
    finished_at: datetime | None
    status: str
    error: str | None
    counts: Mapping[str, int]
    instance: str


@dataclass(frozen=True)
class Reaped:
    """A run marked ``interrupted`` because its lease expired."""

    id: int
    job: str
    instance: str
    heartbeat_at: datetime


async def register_jobs(db: Executor, names: Iterable[str]) -> None:
    """Remember when each job was first seen, which is when it starts to be expected."""
    await db.execute(
        "INSERT INTO kontod_jobs (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        list(names),
    )


async def claim(
    db: Executor,
    job: str,
    trigger: str,
    scheduled_for: datetime | None,
    attempt: int,
    instance: str,
    lease_s: float,
) -> int | None:
    """Insert a running run holding a lease of ``lease_s``; None when someone else has it.

    It is refused when that attempt at the tick exists, when the job runs somewhere, or when
    the tick already has a success or a run going.
    """
    run_id: int | None = await db.fetchval(
        """INSERT INTO kontod_runs (job, trigger, scheduled_for, attempt, instance, lease_until)
           SELECT $1, $2, $3, $4, $5, now() + make_interval(secs => $6)
            WHERE $3::timestamptz IS NULL
               OR NOT EXISTS (SELECT 1 FROM kontod_runs
                               WHERE job = $1 AND scheduled_for = $3
                                 AND status IN ('running', 'success'))
           ON CONFLICT DO NOTHING
           RETURNING id""",
        job,
        trigger,
        scheduled_for,
        attempt,
        instance,
        lease_s,
    )
    return run_id


async def why_not_claimed(db: Executor, job: str, scheduled_for: datetime | None) -> SkipReason:
    """Why a claim of ``scheduled_for`` (None: a manual run) was refused.

    ``overlap`` when another run of the job goes on (a manual one, another tick's), else
    ``claimed``: another replica has this tick, running or ended.
    """
    running = await db.fetchrow(
        "SELECT scheduled_for FROM kontod_runs WHERE job = $1 AND status = 'running'", job
    )
    if running is None:
        return SkipReason.CLAIMED
    if scheduled_for is not None and running["scheduled_for"] == scheduled_for:
        return SkipReason.CLAIMED
    return SkipReason.OVERLAP


async def renew(db: Executor, run_ids: Iterable[int], instance: str, lease_s: float) -> set[int]:
    """Extend the leases of ``instance``'s runs that still hold one; return those renewed."""
    rows = await db.fetch(
        """UPDATE kontod_runs
              SET lease_until = now() + make_interval(secs => $3), heartbeat_at = now()
            WHERE id = ANY($1::bigint[]) AND status = 'running' AND instance = $2
              AND lease_until > now()
        RETURNING id""",
        list(run_ids),
        instance,
        lease_s,
    )
    return {r["id"] for r in rows}


async def fence(
    conn: Executor, run_id: int, instance: str, statement_ms: int, idle_ms: int
) -> bool:
    """Inside the caller's transaction: whether the run still holds its lease.

    The row is locked ``FOR KEY SHARE`` until the transaction ends. The reaper locks it
    ``FOR UPDATE``, which waits for that lock, so a write commits or rolls back before its run
    can be reaped: a write happens under a valid lease or not at all. Lease renewals are plain
    updates, which that lock lets through, so a long write does not starve its own lease. The
    transaction also gets server-side limits (local to it, so a pooler in transaction mode
    keeps them to it): a frozen client's statement and idle transaction are ended by the
    server, and release the lock.
    """
    held = await conn.fetchval(
        """SELECT set_config('statement_timeout', $3::text, true) IS NOT NULL
              AND set_config('idle_in_transaction_session_timeout', $4::text, true) IS NOT NULL
             FROM kontod_runs
            WHERE id = $1 AND status = 'running' AND instance = $2
              AND lease_until > clock_timestamp()
              FOR KEY SHARE""",
        run_id,
        instance,
        str(statement_ms),
        str(idle_ms),
    )
    return bool(held)


async def finish(
    db: Executor,
    run_id: int,
    instance: str,
    status: str,
    error: str | None,
    counts: Mapping[str, int],
) -> bool:
    """Record a run's end if it is still this instance's running run; False if it is not."""
    written: int = await db.fetchval(
        """WITH done AS (
               UPDATE kontod_runs
                  SET status = $3, error = $4, counts = $5::jsonb, finished_at = now()
                WHERE id = $1 AND instance = $2 AND status = 'running'
            RETURNING job, status),
           counted AS (
               UPDATE kontod_jobs j
                  SET runs = j.runs + 1, errors = j.errors + (d.status <> 'success')::int
                 FROM done d WHERE j.name = d.job)
           SELECT count(*) FROM done""",
        run_id,
        instance,
        status,
        error,
        json.dumps(dict(counts)),
    )
    return written == 1


async def reap_expired(db: Executor) -> list[Reaped]:
    """Mark ``interrupted`` every running run whose lease has expired, naming its owner."""
    rows = await db.fetch(
        """WITH expired AS (
               -- FOR UPDATE waits for a fenced write in progress (see fence).
               SELECT id FROM kontod_runs
                WHERE status = 'running' AND lease_until < now()
                  FOR UPDATE),
           gone AS (
               UPDATE kontod_runs r
                  SET status = 'interrupted', finished_at = now(),
                      error = 'abandoned: instance ' || r.instance
                              || ' stopped renewing its lease (last heartbeat '
                              || to_char(r.heartbeat_at AT TIME ZONE 'UTC',
                                         'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') || ')'
                 FROM expired e
                WHERE r.id = e.id
            RETURNING r.id, r.job, r.instance, r.heartbeat_at),
           counted AS (
               UPDATE kontod_jobs j SET runs = j.runs + g.n, errors = j.errors + g.n
                 FROM (SELECT job, count(*) AS n FROM gone GROUP BY job) g
                WHERE j.name = g.job)
           SELECT id, job, instance, heartbeat_at FROM gone ORDER BY id"""
    )
    return [Reaped(r["id"], r["job"], r["instance"], r["heartbeat_at"]) for r in rows]


async def tick_state(db: Executor, job: str, tick: datetime) -> tuple[TickState | None, bool]:
    """The newest attempt at ``tick`` (None when the tick has no run), and whether a run of
    the job is going right now, on any replica."""
    row = await db.fetchrow(
        """SELECT t.attempt, t.status, t.finished_at,
                  EXISTS (SELECT 1 FROM kontod_runs WHERE job = $1 AND status = 'running')
                      AS busy
             FROM (SELECT 1) AS one
             LEFT JOIN LATERAL (
                  SELECT attempt, status, finished_at FROM kontod_runs
                   WHERE job = $1 AND scheduled_for = $2
                   ORDER BY attempt DESC LIMIT 1) t ON true""",
        job,
        tick,
    )
    assert row is not None
    if row["attempt"] is None:
        return None, row["busy"]
    return TickState(tick, row["attempt"], row["status"], row["finished_at"]), row["busy"]


# Per job, one index look-up each (``LIMIT 1`` on the run table's indexes), whatever the
# number of runs kept; the counters come from kontod_jobs.
JOB_STATS_SQL = """
        SELECT j.name, j.registered_at, j.runs, j.errors,
               last.started_at, last.status,
               done.started_at AS done_started_at, done.finished_at, done.status AS done_status,
               done.error, done.counts,
               ok.finished_at AS last_success_at,
               cur.started_at AS running_since, cur.instance AS running_instance,
               tick.scheduled_for AS last_tick_run,
               newest.scheduled_for AS newest_tick, newest.attempt AS newest_attempt,
               newest.status AS newest_status, newest.finished_at AS newest_finished_at
          FROM kontod_jobs j
          LEFT JOIN LATERAL (
               SELECT started_at, status FROM kontod_runs WHERE job = j.name
                ORDER BY started_at DESC, id DESC LIMIT 1) last ON true
          LEFT JOIN LATERAL (
               SELECT started_at, finished_at, status, error, counts
                 FROM kontod_runs WHERE job = j.name AND status <> 'running'
                ORDER BY finished_at DESC, id DESC LIMIT 1) done ON true
          LEFT JOIN LATERAL (
               SELECT finished_at FROM kontod_runs WHERE job = j.name AND status = 'success'
                ORDER BY finished_at DESC LIMIT 1) ok ON true
          LEFT JOIN LATERAL (
               SELECT started_at, instance FROM kontod_runs
                WHERE job = j.name AND status = 'running') cur ON true
          LEFT JOIN LATERAL (
               SELECT scheduled_for FROM kontod_runs
                WHERE job = j.name AND scheduled_for IS NOT NULL AND status <> 'interrupted'
                ORDER BY scheduled_for DESC LIMIT 1) tick ON true
          LEFT JOIN LATERAL (
               SELECT scheduled_for, attempt, status, finished_at FROM kontod_runs
                WHERE job = j.name AND scheduled_for IS NOT NULL
                ORDER BY scheduled_for DESC, attempt DESC LIMIT 1) newest ON true
        """


async def job_stats(db: Executor) -> dict[str, JobStats]:
    """Per job: counters, last run, last success, the run in progress and the newest tick.

    One statement of index look-ups (``LIMIT 1`` on the run table's indexes): its cost does
    not grow with the number of runs kept.
    """
    rows = await db.fetch(JOB_STATS_SQL)
    out: dict[str, JobStats] = {}
    for r in rows:
        duration = None
        if r["finished_at"] is not None:
            duration = (r["finished_at"] - r["done_started_at"]).total_seconds()
        newest = None
        if r["newest_tick"] is not None:
            newest = TickState(
                r["newest_tick"], r["newest_attempt"], r["newest_status"], r["newest_finished_at"]
            )
        out[r["name"]] = JobStats(
            registered_at=r["registered_at"],
            runs=r["runs"],
            errors=r["errors"],
            last_started_at=r["started_at"],
            last_status=r["status"],
            last_finished_at=r["finished_at"],
            last_finished_status=r["done_status"],
            last_error=r["error"],
            last_duration_s=duration,
            last_counts=_counts(r["counts"]),
            last_success_at=r["last_success_at"],
            running_since=r["running_since"],
            running_instance=r["running_instance"],
            last_tick_run=r["last_tick_run"],
            latest_attempt=newest,
        )
    return out


async def prune(db: Executor, days: int, keep: int) -> int:
    """Delete finished runs older than ``days`` days, keeping per job the newest ``keep`` runs,
    the last failure and the last success; return how many were deleted."""
    deleted: int = await db.fetchval(
        """WITH kept AS (
               SELECT r.id FROM kontod_jobs j
                 CROSS JOIN LATERAL (
                       SELECT id FROM kontod_runs WHERE job = j.name
                        ORDER BY started_at DESC, id DESC LIMIT $2) r
               UNION
               SELECT f.id FROM kontod_jobs j
                 CROSS JOIN LATERAL (
                       SELECT id FROM kontod_runs
                        WHERE job = j.name AND status IN ('error', 'timeout', 'interrupted')
                        ORDER BY finished_at DESC, id DESC LIMIT 1) f
               UNION
               SELECT s.id FROM kontod_jobs j
                 CROSS JOIN LATERAL (
                       SELECT id FROM kontod_runs WHERE job = j.name AND status = 'success'
                        ORDER BY finished_at DESC LIMIT 1) s),
           gone AS (
               DELETE FROM kontod_runs
                WHERE status <> 'running' AND started_at < now() - make_interval(days => $1)
                  AND id NOT IN (SELECT id FROM kept)
            RETURNING 1)
           SELECT count(*) FROM gone""",
        days,
        keep,
    )
    return deleted


def _counts(raw: Any) -> dict[str, int]:
    if raw is None:
        return {}
    data = json.loads(raw) if isinstance(raw, str) else raw
    return {str(k): int(v) for k, v in data.items()}
