"""The notify protocol against a real AF_UNIX datagram socket, playing systemd's receiving end."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from kontod.ops.systemd import Notifier


@dataclass(frozen=True)
class Datagram:
    at: float  # time.monotonic() when it was read
    text: str
    pid: int  # the sender, as the kernel vouches for it (what NotifyAccess=main checks)


_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Receiver:
    """A bound SOCK_DGRAM socket read by a thread, so arrival times stay true while the loop
    under test is blocked. Like systemd, it asks the kernel for each sender's pid."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.05)
        self._got: list[Datagram] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-receiver", daemon=True)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(_CREDS.size))
            except TimeoutError:
                continue
            pid = 0
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = _CREDS.unpack(payload[: _CREDS.size])[0]
            with self._changed:
                self._got.append(Datagram(time.monotonic(), data.decode(), pid))
                self._changed.notify_all()

    def got(self) -> list[Datagram]:
        with self._changed:
            return list(self._got)

    def wait_for_text(self, text: str, timeout: float = 5.0) -> None:
        """Wait until a datagram reading ``text`` has arrived."""
        with self._changed:
            self._changed.wait_for(lambda: any(d.text == text for d in self._got), timeout=timeout)
            texts = [d.text for d in self._got]
        assert text in texts, f"expected {text!r}, got {texts}"

    def wait_for(self, count: int, timeout: float = 5.0) -> list[str]:
        """The texts of the first ``count`` datagrams, waiting for them to arrive."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._got) >= count, timeout=timeout)
            texts = [d.text for d in self._got]
        assert len(texts) >= count, f"expected {count} datagrams, got {texts}"
        return texts[:count]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="kontod-notify-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[tuple[Receiver, str]]:
    """A receiving socket and the NOTIFY_SOCKET value that names it."""
    if request.param == "path":
        path = str(short_dir / "notify.sock")
        bind_to, env_value = path, path
    else:
        name = f"kontod-test-{uuid.uuid4().hex}"
        bind_to, env_value = "\0" + name, "@" + name
    receiver = Receiver(bind_to).start()
    try:
        yield receiver, env_value
    finally:
        receiver.close()


def watchdog_env(notify_socket: str, usec: int) -> dict[str, str]:
    return {
        "NOTIFY_SOCKET": notify_socket,
        "WATCHDOG_USEC": str(usec),
        "WATCHDOG_PID": str(os.getpid()),
    }


async def test_without_notify_socket_nothing_happens() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "30000000"})

    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    notifier.ready("running")
    notifier.status("idle")
    notifier.watchdog_ping()
    notifier.stopping()
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run_watchdog(stop))
    await asyncio.sleep(0.05)
    assert not task.done(), "run_watchdog must live until stop is set, like the other side tasks"
    stop.set()
    await asyncio.wait_for(task, timeout=5)


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_env().enabled
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    assert Notifier.from_env().enabled


def test_relative_notify_socket_is_refused() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "notify.sock"})
    assert not notifier.enabled
    assert [e["event"] for e in logs] == ["systemd.notify_socket_unsupported"]


def test_messages_reach_the_socket(notify: tuple[Receiver, str]) -> None:
    receiver, address = notify
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})

    notifier.ready("2 jobs scheduled;\nnext snapshot at 02:00")
    notifier.status("refresh running")
    notifier.stopping()

    assert receiver.wait_for(3) == [
        "READY=1\nSTATUS=2 jobs scheduled; next snapshot at 02:00",
        "STATUS=refresh running",
        "STOPPING=1\nSTATUS=stopping",
    ]
    assert {d.pid for d in receiver.got()} == {os.getpid()}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 15.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "<self>"}, 0.25),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<parent>"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    pids = {"<self>": str(os.getpid()), "<parent>": str(os.getppid())}
    env = {key: pids.get(value, value) for key, value in env.items()}
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env})

    assert notifier.watchdog_interval() == expected


async def test_watchdog_of_another_pid_sends_nothing(notify: tuple[Receiver, str]) -> None:
    receiver, address = notify
    env = watchdog_env(address, 100_000) | {"WATCHDOG_PID": str(os.getppid())}
    notifier = Notifier.from_env(env)

    notifier.watchdog_ping()
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run_watchdog(stop))
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    notifier.status("marker")

    # The marker went out after everything else, so once it is in nothing else is in flight.
    assert receiver.wait_for(1) == ["STATUS=marker"]
    assert len(receiver.got()) == 1


async def test_watchdog_pings_at_half_the_timeout(notify: tuple[Receiver, str]) -> None:
    receiver, address = notify
    notifier = Notifier.from_env(watchdog_env(address, 400_000))  # pings every 0.2 s
    assert notifier.watchdog_interval() == pytest.approx(0.2)

    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run_watchdog(stop))
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    stopped_at = time.monotonic()
    # The marker is sent after the last ping: once it is read, every ping has been read too.
    notifier.status("marker")
    receiver.wait_for_text("STATUS=marker")

    pings = [d for d in receiver.got() if d.text == "WATCHDOG=1"]
    # About 10 in 2 s; the bounds leave room for a slow machine.
    assert 6 <= len(pings) <= 13, pings
    gaps = sorted(b.at - a.at for a, b in itertools.pairwise(pings))
    median = gaps[len(gaps) // 2]
    assert 0.1 <= median <= 0.4, gaps
    assert all(d.at <= stopped_at + 0.1 for d in pings), "a ping arrived after stop was set"


async def test_blocked_loop_stops_the_pings(notify: tuple[Receiver, str]) -> None:
    receiver, address = notify
    notifier = Notifier.from_env(watchdog_env(address, 200_000))  # pings every 0.1 s

    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run_watchdog(stop))
    await asyncio.sleep(0.6)
    blocked_from = time.monotonic()
    time.sleep(1.5)  # noqa: ASYNC251 -- blocking the event loop is the point of this test
    blocked_until = time.monotonic()
    await asyncio.sleep(0.6)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    # The marker is sent after the last ping: once it is read, every ping has been read too.
    notifier.status("marker")
    receiver.wait_for_text("STATUS=marker")

    pings = [d.at for d in receiver.got() if d.text == "WATCHDOG=1"]
    before = [t for t in pings if t < blocked_from]
    # A ping sent just before the block may be read a moment into it.
    during = [t for t in pings if blocked_from + 0.2 <= t <= blocked_until]
    after = [t for t in pings if t > blocked_until]
    assert len(before) >= 3, pings
    assert during == [], "pings went on while the event loop was blocked"
    assert len(after) >= 3, "pings did not resume once the loop was free"
    longest_gap = max(b - a for a, b in itertools.pairwise(pings))
    assert longest_gap >= 1.2, pings


def test_send_errors_are_logged_once_and_recover(short_dir: Path) -> None:
    path = short_dir / "notify.sock"  # nothing listens there yet
    notifier = Notifier.from_env(watchdog_env(str(path), 30_000_000))

    with capture_logs() as logs:
        notifier.ready("up")
        notifier.watchdog_ping()
        notifier.watchdog_ping()
    assert [e["event"] for e in logs] == ["systemd.notify_failed"]
    assert logs[0]["field"] == "READY"

    receiver = Receiver(str(path)).start()
    try:
        with capture_logs() as logs:
            notifier.watchdog_ping()
        assert receiver.wait_for(1) == ["WATCHDOG=1"]
        assert [e["event"] for e in logs] == ["systemd.notify_recovered"]
    finally:
        receiver.close()


def test_a_manager_that_does_not_read_never_blocks_the_sender(short_dir: Path) -> None:
    path = str(short_dir / "notify.sock")
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(path)  # bound, never read: its queue fills up
    notifier = Notifier.from_env(watchdog_env(path, 30_000_000))

    def flood() -> None:
        for _ in range(2000):
            notifier.watchdog_ping()

    try:
        with capture_logs() as logs:
            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            sender.join(timeout=10)
        assert not sender.is_alive(), "a send blocked on the full socket queue"
        assert [e["event"] for e in logs] == ["systemd.notify_failed"]
    finally:
        deaf.close()
