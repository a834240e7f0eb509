"""``kontod demo`` and ``make demo`` as a newcomer meets them: a real demo process, the commands
and the ``curl`` line it prints run as printed, a restart, and the interpreter check."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kontod.demo import state
from kontod.demo.rates_sandbox import RateSandbox

ROOT = Path(__file__).resolve().parents[2]
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith(("KONTOD_", "DATABASE_URL"))}


@dataclass
class Demo:
    proc: asyncio.subprocess.Process
    printed: list[str] = field(default_factory=list)  # what it says to people
    events: list[dict[str, Any]] = field(default_factory=list)  # its log lines

    def line(self, start: str) -> str:
        return next(line for line in self.printed if line.startswith(start))

    def exported(self) -> dict[str, str]:
        return dict(word.split("=", 1) for word in shlex.split(self.line("export "))[1:])


@contextlib.asynccontextmanager
async def demo(state_dir: Path, **settings: str) -> AsyncIterator[Demo]:
    """``kontod demo`` on ``state_dir``, once it has printed what to try; stopped after."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontod",
        "demo",
        env={
            **CLEAN,
            "KONTOD_STATE_DIR": str(state_dir),
            "KONTOD_LISTEN": "127.0.0.1:0",
            "KONTOD_LOG_FORMAT": "json",
            **settings,
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    d = Demo(proc)
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(90):
            while not d.printed or d.printed[-1] != "Ctrl-C stops it.":
                line = (await proc.stderr.readline()).decode()
                assert line, "the demo ended before printing its commands:\n" + "".join(seen)
                seen.append(line)
                if line.startswith("{"):
                    d.events.append(json.loads(line))
                else:
                    d.printed.append(line.strip())
        yield d
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.communicate(), timeout=60)


