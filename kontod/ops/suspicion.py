"""Suspicious success: a run that succeeded but did far less, or took far less time, than usual.

A successful scheduled run is compared with the median of the job's previous successful
scheduled runs (up to ``HISTORY``): below ``duration`` times the median duration, or below
``items`` times the median number of items, it is suspicious. A job that declares the count of what it
found (its population, ``JobExports.population``) is also suspicious, whatever its trigger and history,
when a success found none, or fewer than ``items`` times what the job's previous success found.
The verdicts are pure functions; ``latest`` reads what they need for every job in one statement.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kontod.config import ConfigError
from kontod.db import Executor
from kontod.scheduler.contract import JobSpec, RunStatus, Trigger

HISTORY = 20


@dataclass(frozen=True)
class Thresholds:
    """Fractions of the usual run below which a success is suspicious (0 turns a check off)."""

    duration: float = 0.2
    items: float = 0.5
    # Fewer earlier successes than this, and there is no "usual" to compare with.
    min_history: int = 5
    # Below this median, durations are timing noise rather than work done.
    min_median_duration_s: float = 1.0
    # The count of what the job found (its declared population); None: the job has none.
    population: str | None = None


@dataclass(frozen=True)
class Sample:
    """One successful run as the comparison sees it."""

    duration_s: float
    items: int | None


@dataclass(frozen=True)
class Suspicion:
    suspicious: bool = False
    reason: str | None = None
    median_duration_s: float | None = None
    median_items: float | None = None
    run_id: int | None = None


def items_of(counts: Mapping[str, int]) -> int | None:
    """The items a run processed: the sum of its ``items_*`` counts (None: it counts none)."""
    values = [v for k, v in counts.items() if k.startswith("items_")]
    return sum(values) if values else None


def assess(run: Sample, previous: Sequence[Sample], thresholds: Thresholds) -> Suspicion:
    """Whether ``run`` (a success) did far less than the median of ``previous`` successes."""
    if len(previous) < thresholds.min_history:
        return Suspicion()
    median_duration = statistics.median(s.duration_s for s in previous)
    known_items = [s.items for s in previous if s.items is not None]
    median_items = statistics.median(known_items) if known_items else None
    reasons = []
    if (
        thresholds.duration > 0
        and median_duration >= thresholds.min_median_duration_s
        and run.duration_s < thresholds.duration * median_duration
    ):
        reasons.append(
            f"took {run.duration_s:.1f} s, under {thresholds.duration:g} of the usual "
            f"{median_duration:.1f} s"
        )
    if (
        thresholds.items > 0
        and median_items is not None
        and median_items > 0
        and run.items is not None
        and run.items < thresholds.items * median_items
    ):
        reasons.append(
            f"processed {run.items} items, under {thresholds.items:g} of the usual {median_items:g}"
        )
    return Suspicion(
        suspicious=bool(reasons),
        reason="; ".join(reasons) or None,
        median_duration_s=median_duration,
        median_items=median_items,
    )


def assess_population(found: int | None, before: int | None, thresholds: Thresholds) -> str | None:
    """Why a success that found ``found`` items is suspicious when the previous success found
    ``before`` (None: it is not)."""
    if thresholds.population is None or thresholds.items <= 0 or found is None:
        return None
    what = thresholds.population
    if found == 0:
        return f"no {what} found"
    if before is not None and found < thresholds.items * before:
        return f"{what}: {found}, under {thresholds.items:g} of the {before} found last time"
    return None


# Per job: its last finished run, the success before it (any trigger), and, when the last run
# succeeded on schedule, the scheduled successes before it. A manual run is not judged on its
# duration and items: a re-run after a scheduled one often has less to do (the refresh finds
# fewer stale accounts), and that is no sign of trouble. Its population is judged: a job that
# declares one takes all of it, whoever asks for the run.
LATEST_SQL = """
SELECT j.name, last.id, last.status, last.trigger, last.duration_s, last.counts, prev.runs,
       before.counts AS before_counts
  FROM kontod_jobs j
  LEFT JOIN LATERAL (
       SELECT id, status, trigger, started_at, counts,
              extract(epoch FROM finished_at - started_at)::float8 AS duration_s
         FROM kontod_runs WHERE job = j.name AND status <> 'running'
        ORDER BY started_at DESC, id DESC LIMIT 1) last ON true
  LEFT JOIN LATERAL (
       SELECT jsonb_agg(jsonb_build_object('d', s.duration_s, 'c', s.counts)) AS runs
         FROM (SELECT extract(epoch FROM finished_at - started_at)::float8 AS duration_s, counts
                 FROM kontod_runs
                WHERE job = j.name AND status = 'success' AND trigger <> 'manual'
                  AND last.status = 'success' AND last.trigger <> 'manual'
                  AND started_at < last.started_at
                ORDER BY started_at DESC LIMIT $2) s) prev ON true
  LEFT JOIN LATERAL (
       SELECT counts FROM kontod_runs
        WHERE job = j.name AND status = 'success' AND last.status = 'success'
          AND started_at < last.started_at
        ORDER BY started_at DESC, id DESC LIMIT 1) before ON true
 WHERE j.name = ANY($1::text[])
