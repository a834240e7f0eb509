"""systemd's notify protocol (``sd_notify``): readiness, status, watchdog pings and stopping.

A message is one datagram of ``KEY=value`` lines sent to the ``AF_UNIX`` socket named by
``NOTIFY_SOCKET``. Without that variable (not started by systemd with ``Type=notify``) every
method does nothing. A failed send is logged, never raised: losing a status line must not stop
the jobs, and a lost watchdog ping is exactly what systemd is there to notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("kontod.systemd")


class Notifier:
    """Talks to the service manager named by ``NOTIFY_SOCKET``; a no-op when there is none."""

    def __init__(self, address: bytes | None, watchdog_usec: int | None = None) -> None:
        """``address`` is a socket path, or a NUL byte then a name for the abstract namespace."""
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._failing = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from ``env`` (``os.environ``)."""
        env = os.environ if env is None else env
        return cls(_parse_address(env.get("NOTIFY_SOCKET", "")), _parse_watchdog(env))

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (``NOTIFY_SOCKET`` was usable)."""
        return self._address is not None

    def ready(self, status: str) -> None:
        """Startup is complete: systemd marks the unit started and arms the watchdog."""
        self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        """A one-line state shown by ``systemctl status``."""
        self._send(f"STATUS={_one_line(text)}")

    def stopping(self) -> None:
        """Shutdown has begun; systemd then waits up to ``TimeoutStopSec=``."""
        self._send("STOPPING=1\nSTATUS=stopping")

    def watchdog_ping(self) -> None:
        """Tell systemd the process is alive; does nothing when the watchdog is off."""
        if self.watchdog_interval() is not None:
            self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of ``WATCHDOG_USEC``), or None when no watchdog is armed."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    async def run_watchdog(self, stop: asyncio.Event) -> None:
        """Ping every interval until ``stop`` is set.

        The pings come from the event loop itself, so a loop blocked by a stuck call stops them
        and systemd kills and restarts kontod. Without a watchdog it just waits for ``stop``,
        so it can be supervised like the other long-lived tasks.
        """
        interval = self.watchdog_interval()
        if interval is None:
            await stop.wait()
            return
        while not stop.is_set():
            self.watchdog_ping()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never wait on a full receive queue: this runs on the event loop.
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            # One line when sending starts failing, not one per ping.
            if not self._failing:
                log.warning(
                    "systemd.notify_failed",
                    field=message.split("=", 1)[0],
                    socket=_show(self._address),
                    error=str(exc),
                )
            self._failing = True
            return
        if self._failing:
            log.info("systemd.notify_recovered", socket=_show(self._address))
            self._failing = False


def _parse_address(raw: str) -> bytes | None:
    if not raw:
        return None
    if raw.startswith("@"):
        # The abstract namespace: a leading NUL byte instead of the "@".
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return os.fsencode(raw)
    log.warning(
        "systemd.notify_socket_unsupported",
        notify_socket=raw,
        accepted="an absolute path or @name (abstract socket); notifications are off",
    )
    return None


def _parse_watchdog(env: Mapping[str, str]) -> int | None:
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if not _is_uint(usec) or int(usec) == 0:
        log.warning(
            "systemd.watchdog_usec_invalid", watchdog_usec=usec, accepted="microseconds above 0"
        )
        return None
    if pid:
        # The manager sets WATCHDOG_PID to the pid it watches; a child that inherited the
        # variables (or a process started by kontod) must not ping on its behalf.
        if not _is_uint(pid):
            log.warning("systemd.watchdog_pid_invalid", watchdog_pid=pid, accepted="a process id")
            return None
        if int(pid) != os.getpid():
            return None
    return int(usec)


def _is_uint(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _one_line(text: str) -> str:
    # The message is newline-separated assignments: a newline would start a new one.
    return " ".join(text.split())


def _show(address: bytes) -> str:
    text = os.fsdecode(address)
    return "@" + text[1:] if text.startswith("\0") else text