async def run_printed(line: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run a command line the demo printed, as a shell would (no variables in it)."""
    proc = await asyncio.create_subprocess_exec(
        *shlex.split(line),
        env={**CLEAN, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def warnings(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("level") in ("warning", "error", "critical")]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A state folder outside pytest's own, which concurrent pytest runs make private again
    (0700) while pgserver's user needs to pass through."""
    folder = Path(tempfile.mkdtemp(prefix="kontod-demo-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_the_demo_prints_commands_that_work_and_keeps_its_ports(state_dir: Path) -> None:
    tmp_path = state_dir
    kontod = str(Path(sys.executable).parent / "kontod")
    # The snapshot's tick was two minutes ago: the daemon catches it up as it starts.
    tick = datetime.now(UTC) - timedelta(minutes=2)
    schedule = {"KONTOD_TIMEZONE": "UTC", "KONTOD_SNAPSHOT_SCHEDULE": f"{tick:%M %H} * * *"}
    async with demo(tmp_path, **schedule) as first:
        # One run of each job at start, the catch-up where there is one, and no warning: the
        # demo's own run of the snapshot used to race the catch-up (tick.skipped overlap).
        assert warnings(first.events) == []
        started = [(e["job"], e["trigger"]) for e in first.events if e["event"] == "run.started"]
        assert ("daily-snapshots", "catchup") in started
        assert sorted(job for job, _ in started) == [
            "daily-snapshots",
            "prune-audit-log",
            "refresh-property-estimations",
            "refresh-stale-connections",
        ]
        env = first.exported()
        assert env["KONTOD_STATE_DIR"] == str(tmp_path / "demo")
        # The commands name the venv's kontod: they work from a shell without it on PATH.
        commands = [line for line in first.printed if line.startswith(kontod + " ")]
        assert {f"{kontod} history", f"{kontod} runs", f"{kontod} jobs list"} <= set(commands)
        outputs = {}
        for command in (f"{kontod} history", f"{kontod} runs", f"{kontod} jobs list"):
            code, outputs[command], err = await run_printed(command, env)
            # Nothing on stderr: no database.embedded line, no line at all.
            assert (code, err) == (0, ""), command
        header, today = outputs[f"{kontod} history"].splitlines()[:2]
        assert header.split()[:3] == ["DATE", "ROWS", "USERS"] and today.split()[2] == "3"
        assert "users=3" in outputs[f"{kontod} runs"]
        assert "refresh-stale-connections" in outputs[f"{kontod} runs"]
        assert len(outputs[f"{kontod} jobs list"].splitlines()) == 6  # the zone, a header, 4 jobs

        # The admin token works with the curl line as printed.
        token = first.line("admin token (HTTP runs and pauses): ").rsplit(" ", 1)[1]
        assert (tmp_path / "demo" / state.TOKEN_FILE).read_text().strip() == token
        curl = first.line("curl ")
        assert f'"Authorization: Bearer {token}"' in curl
        code, out, err = await run_printed(curl.replace("curl ", "curl -sS ", 1), {})
        assert code == 0, err
        run_id = json.loads(out)["runId"]
        code, out, _ = await run_printed(f"{kontod} runs --json", env)
        [asked] = [r for r in json.loads(out) if r["id"] == run_id]
        assert (asked["requestedBy"], asked["reason"]) == ("http 127.0.0.1", "trying the demo")

    # A restart serves the sandboxes on the same ports: the printed export line still holds.
    async with demo(tmp_path, **schedule) as second:
        assert warnings(second.events) == []
        assert second.exported() == env
        assert second.line("admin token") == first.line("admin token")


async def test_a_sandbox_port_is_kept_while_free_and_replaced_when_taken(tmp_path: Path) -> None:
    rates = RateSandbox()
    async with contextlib.AsyncExitStack() as stack:
        url = await state.serve_on(stack, lambda port: rates.serve(port=port), "rates", None)
        port = state.port_of(url)
    state.save_ports(tmp_path, {"rates": port})
    assert state.saved_ports(tmp_path) == {"rates": port}
    async with contextlib.AsyncExitStack() as stack:
        again = await state.serve_on(stack, lambda p: rates.serve(port=p), "rates", port)
        assert state.port_of(again) == port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        async with contextlib.AsyncExitStack() as stack:
            moved = await state.serve_on(stack, lambda p: rates.serve(port=p), "rates", port)
            assert state.port_of(moved) != port
    # A file the demo did not write is ignored, not a reason to stop.
    (tmp_path / state.PORTS_FILE).write_text("not json")
    assert state.saved_ports(tmp_path) == {}


def pick(*args: str, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "pick-python"), *args],
        env={**CLEAN, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_make_demo_picks_a_python_pgserver_has_a_build_for(tmp_path: Path) -> None:
    """With real interpreters: this one (3.11 or 3.12, the suite's) and one pgserver has no
    build for, named python3 on a PATH of their own."""
    others = sorted(Path.home().glob(".pyenv/versions/3.1[3-9]*/bin/python3.1[3-9]"))
    others += sorted(Path("/usr/bin").glob("python3.1[3-9]"))
    assert others, "the test needs a Python 3.13 or later installed beside this one"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(others[0])
    (bin_dir / f"python3.{sys.version_info[1]}").symlink_to(sys.executable)
    path = f"{bin_dir}:/usr/bin:/bin"

    picked = pick(path=path)
    assert picked.returncode == 0, picked.stderr
    assert picked.stdout.strip() == f"python3.{sys.version_info[1]}"
    assert "python3 is Python 3.1" in picked.stderr and "has no build for it" in picked.stderr

    # Without a supported one: why, and how to name one, before anything is installed.
    (bin_dir / f"python3.{sys.version_info[1]}").unlink()
    refused = pick("python3", path=f"{bin_dir}:/nonexistent")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "has no build for it" in refused.stderr
    assert "make demo PYTHON=" in refused.stderr
    # An existing venv made with it is refused alone, without a fallback.
    alone = pick("--only", str(bin_dir / "python3"), path=path)
    assert alone.returncode == 1 and "has no build for it" in alone.stderr
