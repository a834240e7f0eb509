"""Runs read back for people: the table of ``kontod runs``, the bars of the status page, and
one run in full (``kontod runs show``, ``/runs/{id}`` and its page).

Unlike the runner's history cache, these rows carry who asked for a manual run and why.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kontod.db import Executor
from kontod.scheduler.contract import RunStatus
from kontod.scheduler.runs import RunRecord

STATUSES = tuple(status.value for status in RunStatus)
MAX_RUN_ID = 2**63 - 1  # the run table's bigint
COLUMNS = """id, job, trigger, scheduled_for, attempt, started_at, finished_at, status, error,
             counts, instance, requested_by, request_reason"""


@dataclass(frozen=True)
class Run(RunRecord):
    """A run with who asked for it and why (manual runs)."""

    requested_by: str | None = None
    reason: str | None = None

    def duration_s(self, now: datetime) -> float:
        """How long it ran (so far, for a run still going)."""
        return ((self.finished_at or now) - self.started_at).total_seconds()


async def runs_of(
    db: Executor, job: str | None, limit: int, status: str | None = None
) -> list[Run]:
    """The newest runs of ``job`` (of every job when None), newest first, optionally only
    those with ``status``."""
    # The job's own statement keeps to the index on (job, started_at); every job's sorts the
    # run table, which pruning keeps small.
    which = "job = $3 AND " if job is not None else ""
    rows = await db.fetch(
        f"""SELECT {COLUMNS} FROM kontod_runs
             WHERE {which}($2::text IS NULL OR status = $2)
             ORDER BY started_at DESC, id DESC LIMIT $1""",
        limit,
        status,
        *([job] if job is not None else []),
    )
    return [_run(r) for r in rows]


async def recent(db: Executor, jobs: Iterable[str], limit: int) -> dict[str, list[Run]]:
    """The newest ``limit`` runs of every job, newest first, in one statement."""
    rows = await db.fetch(
        f"""SELECT r.* FROM unnest($1::text[]) AS j(name)
              CROSS JOIN LATERAL (
                    SELECT {COLUMNS} FROM kontod_runs WHERE job = j.name
                     ORDER BY started_at DESC, id DESC LIMIT $2) r""",
        list(jobs),
        limit,
    )
    out: dict[str, list[Run]] = {}
    for r in rows:
        out.setdefault(r["job"], []).append(_run(r))
    return out


async def record_request(db: Executor, run_id: int, by: str, reason: str | None) -> None:
    """Remember who asked for a manual run, and why."""
    await db.execute(
        "UPDATE kontod_runs SET requested_by = $2, request_reason = $3 WHERE id = $1",
        run_id,
        by,
        reason,
    )


@dataclass(frozen=True, kw_only=True)
class RunDetail(Run):
    """One run in full: also its lease as last renewed, which tells when its owner was last
    heard from (for a run still going, or one found ``interrupted``)."""

    heartbeat_at: datetime
    lease_until: datetime


def parse_run_id(raw: str) -> int:
    """A run id as a person types it (``kontod runs show ID``, ``/runs/{id}``); ValueError
    says what is accepted."""
    text = raw.strip()
    # The length first: int() refuses numbers of more than 4 300 digits with a ValueError.
    if not (text.isascii() and text.isdecimal() and len(text) <= 19) or not (
        1 <= int(text) <= MAX_RUN_ID
    ):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ValueError(f"a run id is a whole number from 1 to {MAX_RUN_ID}, not {shown!r}")
    return int(text)


async def run_detail(db: Executor, run_id: int) -> RunDetail | None:
    """The run ``run_id`` in full; None when there is none (never was, or pruned)."""
    row = await db.fetchrow(
        f"SELECT {COLUMNS}, heartbeat_at, lease_until FROM kontod_runs WHERE id = $1", run_id
    )
    if row is None:
        return None
    return RunDetail(
        **_fields(row), heartbeat_at=row["heartbeat_at"], lease_until=row["lease_until"]
    )


_PLAIN = (
    "id",
    "job",
    "trigger",
    "scheduled_for",
    "attempt",
    "started_at",
    "finished_at",
    "status",
    "error",
    "instance",
)


def _fields(r: Any) -> dict[str, Any]:
    raw = r["counts"]
    data = json.loads(raw) if isinstance(raw, str) else (raw or {})
    counts = {str(k): int(v) for k, v in data.items()}
    plain = {key: r[key] for key in _PLAIN}
    return {
        **plain,
        "counts": counts,
        "requested_by": r["requested_by"],
        "reason": r["request_reason"],
    }


def _run(r: Any) -> Run:
    return Run(**_fields(r))
