"""No empty database passes for a real one: real ``kontod`` processes without a database URL,
and snapshot runs that find no users, or far fewer than the last time."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from kontod.jobs import REFRESH, SNAPSHOTS
from kontod.jobs import refresh as refresh_job
from kontod.jobs import snapshots as snapshot_job
from kontod.ops import suspicion
from tests.helpers import add_user
from tests.integration.test_signals import START_TIMEOUT_S, clean_environ, distant_schedule, kontod

# Every command that opens the database, as a user types it in a shell without the demo's
# environment.
DATABASE_COMMANDS = [
    ("jobs", "run", "daily-snapshots"),
    ("jobs", "resume", "refresh-stale-connections"),
    ("jobs", "pause", "daily-snapshots", "--reason", "maintenance"),
    ("history",),
    ("runs", "daily-snapshots"),
    ("migrate",),
]


async def command(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``python -m kontod ARGS`` with only ``env`` as kontod's settings."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod",
        *args,
        env={**clean_environ(), "KONTOD_LOG_FORMAT": "json", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def last(out: str) -> str:
    """The last line of ``kontod jobs run``: the outcome, after the progress lines."""
    return out.strip().splitlines()[-1]


async def test_without_a_database_url_nothing_starts_and_no_database_is_created(
    tmp_path: Path,
) -> None:
    env = {"KONTOD_STATE_DIR": str(tmp_path)}
    code, out, err = await command("run", env=env)
    assert code == 2, (out, err)
    [line] = err.strip().splitlines()
    assert line.startswith("kontod: no KONTOD_DATABASE_URL is set")
    assert "KONTOD_EMBEDDED=1" in line and str(tmp_path / "pgdata") in line

    results = await asyncio.gather(*(command(*c, env=env) for c in DATABASE_COMMANDS))
    for argv, (code, out, err) in zip(DATABASE_COMMANDS, results, strict=True):
        assert code == 2, (argv, out, err)
        assert out == "", argv  # no "was not paused", no "run 1 success"
        [line] = err.strip().splitlines()
        assert "KONTOD_DATABASE_URL=postgresql://" in line, (argv, line)
        assert "`export ...` line" in line and "kontod demo" in line, (argv, line)
    # Nothing was created: no pgdata, no initdb.
    assert list(tmp_path.iterdir()) == []

    # Where a demo has run, the message names the folder its export line sets.
    demo = tmp_path / "demo" / "pgdata"
    demo.mkdir(parents=True)
    (demo / "PG_VERSION").write_text("16\n")
    code, _, err = await command("runs", "daily-snapshots", env=env)
    assert code == 2
    assert f"export KONTOD_STATE_DIR={tmp_path / 'demo'}" in err
    assert not (tmp_path / "pgdata").exists()


async def test_an_embedded_daemon_is_asked_for_and_the_commands_open_its_database(
    tmp_path: Path,
) -> None:
    state = Path(tempfile.mkdtemp(prefix="kontod-emb-"))  # short: the socket lives in pgdata
    try:
        settings = {
            "KONTOD_STATE_DIR": str(state),
            "KONTOD_EMBEDDED": "1",
            "KONTOD_SNAPSHOT_SCHEDULE": distant_schedule(datetime.now(UTC)),
        }
        async with kontod("", tmp_path, "embedded", settings) as k:
            await k.wait_logged("http.listening", timeout=START_TIMEOUT_S)
            assert k.logged("database.embedded") is not None
            k.proc.send_signal(signal.SIGTERM)
            assert await k.wait_exit(60) == 0, k.log()
        env = {"KONTOD_STATE_DIR": str(state)}  # without KONTOD_EMBEDDED: it exists already
        code, out, err = await command("jobs", "resume", "refresh-stale-connections", env=env)
        assert (code, out) == (0, "refresh-stale-connections: was not paused\n"), err
        # The embedded database holds no user: the run succeeds and says it found none.
        code, out, err = await command("jobs", "run", "daily-snapshots", env=env)
        assert code == 0, err
        assert last(out) == "daily-snapshots: run 1 success (suspicious: no users found)", out
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def test_a_snapshot_finding_far_fewer_users_than_the_last_success_is_suspicious(
    dsn: str,
) -> None:
    env = {"KONTOD_DATABASE_URL": dsn, "KONTOD_TIMEZONE": "UTC"}
    conn = await asyncpg.connect(dsn)
    try:
        users = [await add_user(conn, accounts=[("checking", "1", False)]) for _ in range(6)]
        code, out, err = await command("jobs", "run", "daily-snapshots", env=env)
        assert (code, last(out)) == (0, "daily-snapshots: run 1 success"), err
        # Half of them is not yet far fewer.
        await conn.execute("DELETE FROM users WHERE id = ANY($1::bigint[])", users[:3])
        code, out, err = await command("jobs", "run", "daily-snapshots", env=env)
        assert (code, last(out)) == (0, "daily-snapshots: run 2 success"), err
        await conn.execute("DELETE FROM users WHERE id = ANY($1::bigint[])", users[3:5])
        code, out, err = await command("jobs", "run", "daily-snapshots", env=env)
        assert code == 0, err
        assert last(out) == (
            "daily-snapshots: run 3 success"
            " (suspicious: users: 1, under 0.5 of the 3 found last time)"
        )
    finally:
        await conn.close()


def test_the_users_check_follows_the_items_threshold() -> None:
    limits = suspicion.from_settings(
        {SNAPSHOTS: snapshot_job.EXPORTS.population, REFRESH: refresh_job.EXPORTS.population}, {}
    )
    snapshots, refresh = limits["daily-snapshots"], limits["refresh-stale-connections"]
    assert suspicion.assess_population(0, None, snapshots) == "no users found"
    assert suspicion.assess_population(49, 100, snapshots) == (
        "users: 49, under 0.5 of the 100 found last time"
    )
    assert suspicion.assess_population(50, 100, snapshots) is None
    assert suspicion.assess_population(3, None, snapshots) is None  # a first run: no usual yet
    assert suspicion.assess_population(0, 100, refresh) is None  # the refresh finds what is stale
    off = suspicion.from_settings(
        {SNAPSHOTS: snapshot_job.EXPORTS.population}, {"daily-snapshots": (None, 0.0)}
    )
    assert suspicion.assess_population(0, 100, off["daily-snapshots"]) is None