"""


async def latest(
    db: Executor, thresholds: Mapping[str, Thresholds], default: Thresholds = Thresholds()
) -> dict[str, Suspicion]:
    """The verdict on each job's last finished run (not suspicious unless it succeeded)."""
    rows = await db.fetch(LATEST_SQL, list(thresholds) or [], HISTORY)
    out: dict[str, Suspicion] = {}
    for r in rows:
        if r["status"] != RunStatus.SUCCESS:
            out[r["name"]] = Suspicion(run_id=r["id"])
            continue
        limits = thresholds.get(r["name"], default)
        counts = _counts(r["counts"])
        verdict = Suspicion()
        if r["trigger"] != Trigger.MANUAL:
            run = Sample(r["duration_s"], items_of(counts))
            previous = [
                Sample(float(p["d"]), items_of(_counts(p["c"]))) for p in _json(r["runs"]) or []
            ]
            verdict = assess(run, previous, limits)
        key = limits.population
        before = _counts(r["before_counts"]).get(key) if key and r["before_counts"] else None
        shrunk = assess_population(counts.get(key) if key else None, before, limits)
        reasons = [reason for reason in (shrunk, verdict.reason) if reason]
        out[r["name"]] = Suspicion(
            bool(reasons),
            "; ".join(reasons) or None,
            verdict.median_duration_s,
            verdict.median_items,
            r["id"],
        )
    return out


def populations(jobs: Iterable[JobSpec]) -> dict[str, str | None]:
    """Each job's declared population count, by job name (None: it declares none)."""
    return {spec.name: spec.exports.population for spec in jobs}


def for_jobs(
    jobs: Mapping[str, str | None], overrides: Mapping[str, Thresholds]
) -> dict[str, Thresholds]:
    """The thresholds of each job (``jobs``: its population count by name): its own when set,
    else the defaults; with the job's population unless they name one."""
    out = {}
    for name, population in jobs.items():
        limits = overrides.get(name, Thresholds())
        if limits.population is None and population is not None:
            limits = dataclasses.replace(limits, population=population)
        out[name] = limits
    return out


def from_settings(
    jobs: Mapping[str, str | None], configured: Mapping[str, tuple[float | None, float | None]]
) -> dict[str, Thresholds]:
    """Thresholds from ``KONTOD_SUSPICIOUS_<JOB>`` settings (``jobs``: each job's population
    count by name, see ``populations``); ConfigError for an unknown job."""
    known = list(jobs)
    out: dict[str, Thresholds] = {}
    for job, (duration, items) in configured.items():
        if job not in known:
            var = "KONTOD_SUSPICIOUS_" + job.upper().replace("-", "_")
            raise ConfigError(var, f"{duration},{items}", "names no job; jobs: " + ", ".join(known))
        default = Thresholds()
        out[job] = dataclasses.replace(
            default,
            duration=default.duration if duration is None else duration,
            items=default.items if items is None else items,
        )
    return for_jobs(jobs, out)


def _json(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


def _counts(raw: Any) -> dict[str, int]:
    data = _json(raw) or {}
    return {str(k): int(v) for k, v in data.items()}
