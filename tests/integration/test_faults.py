"""Faults with real processes, real signals and real PostgreSQL servers: replicas sharing one
database, a replica killed or frozen mid-run, PostgreSQL restarted or frozen, failing runs.

Leases are short (5 s, the minimum) so that takeovers happen within seconds. The slow batch of
the snapshot job is a trigger on ``patrimoine_snapshots`` that sleeps only in the sessions of
the instance named ``victim`` (kontod names its sessions after its instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from kontod import db
from tests import pg
from tests.helpers import add_user
from tests.integration.test_signals import (
    JOB,
    START_TIMEOUT_S,
    TOKEN,
    Kontod,
    kontod,
    snapshot_categories,
)

LEASE_S = 5
FAST = {"KONTOD_LEASE_SECONDS": str(LEASE_S), "KONTOD_SHUTDOWN_TIMEOUT": "2"}


def recent_daily(now: datetime) -> str:
    """A daily schedule whose last tick was two minutes ago: inside the catch-up window."""
    tick = now - timedelta(minutes=2)
    return f"{tick.minute} {tick.hour} * * *"


def tick_of(expr: str, now: datetime) -> datetime:
    minute, hour = (int(f) for f in expr.split()[:2])
    tick = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return tick if tick <= now else tick - timedelta(days=1)


@asynccontextmanager
async def database(admin_dsn: str) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """A migrated database of its own and a pool on it, for scenarios run side by side."""
    name = await pg.create_database(admin_dsn)
    dsn = pg.with_database(admin_dsn, name)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    assert pool is not None
    try:
        yield dsn, pool
    finally:
        await pool.close()
        await pg.drop_database(admin_dsn, name)


async def slow_for_victim(
    pool: asyncpg.Pool, after_user: int, seconds: float = 2, also: str = "victim"
) -> None:
    """Writing each row of every user after ``after_user`` sleeps, in the sessions of the
    victim (and of ``also``) only. Each sleep stays under the statement timeout a run's
    transaction carries (the lease): with one user per batch the run is slow, not failing."""
    await pool.execute(
        f"""CREATE FUNCTION test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.user_id > {int(after_user)}
                   AND current_setting('application_name') IN ('victim', '{also}') THEN
                    PERFORM pg_sleep({float(seconds)});
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_slow BEFORE INSERT ON patrimoine_snapshots
                FOR EACH ROW EXECUTE FUNCTION test_slow();"""
    )


async def seed(pool: asyncpg.Pool, n: int = 3) -> list[int]:
    return [
        await add_user(pool, accounts=[("checking", f"{100 * (i + 1)}.25", False)])
        for i in range(n)
    ]


async def wait_until(check: Any, what: str, procs: list[Kontod], timeout: float) -> float:
    """Poll ``check`` (async, returns bool); the seconds it took. Fails with the logs."""
    began = time.monotonic()
    while not await check():
        if time.monotonic() - began > timeout:
            logs = "\n".join(f"--- {k.log_path.name}\n{k.log()[-4000:]}" for k in procs)
            pytest.fail(f"not within {timeout} s: {what}\n{logs}")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def rows(pool: asyncpg.Pool, tick: datetime | None = None) -> list[asyncpg.Record]:
    if tick is None:
        return await pool.fetch("SELECT * FROM kontod_runs WHERE job = $1 ORDER BY id", JOB)
    return await pool.fetch(
        "SELECT * FROM kontod_runs WHERE job = $1 AND scheduled_for = $2 ORDER BY attempt",
        JOB,
        tick,
    )


async def get_json(port: int, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return await resp.json() if path != "/metrics" else await resp.text()


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f'{name}{{job_name="{JOB}"}} '):
            return float(line.split()[-1])
    return None


async def views(k: Kontod) -> tuple[Any, ...]:
    """What one replica reports about the snapshot job, over HTTP and in its metrics."""
    report = await get_json(k.port, "/health/cron")
    job = next(j for j in report["jobs"] if j["name"] == JOB)
    text = await get_json(k.port, "/metrics")
    return (
        job["runCount"],
        job["errorCount"],
        job["lastSuccess"],
        job["lastStatus"],
        metric(text, "kontod_job_runs_total"),
        metric(text, "kontod_job_errors_total"),
        metric(text, "kontod_job_last_success_timestamp_seconds"),
    )


async def test_three_replicas_run_every_tick_exactly_once(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await seed(pool)
    settings = FAST | {"KONTOD_SNAPSHOT_SCHEDULE": "*/2 * * * * *"}
    async with (
        kontod(dsn, tmp_path, "replica-a", settings) as a,
        kontod(dsn, tmp_path, "replica-b", settings) as b,
        kontod(dsn, tmp_path, "replica-c", settings) as c,
    ):
        replicas = [a, b, c]
        for k in replicas:
            await k.wait_logged("job.registered", job=JOB, timeout=START_TIMEOUT_S)
        begin = datetime.now(UTC)
        await asyncio.sleep(42)
        end = datetime.now(UTC)
        for k in replicas:
            k.proc.send_signal(signal.SIGTERM)
        for k in replicas:
            assert await k.wait_exit(20) == 0, k.log()

    first = begin.replace(microsecond=0) + timedelta(seconds=2 + begin.second % 2)
    expected = [first + timedelta(seconds=2 * i) for i in range(20)]
    assert expected[-1] < end - timedelta(seconds=1)
    per_tick: dict[datetime, list[asyncpg.Record]] = {}
    for r in await rows(pool):
        per_tick.setdefault(r["scheduled_for"], []).append(r)
    missing = [t for t in expected if t not in per_tick]
    assert missing == [], missing
    doubled = {t: len(rs) for t, rs in per_tick.items() if len(rs) > 1}
    assert doubled == {}
    failed = [
        dict(rs[0]) for t, rs in per_tick.items() if t in expected and rs[0]["status"] != "success"
    ]
    assert failed == []
    # The runs were spread over the replicas, each named in the rows and in its logs.
    instances = {rs[0]["instance"] for rs in per_tick.values()}
    assert instances <= {"replica-a", "replica-b", "replica-c"}
    for k in replicas:
        for event in k.events():
            if event.get("event") == "run.started":
                assert event["instance"] == k.log_path.stem, event


async def takeover_scenario(admin_dsn: str, tmp_path: Path, freeze: bool) -> dict[str, float]:
    """The victim runs a tick and is killed (or frozen) in its slow batch; two replicas live."""
    async with database(admin_dsn) as (dsn, pool):
        users = await seed(pool, 12)
        await slow_for_victim(pool, users[0])
        now = datetime.now(UTC)
        expr = recent_daily(now)
        tick = tick_of(expr, now)
        settings = FAST | {"KONTOD_SNAPSHOT_SCHEDULE": expr}
        folder = tmp_path / ("frozen" if freeze else "killed")
        folder.mkdir()
        async with kontod(dsn, folder, "victim", settings) as victim:

            async def sleeping() -> bool:
                found: bool = await pool.fetchval(
                    """SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                        WHERE application_name = 'victim' AND wait_event = 'PgSleep'
                          AND datname = current_database())"""
                )
                return found

            await wait_until(sleeping, "the victim inside its slow batch", [victim], 60)
            [claimed] = await rows(pool, tick)
            assert (claimed["instance"], claimed["trigger"]) == ("victim", "catchup")
            async with (
                kontod(dsn, folder, "survivor-1", settings) as s1,
                kontod(dsn, folder, "survivor-2", settings) as s2,
            ):
                everyone = [victim, s1, s2]
                for k in (s1, s2):
                    await k.wait_logged("job.registered", job=JOB, timeout=START_TIMEOUT_S)
                # Both see a run whose lease is renewed: nobody takes it over.
                await asyncio.sleep(2)
                assert [r["status"] for r in await rows(pool, tick)] == ["running"]

                victim.proc.send_signal(signal.SIGSTOP if freeze else signal.SIGKILL)
                stopped_at = time.monotonic()
                # New balances: a re-run rewrites only rows whose value changed, so the
                # takeover now rewrites every row, and a late write by the victim would carry
                # the old values.
                await pool.execute("UPDATE bank_accounts SET balance = balance + 1")

                async def taken_over() -> bool:
                    return len(await rows(pool, tick)) == 2

                takeover_s = await wait_until(
                    taken_over, "a second attempt", everyone, LEASE_S + 10
                )

                async def succeeded() -> bool:
                    return any(r["status"] == "success" for r in await rows(pool, tick))

                await wait_until(succeeded, "the takeover succeeding", everyone, 30)
                done_s = time.monotonic() - stopped_at
                if freeze:
                    victim.proc.send_signal(signal.SIGCONT)

                    async def woke() -> bool:
                        return any(
                            victim.logged(e) is not None
                            for e in ("run.record_lost", "run.claim_lost")
                        )

                    await wait_until(woke, "the victim learning it lost", everyone, 20)
                    await asyncio.sleep(2)  # time for any late write to show

                first, second = await rows(pool, tick)
                assert first["status"] == "interrupted", dict(first)
                assert "instance victim stopped renewing its lease" in first["error"]
                assert (second["trigger"], second["attempt"], second["status"]) == (
                    "takeover",
                    2,
                    "success",
                ), dict(second)
                assert second["instance"] in ("survivor-1", "survivor-2")
                assert json.loads(second["counts"])["users"] == len(users)
                # Every snapshot row was written by the takeover, none later by the victim.
                written = await pool.fetch(
                    "SELECT user_id, created_at FROM patrimoine_snapshots ORDER BY user_id"
                )
                assert {r["user_id"] for r in written} == set(users)
                for r in written:
                    assert second["started_at"] <= r["created_at"] <= second["finished_at"], r
                for uid in users:
                    assert await snapshot_categories(pool, uid) == {"checking", "total"}
                totals = await pool.fetch(
                    """SELECT p.user_id, p.total_value = sum(a.balance) AS right
                         FROM patrimoine_snapshots p JOIN bank_accounts a USING (user_id)
                        WHERE p.category = 'total' GROUP BY p.user_id, p.total_value"""
                )
                assert len(totals) == len(users) and all(r["right"] for r in totals), totals
                assert (
                    await pool.fetchval("SELECT count(*) FROM kontod_runs WHERE status = 'running'")
                    == 0
                )

                # Every live replica reports the same history, and the database's.
                async def agree() -> bool:
                    seen = [await views(k) for k in (s1, s2)]
                    return seen[0] == seen[1] and seen[0][:2] == (2, 1)

                await wait_until(agree, "the replicas agreeing", everyone, 10)
                if freeze:
                    # Whatever the victim knew when it woke, it was not written.
                    assert victim.logged("run.finished", status="success", job=JOB) is None
    return {"takeover_s": takeover_s, "done_s": done_s}


async def test_a_killed_or_frozen_replica_is_taken_over_by_a_live_one(
    admin_dsn: str, template_ready: str, tmp_path: Path, record_property: Any
) -> None:
    killed, frozen = await asyncio.gather(
        takeover_scenario(admin_dsn, tmp_path, freeze=False),
        takeover_scenario(admin_dsn, tmp_path, freeze=True),
    )
    record_property("takeover_after_sigkill_s", round(killed["takeover_s"], 2))
    record_property("takeover_after_sigstop_s", round(frozen["takeover_s"], 2))
    print(f"takeover: SIGKILL {killed}, SIGSTOP {frozen}")


RACE_MARGIN_S = 15  # from the replicas' start to the tick they race: time to start all three


async def first_attempt_trouble(pool: asyncpg.Pool, fail: bool) -> None:
    """Writing a snapshot row sleeps (and then fails, with ``fail``) in the sessions of the
    replica that holds the first attempt at a tick, whichever replica won it; later attempts
    and a first attempt no longer running (reaped) go through."""
    failing = "RAISE EXCEPTION 'snapshot storage is failing';" if fail else ""
    await pool.execute(
        f"""CREATE FUNCTION test_first_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF EXISTS (SELECT 1 FROM kontod_runs
                            WHERE attempt = 1 AND status = 'running'
                              AND instance = current_setting('application_name')) THEN
                    PERFORM pg_sleep(1);
                    {failing}
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_first_attempt BEFORE INSERT ON patrimoine_snapshots
                FOR EACH ROW EXECUTE FUNCTION test_first_attempt();"""
    )


async def race_the_tick(pool: asyncpg.Pool, tick: datetime, procs: list[Kontod]) -> None:
    """Hold the run table's inserts from just before ``tick`` until the three replicas all
    wait to insert their claim of it: then two of them lose the insert itself, not a read of a
    run already there."""
    if datetime.now(UTC) > tick - timedelta(seconds=1):
        pytest.fail(f"the replicas were not all started {RACE_MARGIN_S - 1} s after launch")
    await asyncio.sleep((tick - datetime.now(UTC)).total_seconds() - 0.5)
    async with pool.acquire() as gate, gate.transaction():
        # SHARE mode lets reads through and holds every insert. A claim gives up after a
        # third of the lease; the three come within milliseconds of the tick, well inside it.
        await gate.execute("LOCK TABLE kontod_runs IN SHARE MODE")

        async def three_waiting() -> bool:
            waiting: int = await pool.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock'
                      AND query LIKE 'INSERT INTO kontod_runs%'"""
            )
            return waiting == 3

        await wait_until(three_waiting, "the three claims waiting", procs, 5)


