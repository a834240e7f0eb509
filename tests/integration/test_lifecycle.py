"""kontod run as a real process, with the test playing systemd's part of the notify protocol."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import quiet_schedule
from tests.integration.test_systemd_notify import Datagram, Receiver
from tests.programs import kontod_script

WATCHDOG_USEC = 1_000_000  # kontod should ping every 0.5 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def kind(d: Datagram) -> str:
    """READY, WATCHDOG, STOPPING or STATUS: the first assignment of the message."""
    return d.text.split("=", 1)[0]


def health(port: int) -> int:
    """The status code of one GET /health, without retrying; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture
def manager() -> Iterator[tuple[Receiver, str]]:
    """systemd's notify socket: a bound datagram socket and its path for NOTIFY_SOCKET."""
    folder = tempfile.mkdtemp(prefix="kontod-life-")  # short: AF_UNIX paths stop at 107 bytes
    path = os.path.join(folder, "notify")
    receiver = Receiver(path).start()
    try:
        yield receiver, path
    finally:
        receiver.close()
        shutil.rmtree(folder, ignore_errors=True)


def logged(path: Path) -> str:
    """What kontod wrote, for failure messages."""
    return path.read_text()


def kontod_env(dsn: str, port: int, notify_socket: str, state_dir: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KONTOD_", "NOTIFY_", "WATCHDOG_"))
        and key not in ("DATABASE_URL", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")
    }
    return env | {
        "KONTOD_DATABASE_URL": dsn,
        "KONTOD_LISTEN": f"127.0.0.1:{port}",
        "KONTOD_STATE_DIR": str(state_dir),
        "KONTOD_TIMEZONE": "UTC",
        "KONTOD_LOG_FORMAT": "json",
        # No catch-up run at any time of day: the test is about the process, not a job.
        "KONTOD_SNAPSHOT_SCHEDULE": quiet_schedule(),
        "KONTOD_REFRESH_SCHEDULE": quiet_schedule(),
        "NOTIFY_SOCKET": notify_socket,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }


async def test_ready_watchdog_stopping_in_order(
    dsn: str, manager: tuple[Receiver, str], tmp_path: Path
) -> None:
    receiver, notify_socket = manager
    port = free_port()
    log_path = tmp_path / "kontod.log"
    with log_path.open("w") as log_file:
        proc = await asyncio.create_subprocess_exec(
            kontod_script(),
            "run",
            env=kontod_env(dsn, port, notify_socket, tmp_path / "state"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = await wait_for_ready(receiver, proc, log_path)
        # The first request after READY=1, not retried: the port must already be bound and the
        # database answering when kontod says it is ready.
        assert await asyncio.to_thread(health, port) == 200, logged(log_path)
        assert "scheduled" in ready.text, ready.text

        await asyncio.sleep(2.2)  # about four pings
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=40)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert code == 0, logged(log_path)
    got = receiver.got()
    kinds = [kind(d) for d in got]
    assert kinds[0] == "READY", kinds
    assert "STOPPING" in kinds, kinds
    stopping = kinds.index("STOPPING")
    assert kinds[1:stopping].count("WATCHDOG") >= 3, kinds
    assert "READY" not in kinds[1:], kinds
    # NotifyAccess=main: systemd would drop anything not sent by kontod's own pid.
    assert {d.pid for d in got} == {proc.pid}


async def wait_for_ready(
    receiver: Receiver, proc: asyncio.subprocess.Process, log_path: Path
) -> Datagram:
    """The READY=1 datagram; fails with kontod's log if it exits or takes over 60 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for d in receiver.got():
            if kind(d) == "READY":
                return d
        if proc.returncode is not None:
            pytest.fail(f"kontod exited with {proc.returncode} before READY=1:\n{logged(log_path)}")
        # The datagrams arrive on the receiver's thread; a short sleep is the simplest join.
        await asyncio.sleep(0.05)
    pytest.fail(f"no READY=1 from kontod within 60 s:\n{logged(log_path)}")
