"""Shutdown and crash recovery: ``kontod run`` as a real process, real signals, real PostgreSQL.

The snapshot job is made slow for real, in the database: a trigger on ``patrimoine_snapshots``
sleeps when the second user's rows are written. With one user per batch, a run then commits
batch 1 and hangs inside batch 2's transaction, which is where a signal hurts most.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.helpers import add_user, free_port

JOB = "daily-snapshots"
TOKEN = "signals-admin-token"
START_TIMEOUT_S = 60.0  # a cold interpreter on a busy CI machine
SLEEP_S = 30  # the slow batch: longer than every wait that follows it, so a hang cannot pass


@dataclass
class Kontod:
    """One ``python -m kontod run`` process; its log lines go to a file, so no pipe fills up."""

    proc: asyncio.subprocess.Process
    log_path: Path
    port: int

    def log(self) -> str:
        return self.log_path.read_text()

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (a line still being written is left out)."""
        out: list[dict[str, Any]] = []
        for line in self.log().splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def logged(self, event: str, **fields: Any) -> dict[str, Any] | None:
        for e in self.events():
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                return e
        return None

    async def until(
        self, check: Callable[[], Awaitable[bool]], what: str, *, timeout: float = 20
    ) -> None:
        """Poll ``check``; fail with kontod's log when it exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not await check():
            if self.proc.returncode is not None:
                pytest.fail(
                    f"kontod exited with {self.proc.returncode} before {what}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"not within {timeout} s: {what}\n{self.log()}")
            await asyncio.sleep(0.05)

    async def wait_logged(self, event: str, *, timeout: float = 20, **fields: Any) -> None:
        async def seen() -> bool:
            return self.logged(event, **fields) is not None

        await self.until(seen, f"log event {event} {fields}", timeout=timeout)

    async def wait_exit(self, timeout: float) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout=timeout)
        except TimeoutError:
            pytest.fail(f"kontod still running {timeout} s after the signal:\n{self.log()}")


def clean_environ() -> dict[str, str]:
    """The test's environment without anything that would configure kontod behind our back."""
    return {
        key: value
        for key, value in os.environ.items()
        if key == "KONTOD_DVF_URL"  # the loopback address tests/conftest.py sets
        or (
            not key.startswith(("KONTOD_", "NOTIFY_", "WATCHDOG_"))
            and key not in ("DATABASE_URL", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")
        )
    }


@asynccontextmanager
async def kontod(
    dsn: str, tmp_path: Path, name: str, settings: Mapping[str, str]
) -> AsyncIterator[Kontod]:
    """Start kontod; whatever happens in the test, no process is left behind."""
    port = free_port()
    log_path = tmp_path / f"{name}.log"
    env = clean_environ() | {
        "KONTOD_DATABASE_URL": dsn,
        "KONTOD_LISTEN": f"127.0.0.1:{port}",
        "KONTOD_STATE_DIR": str(tmp_path / "state"),
        "KONTOD_ADMIN_TOKEN": TOKEN,
        "KONTOD_LOG_FORMAT": "json",
        "KONTOD_TIMEZONE": "UTC",
        "KONTOD_SNAPSHOT_BATCH_SIZE": "1",
        # One batch at a time, so that batch n is the n-th user's and comes after batch n - 1.
        "KONTOD_SNAPSHOT_WORKERS": "1",
        "KONTOD_INSTANCE": name,
        **settings,
    }
    with log_path.open("w") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kontod",
            "run",
            env=env,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield Kontod(proc, log_path, port)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def distant_schedule(now: datetime) -> str:
    """A yearly cron whose ticks are about six months from ``now`` either way.

    Its previous tick is then far outside the 20 h catch-up window and its next one far in the
    future, whatever today's date: kontod runs only what the test asks for.
    """
    month = (now.month + 5) % 12 + 1
    return f"0 12 15 {month} *"


async def seed_users(pool: asyncpg.Pool) -> list[int]:
    """Three users with one account each; in batches of one, user i is batch i + 1."""
    return [
        await add_user(pool, accounts=[("checking", f"{100 * (i + 1)}.25", False)])
        for i in range(3)
    ]


async def make_slow(pool: asyncpg.Pool, user_id: int) -> None:
    """Writing ``user_id``'s snapshot rows sleeps, inside the batch's transaction."""
    await pool.execute(
        f"""CREATE FUNCTION test_slow_snapshot() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.user_id = {int(user_id)} THEN PERFORM pg_sleep({SLEEP_S}); END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_slow_snapshot BEFORE INSERT ON patrimoine_snapshots
                FOR EACH ROW EXECUTE FUNCTION test_slow_snapshot();"""
    )


async def drop_slow(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "DROP TRIGGER test_slow_snapshot ON patrimoine_snapshots;"
        " DROP FUNCTION test_slow_snapshot();"
    )


async def snapshot_categories(pool: asyncpg.Pool, user_id: int) -> set[str]:
    rows = await pool.fetch("SELECT category FROM patrimoine_snapshots WHERE user_id = $1", user_id)
    return {r["category"] for r in rows}


async def run_row(pool: asyncpg.Pool, run_id: int) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM kontod_runs WHERE id = $1", run_id)
    assert row is not None
    return row


async def wait_sessions_gone(k: Kontod, pool: asyncpg.Pool, owner: str, timeout: float) -> None:
    """Wait until the exited kontod has no server session left (``owner``, its instance, names
    its sessions): until then its open transaction still exists."""
    deadline = time.monotonic() + timeout
    query = """SELECT pid, state, wait_event, xact_start, left(query, 60) AS query
                 FROM pg_stat_activity WHERE application_name = $1"""
    while rows := await pool.fetch(query, owner):
        if time.monotonic() > deadline:
            pytest.fail(
                f"{timeout} s after kontod (pid {k.proc.pid}) exited, the server still has its"
                f" sessions: {[dict(r) for r in rows]}\n{k.log()}"
            )
        await asyncio.sleep(0.1)


async def wait_in_slow_batch(k: Kontod, pool: asyncpg.Pool, run_id: int) -> str:
    """Wait until the run sleeps inside batch 2's statement; return the run's instance."""
    owner: str = (await run_row(pool, run_id))["instance"]

    async def sleeping() -> bool:
        found: bool = await pool.fetchval(
            """SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                               WHERE application_name = $1 AND wait_event = 'PgSleep')""",
            owner,
        )
        return found

    await k.until(sleeping, "the run sleeping inside batch 2")
    return owner


async def start_run(k: Kontod) -> int:
    """``POST /jobs/daily-snapshots/run`` once kontod follows its schedules; the run's id."""
    await k.wait_logged("job.registered", job=JOB, timeout=START_TIMEOUT_S)
    url = f"http://127.0.0.1:{k.port}/jobs/{JOB}/run"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
    ):
        body = await resp.json()
        assert resp.status == 202, body
        return int(body["runId"])