def skips_of(k: Kontod, tick: datetime) -> list[dict[str, Any]]:
    """The ``tick.skipped`` lines of one replica for ``tick``."""
    return [
        e
        for e in k.events()
        if e.get("event") == "tick.skipped"
        and e.get("scheduled_for") is not None
        and datetime.fromisoformat(e["scheduled_for"]) == tick
    ]


async def race_scenario(admin_dsn: str, tmp_path: Path, ending: str) -> list[tuple[Any, ...]]:
    """Three replicas race one tick; its owner is then killed (``kill``), frozen (``stop``),
    or fails its attempt and is killed before it can retry (``error``). The tick's attempts,
    as (trigger, attempt, status, whether a survivor ran it)."""
    async with database(admin_dsn) as (dsn, pool):
        users = await seed(pool, 6)
        await first_attempt_trouble(pool, fail=ending == "error")
        tick = (datetime.now(UTC) + timedelta(seconds=RACE_MARGIN_S)).replace(microsecond=0)
        # Daily at that second: yesterday's tick is outside the catch-up window, so nothing
        # runs before this one comes.
        settings = FAST | {
            "KONTOD_SNAPSHOT_SCHEDULE": f"{tick.second} {tick.minute} {tick.hour} * * *",
            "KONTOD_RETRY_DELAY": "3s",
        }
        folder = tmp_path / ending
        folder.mkdir()
        async with (
            kontod(dsn, folder, f"{ending}-a", settings) as a,
            kontod(dsn, folder, f"{ending}-b", settings) as b,
            kontod(dsn, folder, f"{ending}-c", settings) as c,
        ):
            everyone = [a, b, c]
            for k in everyone:
                await k.wait_logged("job.registered", job=JOB, timeout=START_TIMEOUT_S)
            await race_the_tick(pool, tick, everyone)

            async def claimed() -> bool:
                return len(await rows(pool, tick)) == 1

            await wait_until(claimed, "the tick claimed", everyone, 10)
            [first] = await rows(pool, tick)
            owner = next(k for k in everyone if k.log_path.stem == first["instance"])
            survivors = [k for k in everyone if k is not owner]
            # Both others lost the insert, and said so once.
            for k in survivors:
                await k.wait_logged("tick.skipped", job=JOB, timeout=10)
                assert len(skips_of(k, tick)) == 1, k.log()

            if ending == "error":

                async def failed() -> bool:
                    return [r["status"] for r in await rows(pool, tick)] == ["error"]

                await wait_until(failed, "the first attempt failing", everyone, 20)
                owner.proc.send_signal(signal.SIGKILL)
                await pool.execute("DROP TRIGGER test_first_attempt ON patrimoine_snapshots")
            else:

                async def renewed() -> bool:
                    # Two renewals: the others have woken several times meanwhile.
                    [r] = await rows(pool, tick)
                    return bool(r["heartbeat_at"] - r["started_at"] >= timedelta(seconds=3))

                await wait_until(renewed, "the owner's run renewed twice", everyone, 20)
                owner.proc.send_signal(signal.SIGSTOP if ending == "stop" else signal.SIGKILL)
            # New balances: the next attempt rewrites every row, so that a late write of the
            # owner would show.
            await pool.execute("UPDATE bank_accounts SET balance = balance + 1")

            async def succeeded() -> bool:
                return any(r["status"] == "success" for r in await rows(pool, tick))

            await wait_until(succeeded, "a survivor making the tick good", everyone, 30)
            if ending == "stop":
                owner.proc.send_signal(signal.SIGCONT)

                async def woke() -> bool:
                    return any(
                        owner.logged(e) is not None for e in ("run.record_lost", "run.claim_lost")
                    )

                await wait_until(woke, "the frozen owner learning it lost", everyone, 20)
                assert owner.logged("run.finished", status="success", job=JOB) is None, owner.log()
            for k in everyone:
                if k is not owner or ending == "stop":
                    k.proc.send_signal(signal.SIGTERM)
            for k in everyone:
                if k is not owner or ending == "stop":
                    assert await k.wait_exit(20) == 0, k.log()
            # While the owner's run went on, the others waited for its end without trying
            # the tick at every wake: one skip for the race, at most one for the race to take
            # it over.
            for k in survivors:
                assert len(skips_of(k, tick)) <= 2, k.log()

        attempts = await rows(pool, tick)
        assert sum(r["status"] == "success" for r in attempts) == 1
        made_good = next(r for r in attempts if r["status"] == "success")
        # Every snapshot row is the successful attempt's: nothing written late by the owner.
        written = await pool.fetch("SELECT user_id, created_at FROM patrimoine_snapshots")
        assert {r["user_id"] for r in written} == set(users)
        for r in written:
            assert made_good["started_at"] <= r["created_at"] <= made_good["finished_at"], r
        totals = await pool.fetch(
            """SELECT p.total_value = sum(a.balance) AS right
                 FROM patrimoine_snapshots p JOIN bank_accounts a USING (user_id)
                WHERE p.category = 'total' GROUP BY p.user_id, p.total_value"""
        )
        assert len(totals) == len(users) and all(r["right"] for r in totals), totals
        survivor_names = {k.log_path.stem for k in survivors}
        return [
            (r["trigger"], r["attempt"], r["status"], r["instance"] in survivor_names)
            for r in attempts
        ]


