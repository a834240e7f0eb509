"""The run table: claiming ticks, recording outcomes, and reading history back.

Every function takes a connection (or pool) and issues a fixed number of statements.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import asyncpg

FAILED_STATUSES = ("error", "timeout", "interrupted")

Executor = asyncpg.Connection | asyncpg.Pool


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
    # The newest scheduled tick that has a run (not interrupted): decides lateness without
    # comparing kontod's clock with the database's.
    last_tick_run: datetime | None = None


@dataclass(frozen=True)
class RunRecord:
    id: int
    job: str
    trigger: str
    scheduled_for: datetime | None
    started_at: datetime
    finished_at: datetime | None
    status: str
    error: str | None
    counts: Mapping[str, int]


async def register_jobs(db: Executor, names: Iterable[str]) -> None:
    """Remember when each job was first seen, which is when it starts to be expected."""
    await db.execute(
        "INSERT INTO kontod_jobs (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        list(names),
    )


async def reap_orphans(
    db: Executor, owner: str = "", unrecorded: Iterable[int] = ()
) -> list[tuple[int, str]]:
    """Mark ``interrupted`` the runs nobody is running any more.

    That is a run whose process has no database session left, or one of ``owner``'s runs
    listed in ``unrecorded``: finished, but its end could not be recorded.
    """
    rows = await db.fetch(
        """UPDATE kontod_runs r
              SET status = 'interrupted', finished_at = now(),
                  error = 'the kontod process running it stopped before it finished'
            WHERE status = 'running'
              AND (NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                                WHERE a.application_name = r.owner)
                   OR (r.owner = $1 AND r.id = ANY($2::bigint[])))
        RETURNING id, job""",
        owner,
        list(unrecorded),
    )
    return [(r["id"], r["job"]) for r in rows]


async def claim(
    db: Executor, job: str, trigger: str, scheduled_for: datetime | None, owner: str
) -> int | None:
    """Insert a running run; None when the tick is taken or the job already runs somewhere."""
    run_id: int | None = await db.fetchval(
        """INSERT INTO kontod_runs (job, trigger, scheduled_for, owner)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT DO NOTHING
           RETURNING id""",
        job,
        trigger,
        scheduled_for,
        owner,
    )
    return run_id


async def why_not_claimed(db: Executor, job: str) -> str:
    """``overlap`` when the job runs right now (here or elsewhere), else ``claimed``."""
    running = await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM kontod_runs WHERE job = $1 AND status = 'running')", job
    )
    return "overlap" if running else "claimed"


async def tick_done(db: Executor, job: str, tick: datetime) -> bool:
    """Whether a tick has a run that was not interrupted."""
    done: bool = await db.fetchval(
        """SELECT EXISTS (SELECT 1 FROM kontod_runs
                          WHERE job = $1 AND scheduled_for = $2 AND status <> 'interrupted')""",
        job,
        tick,
    )
    return done


async def finish(
    db: Executor, run_id: int, status: str, error: str | None, counts: Mapping[str, int]
) -> None:
    await db.execute(
        """UPDATE kontod_runs SET status = $2, error = $3, counts = $4::jsonb, finished_at = now()
           WHERE id = $1""",
        run_id,
        status,
        error,
        json.dumps(dict(counts)),
    )


async def job_stats(db: Executor) -> dict[str, JobStats]:
    """Per job: counts, last run, last success and the run in progress, in one statement."""
    rows = await db.fetch(
        """
        SELECT j.name, j.registered_at,
               agg.runs, agg.errors, agg.last_success_at, agg.running_since, agg.last_tick_run,
               last.started_at, last.status,
               done.started_at AS done_started_at, done.finished_at, done.status AS done_status,
               done.error, done.counts
          FROM kontod_jobs j
          LEFT JOIN LATERAL (
               SELECT count(*) FILTER (WHERE status <> 'running') AS runs,
                      count(*) FILTER (WHERE status IN ('error', 'timeout', 'interrupted'))
                          AS errors,
                      max(finished_at) FILTER (WHERE status = 'success') AS last_success_at,
                      max(started_at) FILTER (WHERE status = 'running') AS running_since,
                      max(scheduled_for) FILTER (WHERE status <> 'interrupted') AS last_tick_run
                 FROM kontod_runs WHERE job = j.name) agg ON true
          LEFT JOIN LATERAL (
               SELECT started_at, status FROM kontod_runs WHERE job = j.name
                ORDER BY started_at DESC, id DESC LIMIT 1) last ON true
          LEFT JOIN LATERAL (
               SELECT started_at, finished_at, status, error, counts
                 FROM kontod_runs WHERE job = j.name AND status <> 'running'
                ORDER BY finished_at DESC, id DESC LIMIT 1) done ON true
        """
    )
    out: dict[str, JobStats] = {}
    for r in rows:
        duration = None
        if r["finished_at"] is not None:
            duration = (r["finished_at"] - r["done_started_at"]).total_seconds()
        out[r["name"]] = JobStats(
            registered_at=r["registered_at"],
            runs=r["runs"] or 0,
            errors=r["errors"] or 0,
            last_started_at=r["started_at"],
            last_status=r["status"],
            last_finished_at=r["finished_at"],
            last_finished_status=r["done_status"],
            last_error=r["error"],
            last_duration_s=duration,
            last_counts=_counts(r["counts"]),
            last_success_at=r["last_success_at"],
            running_since=r["running_since"],
            last_tick_run=r["last_tick_run"],
        )
    return out


async def recent_runs(db: Executor, job: str, limit: int) -> list[RunRecord]:
    """The newest runs of a job, newest first."""
    rows = await db.fetch(
        """SELECT id, job, trigger, scheduled_for, started_at, finished_at, status, error, counts
             FROM kontod_runs WHERE job = $1 ORDER BY started_at DESC, id DESC LIMIT $2""",
        job,
        limit,
    )
    return [
        RunRecord(
            id=r["id"],
            job=r["job"],
            trigger=r["trigger"],
            scheduled_for=r["scheduled_for"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            status=r["status"],
            error=r["error"],
            counts=_counts(r["counts"]),
        )
        for r in rows
    ]


async def latest_snapshot_date(db: Executor) -> date | None:
    """The newest date in patrimoine_snapshots (an index-only look-up).

    The cast is outside max(): Konto's web app stores the date as ISO text, whose order is
    the dates' order, and the index on the column still serves max().
    """
    value: date | None = await db.fetchval("SELECT max(date)::date FROM patrimoine_snapshots")
    return value


def _counts(raw: Any) -> dict[str, int]:
    if raw is None:
        return {}
    data = json.loads(raw) if isinstance(raw, str) else raw
    return {str(k): int(v) for k, v in data.items()}