async def test_sigterm_waits_then_interrupts_the_run_and_rolls_back_its_batch(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    first, second, third = await seed_users(pool)
    await make_slow(pool, second)
    settings = {
        "KONTOD_SNAPSHOT_SCHEDULE": distant_schedule(datetime.now(UTC)),
        "KONTOD_SHUTDOWN_TIMEOUT": "2",
    }
    async with kontod(dsn, tmp_path, "kontod", settings) as k:
        run_id = await start_run(k)
        owner = await wait_in_slow_batch(k, pool, run_id)
        assert await snapshot_categories(pool, first) == {"checking", "total"}  # batch 1 committed

        sent = time.monotonic()
        k.proc.send_signal(signal.SIGTERM)
        code = await k.wait_exit(SLEEP_S)
        elapsed = time.monotonic() - sent

    assert code == 0, k.log()
    # It waited for the run (the shutdown timeout, 2 s), then cancelled it rather than waiting
    # for the batch's 30 s sleep.
    assert 1.5 <= elapsed < 20, (elapsed, k.log())

    row = await run_row(pool, run_id)
    assert row["status"] == "interrupted", dict(row)
    assert row["finished_at"] is not None
    assert "stopping" in row["error"], row["error"]

    # The process is gone, and so is every session of it: nothing can still commit batch 2.
    await wait_sessions_gone(k, pool, owner, timeout=10)
    assert await snapshot_categories(pool, first) == {"checking", "total"}
    assert await snapshot_categories(pool, second) == set()  # batch 2 rolled back whole
    assert await snapshot_categories(pool, third) == set()  # batch 3 never started

    assert k.logged("daemon.stopping") is not None, k.log()
    assert k.logged("runner.waiting", jobs=[JOB]) is not None, k.log()
    finished = k.logged("run.finished", run_id=run_id)
    assert finished is not None, k.log()
    assert finished["status"] == "interrupted", finished
    assert finished["job"] == JOB
    assert k.logged("daemon.stopped") is not None, k.log()


async def test_sigkill_then_restart_marks_the_run_interrupted_and_catches_up(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    users = await seed_users(pool)
    await make_slow(pool, users[1])
    # Every minute: at start the previous minute's tick lies inside the catch-up window. A
    # 5 s lease also limits each statement of a run to 5 s.
    settings = {
        "KONTOD_SNAPSHOT_SCHEDULE": "* * * * *",
        "KONTOD_SHUTDOWN_TIMEOUT": "2",
        "KONTOD_LEASE_SECONDS": "5",
    }

    async with kontod(dsn, tmp_path, "killed", settings) as k:
        # run.started comes after the claim: the run row exists by then.
        await k.wait_logged("run.started", job=JOB, trigger="catchup", timeout=START_TIMEOUT_S)
        row = await pool.fetchrow("SELECT * FROM kontod_runs WHERE job = $1", JOB)
        assert row is not None, k.log()
        assert (row["trigger"], row["status"]) == ("catchup", "running"), dict(row)
        killed_id: int = row["id"]
        killed_tick: datetime = row["scheduled_for"]
        owner = await wait_in_slow_batch(k, pool, killed_id)

        k.proc.kill()
        assert await k.wait_exit(10) == -signal.SIGKILL

    # The server ends the dead client's sleeping statement at the statement timeout the run's
    # transaction carries (the lease, 5 s) and rolls its transaction back.
    await wait_sessions_gone(k, pool, owner, timeout=10)
    # Nobody recorded anything: with no replica left, the row still claims to run.
    assert (await run_row(pool, killed_id))["status"] == "running"
    assert await snapshot_categories(pool, users[0]) == {"checking", "total"}
    assert await snapshot_categories(pool, users[1]) == set()
    await drop_slow(pool)

    async with kontod(dsn, tmp_path, "restarted", settings) as k2:

        async def made_up() -> bool:
            done: bool = await pool.fetchval(
                """SELECT EXISTS (SELECT 1 FROM kontod_runs WHERE job = $1 AND id > $2
                                     AND status = 'success')""",
                JOB,
                killed_id,
            )
            return done

        await k2.until(made_up, "the tick made up", timeout=START_TIMEOUT_S)
        k2.proc.send_signal(signal.SIGTERM)
        assert await k2.wait_exit(20) == 0, k2.log()

    killed = await run_row(pool, killed_id)
    assert killed["status"] == "interrupted", dict(killed)
    assert "instance killed stopped renewing its lease" in killed["error"], killed["error"]
    assert k2.logged("run.interrupted_found", run_id=killed_id) is not None, k2.log()

    redo = await pool.fetchrow(
        "SELECT * FROM kontod_runs WHERE job = $1 AND id > $2 ORDER BY id LIMIT 1",
        JOB,
        killed_id,
    )
    assert redo is not None
    assert redo["status"] == "success", dict(redo)
    # The restart came within a minute or so of the kill: it took the same tick over (its
    # second attempt), or caught up the minute after when the clock turned meanwhile.
    assert (redo["trigger"], redo["attempt"], redo["scheduled_for"]) in (
        ("takeover", 2, killed_tick),
        ("catchup", 1, killed_tick + timedelta(minutes=1)),
    ), dict(redo)
    assert json.loads(redo["counts"])["users"] == len(users)
    for uid in users:
        assert await snapshot_categories(pool, uid) == {"checking", "total"}, uid

    doubled = await pool.fetch(
        """SELECT scheduled_for, count(*) FROM kontod_runs
            WHERE job = $1 AND status = 'success'
            GROUP BY scheduled_for HAVING count(*) > 1""",
        JOB,
    )
    assert doubled == []


async def test_second_sigint_exits_at_once(dsn: str, pool: asyncpg.Pool, tmp_path: Path) -> None:
    users = await seed_users(pool)
    await make_slow(pool, users[1])
    settings = {
        "KONTOD_SNAPSHOT_SCHEDULE": distant_schedule(datetime.now(UTC)),
        "KONTOD_SHUTDOWN_TIMEOUT": "60",
        # Its statements may last 8 s: the sleeping batch outlives the test's two signals,
        # and the server ends it soon after.
        "KONTOD_LEASE_SECONDS": "8",
    }
    async with kontod(dsn, tmp_path, "kontod", settings) as k:
        run_id = await start_run(k)
        owner = await wait_in_slow_batch(k, pool, run_id)

        k.proc.send_signal(signal.SIGINT)
        await k.wait_logged("runner.waiting", jobs=[JOB])
        # A second later it still waits for the run, as the 60 s shutdown timeout allows.
        await asyncio.sleep(1)
        assert k.proc.returncode is None, k.log()

        sent = time.monotonic()
        k.proc.send_signal(signal.SIGINT)
        code = await k.wait_exit(10)
        elapsed = time.monotonic() - sent

    assert code == 130, k.log()
    assert elapsed < 5, elapsed
    forced = k.logged("daemon.forced_exit")
    assert forced is not None, k.log()
    assert forced["signal"] == "SIGINT"
    assert k.logged("daemon.stopped") is None  # it did not go through the orderly shutdown

    # Nothing was recorded on the way out; the open batch dies with the process's session, at
    # the latest when its statement timeout (the lease) ends it.
    await wait_sessions_gone(k, pool, owner, timeout=10)
    assert (await run_row(pool, run_id))["status"] == "running"
    assert await snapshot_categories(pool, users[0]) == {"checking", "total"}
    assert await snapshot_categories(pool, users[1]) == set()