async def test_a_tick_raced_by_three_replicas_is_taken_over_when_its_owner_dies_or_freezes(
    admin_dsn: str, template_ready: str, tmp_path: Path
) -> None:
    killed, frozen = await asyncio.gather(
        race_scenario(admin_dsn, tmp_path, "kill"), race_scenario(admin_dsn, tmp_path, "stop")
    )
    expected = [("schedule", 1, "interrupted", False), ("takeover", 2, "success", True)]
    assert killed == expected
    assert frozen == expected


async def test_a_tick_raced_by_three_replicas_is_retried_when_its_failed_owner_died(
    admin_dsn: str, template_ready: str, tmp_path: Path
) -> None:
    attempts = await race_scenario(admin_dsn, tmp_path, "error")
    assert attempts == [("schedule", 1, "error", False), ("retry", 2, "success", True)]


async def fault_scenario(admin_dsn: str, tmp_path: Path, heal_after: int | None) -> list[Any]:
    """A run that fails while a flag is set; the flag is cleared after ``heal_after`` failures."""
    async with database(admin_dsn) as (dsn, pool):
        await seed(pool, 1)
        await pool.execute(
            """CREATE TABLE test_fault (on_ boolean);
               INSERT INTO test_fault VALUES (true);
               CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   IF EXISTS (SELECT 1 FROM test_fault) THEN
                       RAISE EXCEPTION 'snapshot storage is failing';
                   END IF;
                   RETURN NEW;
               END $$;
               CREATE TRIGGER test_fail BEFORE INSERT ON patrimoine_snapshots
                   FOR EACH ROW EXECUTE FUNCTION test_fail();"""
        )
        now = datetime.now(UTC)
        expr = recent_daily(now)
        tick = tick_of(expr, now)
        settings = FAST | {
            "KONTOD_SNAPSHOT_SCHEDULE": expr,
            "KONTOD_RETRY_ATTEMPTS": "2",
            "KONTOD_RETRY_DELAY": "2s",
        }
        name = "healed" if heal_after else "broken"
        async with kontod(dsn, tmp_path, name, settings) as k:

            async def failures(n: int) -> bool:
                errors = sum(r["status"] == "error" for r in await rows(pool, tick))
                return bool(errors >= n)

            await wait_until(lambda: failures(1), "the first failure", [k], START_TIMEOUT_S)
            seen: list[Any] = []

            async def retry_announced() -> bool:
                report = await get_json(k.port, "/health/cron")
                text = await get_json(k.port, "/metrics")
                seen.append((report, metric(text, "kontod_job_next_retry_timestamp_seconds")))
                job = next(j for j in report["jobs"] if j["name"] == JOB)
                return job["nextRetry"] is not None

            # Within the 2 s before the retry, the report says it is due, and when.
            await wait_until(retry_announced, "nextRetry in /health/cron", [k], 2)
            announced, retry_metric = seen[-1]
            job = next(j for j in announced["jobs"] if j["name"] == JOB)
            assert (announced["status"], job["healthy"]) == ("unhealthy", False), announced
            assert "retry due at" in job["reason"], job
            # /metrics says when too, which keeps KontodJobFailed quiet until retries run out.
            due = datetime.fromisoformat(job["nextRetry"].replace("Z", "+00:00"))
            assert retry_metric is not None and abs(retry_metric - due.timestamp()) < 1
            if heal_after:
                await wait_until(lambda: failures(heal_after), "failures", [k], 20)
                await pool.execute("DELETE FROM test_fault")

                async def healed() -> bool:
                    return any(r["status"] == "success" for r in await rows(pool, tick))

                await wait_until(healed, "the retry succeeding", [k], 20)
            else:
                await wait_until(lambda: failures(3), "three failures", [k], 20)
                await asyncio.sleep(2 * 4 + 1)  # past when a fourth attempt would be due
            report = await get_json(k.port, "/health/cron")
            text = await get_json(k.port, "/metrics")
            assert metric(text, "kontod_job_next_retry_timestamp_seconds") is None
            k.proc.send_signal(signal.SIGTERM)
            assert await k.wait_exit(20) == 0, k.log()
        job = next(j for j in report["jobs"] if j["name"] == JOB)
        return [[(r["trigger"], r["attempt"], r["status"]) for r in await rows(pool, tick)], job]


