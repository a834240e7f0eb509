"""``kontod runs show ID``: one run in full, as an operator runs the command."""

from __future__ import annotations

import asyncpg

from tests.integration.test_cli import kontod

RUNS_SQL = """
INSERT INTO kontod_runs (job, trigger, scheduled_for, attempt, started_at, finished_at, status,
                         error, counts, instance, lease_until, heartbeat_at, requested_by,
                         request_reason)
VALUES ('refresh-stale-connections', 'retry', '2026-03-02 01:00+00', 2, '2026-03-02 01:05+00',
        '2026-03-02 01:05:02.5+00', 'error', $1, '{"users": 3, "items_failed": 2}',
        'kontod-db1', '2026-03-02 01:05:30+00', '2026-03-02 01:05:01+00', NULL, NULL),
       ('daily-snapshots', 'manual', NULL, 1, '2026-03-02 08:00+00', NULL, 'running', NULL,
        '{}', 'kontod-db2', '2099-01-01 00:00+00', '2026-03-02 08:00:10+00', 'cli:ops@db1',
        'after the upgrade')
RETURNING id
"""


async def test_runs_show_prints_one_run_in_full(dsn: str) -> None:
    error = "PowensError: 503 Service Unavailable\nbody: \x1b[31mdown\x1b[0m"
    conn = await asyncpg.connect(dsn)
    try:
        failed, running = [r["id"] for r in await conn.fetch(RUNS_SQL, error)]
    finally:
        await conn.close()
    env = {"KONTOD_DATABASE_URL": dsn, "KONTOD_TIMEZONE": "Europe/Paris"}

    code, out, err = await kontod("runs", "show", str(failed), env=env)
    assert code == 0, err
    assert out.splitlines() == [
        f"run {failed}",
        "  job           refresh-stale-connections",
        "  status        error",
        "  trigger       retry",
        "  attempt       2",
        "  tick          2026-03-02 02:00:00 +01:00",
        "  started       2026-03-02 02:05:00 +01:00",
        "  finished      2026-03-02 02:05:02 +01:00",
        "  duration      2.5 s",
        "  instance      kontod-db1",
        "  requested by  -",
        "  reason        -",
        "  heartbeat     2026-03-02 02:05:01 +01:00",
        "  counts        items_failed=2",
        "                users=3",
        "  error         PowensError: 503 Service Unavailable",
        # What the bank sent reaches the terminal as text, never as an escape sequence.
        r"                body: \x1b[31mdown\x1b[0m",
    ]

    code, out, err = await kontod("runs", "show", str(running), env=env)
    assert code == 0, err
    lines = out.splitlines()
    assert "  requested by  cli:ops@db1" in lines and "  reason        after the upgrade" in lines
    assert "  lease until   2099-01-01 01:00:00 +01:00" in lines
    assert "  counts        -" in lines and "  error         -" in lines
    assert any(line.startswith("  duration") and line.endswith(" s so far") for line in lines)

    code, _, err = await kontod("runs", "show", "987654321", env=env)
    assert (code, err.strip().splitlines()[-1]) == (1, "kontod: no run with id 987654321")
    for bad in ("abc", "0", "-3", "9" * 30):
        code, _, err = await kontod("runs", "show", bad, env=env)
        assert code == 2 and "kontod: runs show: a run id is a whole number" in err, (bad, err)
    code, _, err = await kontod("runs", "show", env=env)
    assert code == 2 and "kontod runs show ID" in err
    # The job listing is untouched, and refuses a stray second argument.
    code, out, err = await kontod("runs", "daily-snapshots", env=env)
    assert code == 0 and "after the upgrade" in out, err
    code, _, err = await kontod("runs", "daily-snapshots", "5", env=env)
    assert code == 2 and "unexpected '5'" in err
