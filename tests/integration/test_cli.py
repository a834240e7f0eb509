"""The kontod command as a user runs it: real processes, real database, real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiohttp import web

from kontod.scheduler.contract import RunContext
from tests.daemon_harness import running_daemon, settings_for
from tests.helpers import add_user, free_port, spec


async def kontod(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("KONTOD_") or k == "KONTOD_DVF_URL"
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod",
        *args,
        env={**clean, "KONTOD_LOG_FORMAT": "json", **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_exit_codes(dsn: str) -> None:
    code, _, err = await kontod("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 2
    assert "cannot reach" in err

    jobs = [spec("daily-snapshots", catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_, base):
        code, out, _ = await kontod("status", "--url", base)
        assert code == 0, out
        assert "daily-snapshots" in out and "never_run" in out
        assert out.strip().endswith("overall: healthy")

    async def boom(ctx: RunContext) -> None:
        raise RuntimeError("nope")

    jobs = [spec("daily-snapshots", boom, catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (daemon, base):
        started = await daemon.runner.trigger("daily-snapshots", "manual")  # type: ignore[union-attr]
        await started.task  # type: ignore[union-attr]
        code, out, _ = await kontod("status", "--url", base)
        assert code == 1
        assert "NO: last run ended with error" in out


async def test_jobs_run_records_the_run_and_exits_by_outcome(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await add_user(conn, accounts=[("checking", "10.5", False)])
        code, out, err = await kontod(
            "jobs",
            "run",
            "daily-snapshots",
            "--verbose",  # the run's log lines, which a command leaves out by default
            env={"KONTOD_DATABASE_URL": dsn, "KONTOD_TIMEZONE": "Europe/Paris"},
        )
        assert code == 0, err
        assert "success" in out
        row = await conn.fetchrow("SELECT trigger, status, counts FROM kontod_runs")
        assert row is not None
        assert (row["trigger"], row["status"]) == ("manual", "success")
        assert json.loads(row["counts"])["users"] == 1
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        run_lines = [line for line in lines if line.get("run_id")]
        assert run_lines and all(line["job"] == "daily-snapshots" for line in run_lines)
        assert {"run.started", "run.finished"} <= {line["event"] for line in run_lines}

        # The job fails for real: the database refuses every snapshot row, and the balance
        # changed so that a row must be written (an unchanged day writes nothing). A missing
        # table would stop kontod before the run, with exit 2: see test_konto_webapp.
        await conn.execute("UPDATE bank_accounts SET balance = balance + 1")
        await conn.execute(
            "ALTER TABLE patrimoine_snapshots ADD CONSTRAINT refuse CHECK (false) NOT VALID"
        )
        code, out, _ = await kontod(
            "jobs", "run", "daily-snapshots", env={"KONTOD_DATABASE_URL": dsn}
        )
        assert code == 1
        assert "error" in out
        await conn.execute("ALTER TABLE patrimoine_snapshots DROP CONSTRAINT refuse")

        code, _, err = await kontod("jobs", "run", "nope", env={"KONTOD_DATABASE_URL": dsn})
        assert code == 2
        assert "daily-snapshots" in err
    finally:
        await conn.close()


async def test_history_lists_rows_per_date(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        uid = await add_user(conn)
        today = datetime.now(UTC).date()
        for days_ago, category in ((0, "total"), (0, "checking"), (1, "total"), (30, "total")):
            await conn.execute(
                "INSERT INTO patrimoine_snapshots (date, user_id, category, total_value)"
                " VALUES ($1, $2, $3, 1)",
                today - timedelta(days=days_ago),
                uid,
                category,
            )
    finally:
        await conn.close()
    env = {"KONTOD_DATABASE_URL": dsn, "KONTOD_TIMEZONE": "UTC", "KONTOD_BASE_CURRENCY": "CHF"}
    code, out, _ = await kontod("history", "--days", "7", env=env)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["DATE", "ROWS", "USERS", "TOTAL", "CHF"]
    assert lines[1].split() == [today.isoformat(), "2", "1", "1.00"]
    assert lines[2].split() == [(today - timedelta(days=1)).isoformat(), "1", "1", "1.00"]
    assert len(lines) == 3


async def test_migrate_then_run_logs_registration_first_and_exits_0_on_sigterm(dsn: str) -> None:
    code, _, err = await kontod("migrate", env={"KONTOD_DATABASE_URL": dsn})
    assert code == 0, err
    port = free_port()
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("KONTOD_") or k == "KONTOD_DVF_URL"
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod",
        "run",
        env={
            **clean,
            "KONTOD_DATABASE_URL": dsn,
            "KONTOD_LISTEN": f"127.0.0.1:{port}",
            "KONTOD_LOG_FORMAT": "json",
            "KONTOD_TIMEZONE": "Asia/Tokyo",
        },
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while (
            "http.listening" not in [e["event"] for e in events]
            or len([e for e in events if e["event"] == "job.registered"]) < 1
        ):
            line = await proc.stderr.readline()
            events.append(json.loads(line))
    proc.terminate()
    await proc.communicate()
    assert proc.returncode == 0
    assert events[0]["event"] == "database.external"
    assert "password" not in json.dumps(events)
    registered = [e for e in events if e["event"] == "job.registered"]
    assert registered[0]["job"] == "daily-snapshots"
    assert registered[0]["schedule"] == "0 2 * * *"
    assert registered[0]["timezone"] == "Asia/Tokyo"
    assert registered[0]["next_run"].endswith("T17:00:00+00:00")  # 02:00 in Tokyo


HOSTILE = "bank said \x1b]0;pwned\x07\x1b[31mred\x1b[0m\rover\u202etxt.exe\x00"
SHOWN = r"bank said \x1b]0;pwned\x07\x1b[31mred\x1b[0m\rover\u202etxt.exe\x00"


def no_controls(text: str) -> bool:
    """True when ``text`` holds no control character but line ends."""
    return not any(
        (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in text
    )


async def test_data_reaches_the_terminal_with_its_control_characters_escaped(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO kontod_runs (job, trigger, started_at, finished_at, status, error,
                                        instance, lease_until, requested_by, request_reason)
               VALUES ('daily-snapshots', 'manual', now(), now(), 'error', $1, 'kontod-x',
                       now(), $2, $3)""",
            HOSTILE.replace("\x00", ""),  # PostgreSQL's text holds no NUL
            "cli:\x1b[2Jops@host",
            "after\nthe upgrade",
        )
    finally:
        await conn.close()
    env = {"KONTOD_DATABASE_URL": dsn, "KONTOD_TIMEZONE": "Europe/Paris"}
    code, out, err = await kontod("runs", "daily-snapshots", env=env)
    assert code == 0, err
    assert no_controls(out), repr(out)
    assert SHOWN.replace(r"\x00", "") in out
    assert r"cli:\x1b[2Jops@host (after\nthe upgrade)" in out

    code, out, err = await kontod(
        "jobs", "pause", "daily-snapshots", "--reason", "maintenance \x1b[5mblink", env=env
    )
    assert code == 0, err
    assert no_controls(out) and r"maintenance \x1b[5mblink" in out

    # A daemon's answer is data too: the pause reason as kontod status shows it.
    jobs = [spec("daily-snapshots", catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_, base):
        code, out, err = await kontod("status", "--url", base)
    assert code == 0, out + err
    assert no_controls(out), repr(out)
    assert r"paused by cli:" in out and r"maintenance \x1b[5mblink" in out


async def test_a_real_password_appears_nowhere_in_what_kontod_writes(dsn: str) -> None:
    """A database role with a password (and a space in its name) and a ping URL full of
    secrets, through the commands and the daemon: none of them is printed or logged."""
    role = f"kontod ops {uuid.uuid4().hex[:6]}"
    password = f"pw-{uuid.uuid4().hex}"
    ping_secrets = ["pinguser", "pingpass-4c1d", "check-8e0f", "qkey-77a2"]

    # A ping service that answers 404 quoting what it was asked for, as error pages do.
    async def echo(request: web.Request) -> web.Response:
        return web.Response(status=404, text=f"no check at {request.raw_path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    service = web.AppRunner(app)
    await service.setup()
    ping_port = free_port()
    await web.TCPSite(service, "127.0.0.1", ping_port).start()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE ROLE \"{role}\" LOGIN SUPERUSER PASSWORD '{password}'")
        parts = urlsplit(dsn)
        secret_dsn = urlunsplit(
            parts._replace(netloc=f"{role}:{password}@{parts.netloc.rpartition('@')[2]}")
        )
        env = {
            "KONTOD_DATABASE_URL": secret_dsn,
            "KONTOD_LOG_LEVEL": "debug",
            "KONTOD_PING_URL_DAILY_SNAPSHOTS": (
                f"http://pinguser:pingpass-4c1d@127.0.0.1:{ping_port}/check-8e0f?k=qkey-77a2"
            ),
        }
        written: list[str] = []
        for args in (
            ("migrate",),
            ("jobs", "run", "daily-snapshots"),
            ("runs", "daily-snapshots"),
        ):
            code, out, err = await kontod(*args, env=env)
            assert code in (0, 1), err
            written += [out, err]
        # The commands worked through the role: its run is recorded.
        assert await conn.fetchval("SELECT count(*) FROM kontod_runs") == 1
        # A bad setting names the DSN, masked.
        code, _, err = await kontod(
            "migrate", env={**env, "KONTOD_DATABASE_URL": secret_dsn.replace("postgresql", "mysql")}
        )
        assert code == 2 and "KONTOD_DATABASE_URL" in err
        written.append(err)
        # The daemon's first lines: where the database is, and every line after until it stops.
        code, err = await run_until_listening({**env, "KONTOD_LISTEN": f"127.0.0.1:{free_port()}"})
        assert code == 0, err
        written.append(err)
    finally:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await conn.execute(f'DROP OWNED BY "{role}"')
        await conn.execute(f'DROP ROLE "{role}"')
        await conn.close()
        await service.cleanup()
    everything = "\n".join(written)
    for secret in [password, *ping_secrets]:
        assert secret not in everything, secret
    # ... and the lines that would have shown them were written.
    assert "database.external" in everything and "***@" in everything
    assert "ping.failed" in everything and "HTTP 404: no check at /***" in everything


async def run_until_listening(env: dict[str, str]) -> tuple[int, str]:
    """Start ``kontod run``, stop it with SIGTERM once it listens; its exit status and stderr."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("KONTOD_") or k == "KONTOD_DVF_URL"
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod",
        "run",
        env={**clean, "KONTOD_LOG_FORMAT": "json", **env},
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(60):
        while not lines or "http.listening" not in lines[-1]:
            line = (await proc.stderr.readline()).decode()
            assert line, "".join(lines)
            lines.append(line)
    proc.terminate()
    _, rest = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, "".join(lines) + rest.decode()


async def test_a_pause_until_the_end_of_time_is_refused_with_a_message(dsn: str) -> None:
    env = {"KONTOD_DATABASE_URL": dsn, "KONTOD_TIMEZONE": "Europe/Paris"}
    for until in ("9999-12-31T23:59:59-01:00", "99999999999999d", "9" * 5000 + "d", "9500-01-01"):
        code, out, err = await kontod(
            "jobs", "pause", "daily-snapshots", "--reason", "x", "--until", until, env=env
        )
        assert code == 2, out + err
        assert "Traceback" not in err
        assert err.startswith("kontod: ") and ("--until" in err or "until must be before" in err)
    code, out, err = await kontod("jobs", "resume", "daily-snapshots", env=env)
    assert (code, out.strip()) == (0, "daily-snapshots: was not paused"), err