async def test_a_failed_tick_is_retried_until_it_succeeds_or_the_attempts_run_out(
    admin_dsn: str, template_ready: str, tmp_path: Path
) -> None:
    (healed, healed_job), (broken, broken_job) = await asyncio.gather(
        fault_scenario(admin_dsn, tmp_path, heal_after=2),
        fault_scenario(admin_dsn, tmp_path, heal_after=None),
    )
    assert healed == [
        ("catchup", 1, "error"),
        ("retry", 2, "error"),
        ("retry", 3, "success"),
    ]
    assert (healed_job["healthy"], healed_job["nextRetry"]) == (True, None), healed_job
    # Two retries allowed: three attempts, then it stays failed and says so.
    assert broken == [
        ("catchup", 1, "error"),
        ("retry", 2, "error"),
        ("retry", 3, "error"),
    ]
    assert (broken_job["healthy"], broken_job["nextRetry"]) == (False, None), broken_job


@contextmanager
def private_server() -> Iterator[tuple[str, Any]]:
    """A PostgreSQL server of this test's own, to restart or freeze."""
    import pgserver.postgres_server as pgserver

    folder = tempfile.mkdtemp(prefix="kontod-fault-pg-")
    srv: Any = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        yield str(srv.get_uri()), srv
    finally:
        with_children(srv, signal.SIGCONT)
        srv.cleanup()


