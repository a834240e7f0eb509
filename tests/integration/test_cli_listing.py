"""``kontod runs`` and ``kontod jobs list`` as a person reads them: real ``kontod``
processes on a real database, tables within 100 columns, one time format, nothing on stderr."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import asyncpg

from kontod.scheduler import runs
from tests.integration.test_cli import kontod

# The one format of a time in a table, and in --json.
TEXT_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d\d:\d\d"
JSON_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
# Anything else that looks like a time of day: an ISO 'T', a zone name after it, a fraction.
OTHER_TIME = re.compile(r"\d\d:\d\d:\d\d(?!(?: [+-]\d\d:\d\d))|\dT\d\d:|\d\d:\d\d:\d\d\.\d")

LONG_ERROR = "PowensError: HTTP 500 from /users/me/connections: " + "upstream said no; " * 120
MANY_COUNTS = {f"items_kind_{i:02d}": i * 7 for i in range(40)} | {"users": 12, "items_failed": 3}


async def _insert(
    conn: asyncpg.Connection,
    job: str,
    started: datetime,
    status: str,
    *,
    error: str | None = None,
    counts: dict[str, int] | None = None,
    by: str | None = None,
    reason: str | None = None,
) -> int:
    run_id: int = await conn.fetchval(
        """INSERT INTO kontod_runs (job, trigger, scheduled_for, started_at, finished_at, status,
                                    error, counts, instance, lease_until, requested_by,
                                    request_reason)
           VALUES ($1, $2, CASE WHEN $7::text IS NULL THEN $3::timestamptz END, $3,
                   $3 + interval '93 seconds', $4, $5, $6::jsonb, 'kontod-a', $3, $7, $8)
           RETURNING id""",
        job,
        "manual" if by else "schedule",
        started,
        status,
        error,
        json.dumps(counts or {}),
        by,
        reason,
    )
    return run_id


async def _history(dsn: str) -> list[int]:
    """Three runs of two jobs, the newest first in the list: a failed refresh with a long
    error, a snapshot with many counts, a manual snapshot."""
    now = datetime.now(UTC).replace(microsecond=0)
    conn = await asyncpg.connect(dsn)
    try:
        # As a daemon does at its start: the jobs are expected from now on.
        await runs.register_jobs(conn, ["daily-snapshots", "refresh-stale-connections"])
        manual = await _insert(
            conn,
            "daily-snapshots",
            now - timedelta(hours=30),
            "success",
            counts={"users": 3},
            by="cli:ops@db1",
            reason="after the upgrade",
        )
        many = await _insert(
            conn, "daily-snapshots", now - timedelta(hours=6), "success", counts=MANY_COUNTS
        )
        failed = await _insert(
            conn,
            "refresh-stale-connections",
            now - timedelta(hours=1),
            "error",
            error=LONG_ERROR,
            counts={"connections": 4, "items_failed": 4},
        )
    finally:
        await conn.close()
    return [failed, many, manual]


def _assert_readable(out: str) -> None:
    lines = out.splitlines()
    assert lines, out
    too_wide = [line for line in lines if len(line) > 100]
    assert not too_wide, "\n".join(too_wide)
    assert not OTHER_TIME.search(out), out


async def test_runs_lists_every_job_newest_first_within_100_columns(dsn: str) -> None:
    newest_first = await _history(dsn)
    env = {"KONTOD_DATABASE_URL": dsn, "KONTOD_TIMEZONE": "Europe/Paris"}
    code, out, err = await kontod("runs", env=env)
    assert (code, err) == (0, ""), err
    _assert_readable(out)
    rows = [line for line in out.splitlines()[1:] if not line.startswith(" ")]
    assert [int(row.split()[0]) for row in rows] == newest_first
    assert [row.split()[1] for row in rows] == [
        "refresh-stale-connections",
        "daily-snapshots",
        "daily-snapshots",
    ]
    for row in rows:
        assert re.search(TEXT_TIME, row), row
    # The counts summarised: the population and the failures first, then how many more.
    assert re.search(r" users=12 \+41$", rows[1]), rows[1]
    # Under a failed run its error, shortened; under a manual one who asked and why.
    details = [line.strip() for line in out.splitlines() if line.startswith("    ")]
    assert details[0].startswith("error: PowensError: HTTP 500") and details[0].endswith("…")
    assert details[1] == "by cli:ops@db1 (after the upgrade)"

    # One job: its runs only, without the job column.
    code, out, err = await kontod("runs", "daily-snapshots", env=env)
    assert (code, err) == (0, ""), err
    _assert_readable(out)
    assert out.splitlines()[0].split()[:3] == ["ID", "STARTED", "TRIGGER"]
    # With the room of the job column, more counts.
    assert re.search(r"  users=12 items_failed=3 \+40$", out.splitlines()[1]), out
    assert "refresh-stale-connections" not in out and "PowensError" not in out

    # --json: everything in full, times in ISO 8601 with the zone's offset.
    code, out, err = await kontod("runs", "--json", env=env)
    assert (code, err) == (0, ""), err
    listed = json.loads(out)
    assert [r["id"] for r in listed] == newest_first
    assert listed[0]["error"] == LONG_ERROR
    assert listed[1]["counts"] == MANY_COUNTS
    assert listed[2]["requestedBy"] == "cli:ops@db1"
    assert listed[2]["reason"] == "after the upgrade"
    assert listed[0]["durationSeconds"] == 93.0
    for r in listed:
        for key in ("startedAt", "finishedAt", *(["scheduledFor"] if r["scheduledFor"] else [])):
            assert re.fullmatch(JSON_TIME, r[key]), r[key]
        assert r["startedAt"].endswith(("+01:00", "+02:00"))  # Paris, winter or summer

    code, out, _ = await kontod("runs", "--status", "timeout", env=env)
    assert (code, out.strip()) == (0, "(no timeout run yet)")


async def test_jobs_list_shows_schedule_next_tick_pause_and_health(dsn: str) -> None:
    await _history(dsn)
    # A provider is set (never asked: the command only reads), so the refresh job is judged.
    env = {
        "KONTOD_DATABASE_URL": dsn,
        "KONTOD_TIMEZONE": "Europe/Paris",
        "KONTOD_POWENS_URL": "http://127.0.0.1:9",
    }
    code, out, err = await kontod(
        "jobs", "pause", "daily-snapshots", "--reason", "migration", "--until", "2h", env=env
    )
    assert code == 0, err
    assert re.search(f"paused until {TEXT_TIME} by cli:", out), out
    code, _, err = await kontod("jobs", "pause", "daily-snapshots", "--reason", "again", env=env)
    assert code == 1 and re.search(f"already paused by cli:\\S+ since {TEXT_TIME}: migration", err)

    code, out, err = await kontod("jobs", "list", env=env)
    assert (code, err) == (0, ""), err
    _assert_readable(out)
    zone, header, snapshots, refresh, estimations, audit = out.splitlines()
    assert zone == "schedules in Europe/Paris"
    assert header.split() == ["JOB", "SCHEDULE", "NEXT", "TICK", "PAUSED", "HEALTH"]
    assert re.match(r"daily-snapshots +0 2 \* \* \*  ", snapshots), snapshots
    assert re.search(f"{TEXT_TIME}  (1h59m|2h00m) left  paused$", snapshots), snapshots
    assert re.match(r"refresh-stale-connections +0 \*/6 \* \* \*  ", refresh), refresh
    # The table fits the terminal: the longer job names leave the health text cut.
    assert re.search(f"{TEXT_TIME}  -  +NO: last run err(or|…)$", refresh), refresh
    # kontod's own minimal Konto tables: neither the estimation columns nor an audit log.
    for unconfigured in (estimations, audit):
        assert re.search(r"  -  +-  +ok, not configur", unconfigured), unconfigured

    code, out, err = await kontod("jobs", "list", "--json", env=env)
    assert (code, err) == (0, ""), err
    snap, ref, *_ = json.loads(out)
    assert (snap["name"], snap["paused"], snap["pausedBy"][:4]) == ("daily-snapshots", True, "cli:")
    assert re.fullmatch(JSON_TIME, snap["pausedUntil"]) and re.fullmatch(
        JSON_TIME, snap["nextTick"]
    )
    assert (ref["healthy"], ref["lastStatus"], ref["timezone"]) == (False, "error", "Europe/Paris")


async def test_commands_log_nothing_unless_verbose_or_wrong(dsn: str) -> None:
    env = {"KONTOD_DATABASE_URL": dsn, "KONTOD_LOG_LEVEL": "debug"}
    code, out, err = await kontod("jobs", "run", "daily-snapshots", "--quiet", env=env)
    assert (code, err) == (0, ""), err
    # --quiet: the outcome only, no progress line.
    assert out.splitlines() == ["daily-snapshots: run 1 success (suspicious: no users found)"]
    # --verbose, before the command or after it: the run's lines at the configured level.
    for argv in (
        ["--verbose", "jobs", "run", "daily-snapshots", "-q"],
        ["jobs", "run", "daily-snapshots", "-q", "-v"],
    ):
        code, _, err = await kontod(*argv, env=env)
        assert code == 0, err
        events = [json.loads(line)["event"] for line in err.splitlines()]
        assert {"run.started", "run.finished"} <= set(events), err
