"""The platform knows the jobs only by what they declare (``JobSpec`` and ``JobExports``).

Outside ``kontod/jobs/``, no module names a concrete job, a job's count key or a job's
constant, in code, strings, comments or docstrings alike: adding a job must not mean editing
the runner, the metrics or the HTTP surface. The demo is left out on purpose: it sits above
the daemon and walks its user through the two real jobs by name, as a user of kontod would.
"""

from __future__ import annotations

import re
from pathlib import Path

from kontod import job
from kontod.jobs import NAMES, refresh, snapshots

KONTOD = Path(job.__file__).parent
# Above the daemon, a user of the jobs rather than part of the platform (see the docstring).
EXCLUDED = {KONTOD / "demo.py"}
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
    *(re.escape(fam.prefix) for fam in (*snapshots.EXPORTS.families, *refresh.EXPORTS.families)),
    r"rate_fallback_",
]
# The layers under the daemon never import a concrete job.
MAY_IMPORT_JOBS = {KONTOD / name for name in ("daemon.py", "cli.py", "demo.py")}


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