def pgserver_module(name: str) -> Any:
    """A module of pgserver (it ships no type information)."""
    return importlib.import_module(f"pgserver.{name}")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def with_children(srv: Any, signum: signal.Signals) -> None:
    """Send ``signum`` to the postmaster and every backend of ``srv``."""
    pid = srv.get_pid()
    if pid is None:
        return
    for proc in [pid, *children(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc, signum)


def exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (it exited; whoever adopted it has not reaped it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def restart(srv: Any) -> None:
    """``pg_ctl restart`` of a pgserver server; pgserver then follows the new postmaster, so
    that its clean-up stops it."""
    pg_ctl = pgserver_module("_commands").pg_ctl
    info = pgserver_module("postgres_server").PostmasterInfo
    pg_ctl(
        ["-w", "-m", "fast", "-l", str(srv.log), "restart"],
        pgdata=srv.pgdata,
        user=srv.system_user,
        timeout=30,
    )
    srv._postmaster_info = info.read_from_pgdata(srv.pgdata)


async def migrated_pool(uri: str) -> asyncpg.Pool:
    conn = await asyncpg.connect(uri)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(uri, min_size=1, max_size=2)
    assert pool is not None
    return pool


async def test_a_postgresql_restart_mid_run_loses_no_tick(tmp_path: Path) -> None:
    with private_server() as (uri, srv):
        pool = await migrated_pool(uri)
        users = await seed(pool)
        await slow_for_victim(pool, users[0], seconds=1, also="replica")
        # Ticks 20 s apart: the cut tick's retry (a second after the restart, 4 s of slow
        # batches) comes while it is still the newest tick.
        settings = FAST | {"KONTOD_SNAPSHOT_SCHEDULE": "*/20 * * * * *", "KONTOD_RETRY_DELAY": "1s"}
        try:
            # Only the first run is slow (later ones find their rows unchanged): it is the
            # catch-up at start. Started just after a tick, it leaves the tick the restart
            # cuts the newest for long enough to be made good.
            await asyncio.sleep(20.5 - time.time() % 20)
            async with (
                kontod(uri, tmp_path, "victim", settings) as a,
                kontod(uri, tmp_path, "replica", settings) as b,
            ):
                for k in (a, b):
                    await k.wait_logged("job.registered", job=JOB, timeout=START_TIMEOUT_S)

                async def in_a_run() -> bool:
                    return bool(
                        await pool.fetchval(
                            """SELECT count(*) FROM pg_stat_activity
                            WHERE application_name IN ('victim', 'replica')
                              AND wait_event = 'PgSleep'"""
                        )
                    )

                await wait_until(in_a_run, "a run in its slow batch", [a, b], 40)
                cut = await pool.fetchval("SELECT id FROM kontod_runs WHERE status = 'running'")
                await pool.close()
                await asyncio.to_thread(restart, srv)
                restarted = time.monotonic()
                pool = await asyncpg.create_pool(uri, min_size=1, max_size=2)
                assert pool is not None

                async def ended() -> bool:
                    status: str = await pool.fetchval(
                        "SELECT status FROM kontod_runs WHERE id = $1", cut
                    )
                    return status != "running"

                await wait_until(ended, "the cut run recorded", [a, b], LEASE_S + 10)
                cut_row = await pool.fetchrow("SELECT * FROM kontod_runs WHERE id = $1", cut)
                assert cut_row is not None
                next_tick = cut_row["scheduled_for"] + timedelta(seconds=20)
                if cut_row["finished_at"] > next_tick - timedelta(seconds=8):
                    pytest.fail(f"the cut run ended too close to the next tick: {dict(cut_row)}")

                async def cut_tick_ok() -> bool:
                    # The tick the restart cut is itself made good, not only the ones after.
                    done = await pool.fetchval(
                        """SELECT count(*) FROM kontod_runs WHERE status = 'success'
                            AND scheduled_for = $1 AND attempt > $2""",
                        cut_row["scheduled_for"],
                        cut_row["attempt"],
                    )
                    return bool(done)

                await wait_until(cut_tick_ok, "the cut tick succeeding", [a, b], 20)

                async def next_tick_ok() -> bool:
                    later = await pool.fetchval(
                        """SELECT count(*) FROM kontod_runs WHERE status = 'success'
                            AND scheduled_for > $1""",
                        cut_row["scheduled_for"],
                    )
                    return bool(later)

                await wait_until(next_tick_ok, "the next tick succeeding", [a, b], 40)
                assert time.monotonic() - restarted < 60
                for k in (a, b):
                    k.proc.send_signal(signal.SIGTERM)
                for k in (a, b):
                    assert await k.wait_exit(20) == 0, k.log()
            doubled = await pool.fetch(
                """SELECT scheduled_for FROM kontod_runs WHERE status = 'success'
                    GROUP BY scheduled_for HAVING count(*) > 1"""
            )
            assert doubled == []
            assert cut_row["status"] in ("error", "interrupted"), dict(cut_row)
            assert (
                await pool.fetchval("SELECT count(*) FROM kontod_runs WHERE status = 'running'")
                == 0
            )
        finally:
            await pool.close()


async def test_sigterm_with_the_database_frozen_exits_within_the_bound(
    tmp_path: Path, record_property: Any
) -> None:
    with private_server() as (uri, srv):
        pool = await migrated_pool(uri)
        users = await seed(pool, 12)
        await slow_for_victim(pool, users[0])
        await pool.close()
        settings = FAST | {"KONTOD_SNAPSHOT_SCHEDULE": recent_daily(datetime.now(UTC))}
        async with kontod(uri, tmp_path, "victim", settings) as k:
            await k.wait_logged("run.started", job=JOB, timeout=START_TIMEOUT_S)
            await asyncio.sleep(1)  # inside its slow batch
            with_children(srv, signal.SIGSTOP)  # the database host freezes
            try:
                await asyncio.sleep(1)
                sent = time.monotonic()
                k.proc.send_signal(signal.SIGTERM)
                code = await k.wait_exit(2 + 10 + 5)
                elapsed = time.monotonic() - sent
            finally:
                with_children(srv, signal.SIGCONT)
        assert code == 0, k.log()
        assert elapsed <= 2 + 10, (elapsed, k.log())
        assert k.logged("daemon.stopped") is not None, k.log()
        record_property("shutdown_with_database_frozen_s", round(elapsed, 2))
        print(f"shutdown with the database frozen: {elapsed:.2f} s")


async def test_a_signal_during_start_aborts_it_without_ready(tmp_path: Path) -> None:
    from tests.integration.test_lifecycle import kind
    from tests.integration.test_systemd_notify import Receiver

    # A server that accepts connections and never answers: the start waits on it.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    folder = tempfile.mkdtemp(prefix="kontod-abort-")  # AF_UNIX paths stop at 107 bytes
    receiver = Receiver(f"{folder}/notify").start()
    try:
        port = silent.getsockname()[1]
        settings = {
            "KONTOD_DATABASE_URL": f"postgresql://kontod@127.0.0.1:{port}/konto",
            "NOTIFY_SOCKET": f"{folder}/notify",
        }
        async with kontod("unused", tmp_path, "starting", settings) as k:
            await k.wait_logged("database.external", timeout=START_TIMEOUT_S)
            await asyncio.sleep(0.5)
            sent = time.monotonic()
            k.proc.send_signal(signal.SIGTERM)
            code = await k.wait_exit(10)
            elapsed = time.monotonic() - sent
        assert code == 0, k.log()
        assert elapsed < 6, elapsed  # not the 10 s connect timeout
        assert k.logged("daemon.start_aborted") is not None, k.log()
        kinds = [kind(d) for d in receiver.got()]
        assert "READY" not in kinds, kinds
        assert "STOPPING" in kinds, kinds
    finally:
        receiver.close()
        silent.close()
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_second_signal_still_stops_the_embedded_database(tmp_path: Path) -> None:
    postmaster_info = pgserver_module("postgres_server").PostmasterInfo
    state = Path(tempfile.mkdtemp(prefix="kontod-emb-"))  # short: the socket lives in pgdata
    try:
        settings = {
            "KONTOD_STATE_DIR": str(state),
            "KONTOD_EMBEDDED": "1",
            "KONTOD_SHUTDOWN_TIMEOUT": "60",
            "KONTOD_SNAPSHOT_SCHEDULE": "0 12 1 1 *",
        }
        async with kontod("", tmp_path, "victim", settings) as k:
            await k.wait_logged("job.registered", job=JOB, timeout=START_TIMEOUT_S)
            info = postmaster_info.read_from_pgdata(state / "pgdata")
            assert info is not None
            uri = f"postgresql://postgres@/postgres?host={info.socket_dir}"
            pool = await asyncpg.create_pool(uri, min_size=1, max_size=2)
            assert pool is not None
            try:
                users = await seed(pool, 6)
                await slow_for_victim(pool, users[0])
            finally:
                await pool.close()
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"http://127.0.0.1:{k.port}/jobs/{JOB}/run",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as resp,
            ):
                assert resp.status == 202, await resp.text()
            await k.wait_logged("snapshots.started")
            k.proc.send_signal(signal.SIGTERM)
            await k.wait_logged("runner.waiting")
            k.proc.send_signal(signal.SIGTERM)
            assert await k.wait_exit(30) == 130, k.log()
        assert k.logged("daemon.forced_exit") is not None, k.log()
        # The embedded server was stopped by kontod on its way out, not left behind.
        assert exited(info.pid)
        assert not (state / "pgdata" / "postmaster.pid").exists()  # a clean shutdown
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def test_an_outcome_known_while_the_database_is_frozen_is_written_later() -> None:
    from structlog.testing import capture_logs

    from kontod.scheduler.contract import RunContext
    from kontod.scheduler.runner import Started
    from tests.helpers import close, runner_on, spec

    with private_server() as (uri, srv):
        pool = await migrated_pool(uri)
        await pool.close()

        async def ends_as_the_database_freezes(ctx: RunContext) -> None:
            ctx.counts["items_done"] += 7
            with_children(srv, signal.SIGSTOP)
            # Frozen for longer than a bookkeeping statement may wait (3 s), shorter than the
            # lease (9 s): the first writes of the outcome fail, a later one succeeds.
            asyncio.get_running_loop().call_later(5, with_children, srv, signal.SIGCONT)

        runner, _ = await runner_on(uri, [spec(body=ends_as_the_database_freezes)], lease_s=9)
        try:
            with capture_logs() as logs:
                started = await runner.trigger("test-job", "manual")
                assert isinstance(started, Started)
                assert await asyncio.wait_for(started.task, timeout=30) == "success"
            record = await runner.pool.fetchrow(
                "SELECT status, counts, finished_at FROM kontod_runs"
            )
        finally:
            with_children(srv, signal.SIGCONT)
            await close(runner)
        assert record is not None
        assert record["status"] == "success"
        assert json.loads(record["counts"]) == {"items_done": 7}
        events = [e["event"] for e in logs]
        assert "run.record_failed" in events, events
        assert "run.record_lost" not in events and "run.unrecorded" not in events, events


async def test_a_signal_while_the_embedded_database_starts_leaves_no_server(
    tmp_path: Path,
) -> None:
    state = Path(tempfile.mkdtemp(prefix="kontod-emb-"))  # short: the socket lives in pgdata
    try:
        embedded = {"KONTOD_STATE_DIR": str(state), "KONTOD_EMBEDDED": "1"}
        async with kontod("", tmp_path, "starting", embedded) as k:
            await k.wait_logged("database.embedded", timeout=START_TIMEOUT_S)
            k.proc.send_signal(signal.SIGTERM)  # initdb and pg_ctl are still at work
            assert await k.wait_exit(60) == 0, k.log()
        assert k.logged("daemon.start_aborted") is not None, k.log()
        assert k.logged("job.registered") is None, k.log()
        assert not (state / "pgdata" / "postmaster.pid").exists(), k.log()
    finally:
        shutil.rmtree(state, ignore_errors=True)
