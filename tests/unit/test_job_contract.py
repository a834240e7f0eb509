"""The platform knows the jobs only by what they declare (``JobSpec`` and ``JobExports``).

Outside ``kontod/jobs/``, no module names a concrete job, a job's count key or a job's
constant, in code, strings, comments or docstrings alike: adding a job must not mean editing
the runner, the metrics or the HTTP surface. The demo is left out on purpose: it sits above
the daemon and walks its user through the two real jobs by name, as a user of kontod would.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog

import kontod
from kontod.jobs import NAMES, estimations, refresh, snapshots
from kontod.ops.health import assess_job
from kontod.ops.metrics import JobExportsCollector, RunTableCollector, new_registry
from kontod.scheduler.contract import (
    CountFamily,
    Freshness,
    JobExports,
    JobSpec,
    RunContext,
    Trigger,
)
from kontod.scheduler.runs import JobStats

KONTOD = Path(kontod.__file__).parent
# Above the daemon, a user of the jobs rather than part of the platform (see the docstring).
EXCLUDED = {
    KONTOD / "demo" / "run.py",
    # 2026-12-07: the spec table of settings still describes each job's own settings (its
    # schedule, batch size, bank); they move out when jobs declare their settings themselves.
    KONTOD / "config.py",
    # 2026-12-07: two of `kontod doctor`'s cut-over checks read one job's rows (today's
    # snapshot rows, the web app's unkeyed transactions); they move into jobs/ when a job can
    # declare its own doctor checks.
    KONTOD / "cli" / "doctor.py",
}
# What names a concrete job or one of its counts. Word boundaries keep settings such as
# KONTOD_REFRESH_SCHEDULE out of it.
FORBIDDEN = [
    *(re.escape(name) for name in NAMES),
    r"\bSNAPSHOTS\b",
    r"\bREFRESH\b",
    r"\bSNAPSHOT_JOB\b",
    r"\bSTATE_COUNT\b",
    r"\bSTALE_COUNT\b",
    r"\bNEEDS_USER\b",
    r"\bSTALE_REASONS\b",
    r"\bPOPULATIONS\b",
    r"latest_snapshot",
    *(
        re.escape(fam.prefix)
        for fam in (
            *snapshots.EXPORTS.families,
            *refresh.EXPORTS.families,
            *estimations.EXPORTS.families,
        )
    ),
    r"rate_fallback_",
]
# The layers under the daemon never import a concrete job.
MAY_IMPORT_JOBS = {
    KONTOD / name for name in ("daemon.py", "cli/main.py", "cli/doctor.py", "demo/run.py")
}


def platform_modules() -> list[Path]:
    return sorted(
        p for p in KONTOD.rglob("*.py") if (KONTOD / "jobs") not in p.parents and p not in EXCLUDED
    )


def test_no_module_outside_the_jobs_names_a_job_or_its_counts() -> None:
    found = []
    pattern = re.compile("|".join(FORBIDDEN))
    for path in platform_modules():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = pattern.search(line)
            if match:
                found.append(f"{path.relative_to(KONTOD.parent)}:{number}: {match.group()}")
    assert found == [], "\n".join(found)


def test_only_the_wiring_imports_the_jobs() -> None:
    importing = re.compile(
        r"^\s*(from kontod\.jobs\b|import kontod\.jobs\b|from kontod import .*\bjobs\b)"
    )
    found = [
        str(path.relative_to(KONTOD.parent))
        for path in platform_modules()
        if path not in MAY_IMPORT_JOBS
        and any(importing.match(line) for line in path.read_text().splitlines())
    ]
    assert found == []


def test_the_real_jobs_declare_what_the_platform_used_to_know_of_them() -> None:
    # The count keys stored in the run table are the ones they always were.
    assert refresh.CONNECTIONS.key("ok") == "connections_state.ok"
    assert refresh.STALE.key("needs_user") == "stale_accounts_after.needs_user"
    assert snapshots.UNCONVERTED.key("USD") == "unconverted_USD"
    assert snapshots.RATE_AGE.key("BTC") == "rate_age_days_BTC"
    assert snapshots.EXPORTS.population == "users"
    assert snapshots.EXPORTS.trigger_paths == ("/api/dashboard/snapshot",)
    assert [f.metric for f in snapshots.EXPORTS.freshness] == [
        "kontod_snapshot_latest_date_timestamp_seconds"
    ]


def test_any_jobs_declarations_are_rendered_from_its_last_counts() -> None:
    # A job the platform has never heard of: its families and its probe reach /metrics as
    # declared, and its own-only counts leave the plain counts.
    backlog = CountFamily("demo_backlog", "Items waiting, by queue", "backlog.", "queue")
    lag = CountFamily(
        "demo_lag_seconds",
        "Lag by source",
        "lag_min.",
        "source",
        per_job=False,
        always=("a", "b"),
        scale=60.0,
        in_run_counts=False,
    )

    async def never(_: object) -> date | None:
        raise AssertionError("probes are read by the history, not on scrape")

    exports = JobExports(
        families=(backlog, lag),
        freshness=(Freshness("demo_fresh_timestamp_seconds", "Newest output", never),),
    )
    ctx = RunContext(1, "queues", Trigger.MANUAL, None, datetime.now(UTC), structlog.get_logger())
    ctx.count_in(backlog, "mail", 2)
    ctx.count_in(backlog, "mail")
    ctx.set_in(lag, "b", 5)
    ctx.counts["items_done"] = 4
    assert dict(ctx.counts) == {"backlog.mail": 3, "lag_min.b": 5, "items_done": 4}

    stats = {"queues": JobStats(last_counts=dict(ctx.counts))}
    readings: dict[str, date | datetime | None] = {"demo_fresh_timestamp_seconds": date(2026, 3, 2)}
    registry = new_registry()
    paris = ZoneInfo("Europe/Paris")
    JobExportsCollector(registry, {"queues": exports}, paris, lambda: stats, lambda: readings)
    jobs = [JobSpec("queues", "0 2 * * *", never_run, HOUR, HOUR, HOUR, exports=exports)]
    RunTableCollector(
        registry,
        jobs,
        lambda: stats,
        lambda: datetime(2026, 3, 2, 12, tzinfo=UTC),
        lambda spec, st, now: assess_job(spec, paris, st, now),
        lambda job, st, now: None,
    )
    sample = registry.get_sample_value
    assert sample("demo_backlog", {"job_name": "queues", "queue": "mail"}) == 3
    assert sample("demo_lag_seconds", {"source": "a"}) == 0
    assert sample("demo_lag_seconds", {"source": "b"}) == 300
    midnight = datetime(2026, 3, 2, tzinfo=paris).timestamp()
    assert sample("demo_fresh_timestamp_seconds") == midnight
    counts = {"job_name": "queues", "count": "backlog.mail"}
    assert sample("kontod_job_last_run_counts", counts) == 3
    assert sample("kontod_job_last_run_counts", {**counts, "count": "lag_min.b"}) is None

    # Before a run exported them, a family has no sample, whatever it would always show.
    stats["queues"] = JobStats(last_counts={"items_done": 1})
    readings.clear()
    assert sample("demo_lag_seconds", {"source": "a"}) is None
    assert sample("demo_backlog", {"job_name": "queues", "queue": "mail"}) is None
    assert sample("demo_fresh_timestamp_seconds") is None


async def never_run(ctx: RunContext) -> None:
    raise AssertionError("not run")


HOUR = timedelta(hours=1)


async def test_settle_marks_a_job_whose_requirement_fails_not_configured() -> None:
    from dataclasses import replace

    from kontod.scheduler.contract import settle
    from tests.helpers import spec

    asked: list[str] = []

    def needs(reason: str | None, name: str) -> Any:
        async def check() -> str | None:
            asked.append(name)
            return reason

        return check

    met = replace(spec("met"), requires=needs(None, "met"))
    unmet = replace(spec("unmet"), requires=needs("no audit_log table", "unmet"))
    idle = replace(spec("idle"), not_configured="no bank", requires=needs("other", "idle"))
    plain = spec("plain")
    settled = await settle([met, unmet, idle, plain])
    assert [s.not_configured for s in settled] == [None, "no audit_log table", "no bank", None]
    assert asked == ["met", "unmet"]  # a job already not configured keeps its own reason
