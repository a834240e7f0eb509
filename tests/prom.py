"""Real Prometheus and Alertmanager processes on loopback, and a webhook that collects alerts.

Each is an async context manager: the process gets a temporary folder, a free port and a
config written as JSON (which both programs read as YAML), and is stopped at exit. The
programs come from Debian's ``prometheus`` and ``prometheus-alertmanager`` packages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.programs import require_program

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

Notification = dict[str, Any]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ProgramFailed(Exception):
    """A program exited or never became ready; the message carries the end of its log."""


@dataclass
class Prometheus:
    """A running Prometheus: its base URL, its folder and an HTTP session to query it."""

    url: str
    folder: Path
    session: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful ``/api/v1`` answer; raises with the error otherwise."""
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise AssertionError(f"/api/v1/{path} {params}: {body.get('error', body)}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The series of an instant query (vector results; a scalar comes back as one row)."""
        data = await self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def rules(self) -> list[dict[str, Any]]:
        """Every rule Prometheus loaded, with its group name under ``group``."""
        data = await self.api("rules")
        out: list[dict[str, Any]] = []
        for group in data["groups"]:
            for rule in group["rules"]:
                out.append({**rule, "group": group["name"]})
        return out


@dataclass
class Webhook:
    """An Alertmanager webhook receiver; every notification it got, in order."""

    url: str
    notifications: list[Notification] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def _receive(self, request: web.Request) -> web.Response:
        payload = await request.json()
        async with self._changed:
            self.notifications.append(payload)
            self._changed.notify_all()
        return web.Response(text="ok")

    async def wait_for_alert(
        self,
        alertname: str,
        status: str,
        labels: Mapping[str, str] | None = None,
        *,
        timeout: float,
        after: int = 0,
    ) -> dict[str, Any]:
        """The first alert named ``alertname`` with ``status`` (firing/resolved) and ``labels``.

        Only notifications from index ``after`` on are considered; raises TimeoutError with
        what did arrive when none matches within ``timeout`` seconds.
        """

        def match() -> dict[str, Any] | None:
            for note in self.notifications[after:]:
                for alert in note.get("alerts", []):
                    got = alert.get("labels", {})
                    if (
                        got.get("alertname") == alertname
                        and alert.get("status") == status
                        and all(got.get(k) == v for k, v in (labels or {}).items())
                    ):
                        return dict(alert)
            return None

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: match() is not None)
        except TimeoutError:
            seen = [
                (a.get("labels", {}).get("alertname"), a.get("status"), a.get("labels"))
                for n in self.notifications[after:]
                for a in n.get("alerts", [])
            ]
            raise TimeoutError(
                f"no {status} {alertname} {dict(labels or {})} within {timeout} s; got {seen}"
            ) from None
        found = match()
        assert found is not None
        return found


@asynccontextmanager
async def webhook() -> AsyncIterator[Webhook]:
    """A webhook receiver on a free loopback port; ``url`` is what Alertmanager posts to."""
    hook = Webhook(url="")
    app = web.Application()
    app.router.add_post("/alerts", hook._receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        hook.url = f"http://{host}:{port}/alerts"
        yield hook
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_program(
    argv: Sequence[str],
    log_path: Path,
    ready_url: str,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start ``argv`` with its output in ``log_path``; wait until ``ready_url`` answers 200.

    The process is terminated at exit (killed if it has not stopped after 10 s).
    """
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=None if env is None else dict(env),
        )
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(proc, session, ready_url, log_path)
        yield proc
    finally:
        await _stop(proc)


async def _wait_ready(
    proc: asyncio.subprocess.Process,
    session: aiohttp.ClientSession,
    url: str,
    log_path: Path,
) -> None:
    # These programs tell their readiness only over HTTP, so ask until they say so; waiting on
    # the process meanwhile notices at once when it exits instead.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    delay = 0.05
    while True:
        if proc.returncode is not None:
            raise ProgramFailed(f"{log_path.stem} exited with {proc.returncode}:\n{tail(log_path)}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
        if loop.time() > deadline:
            raise ProgramFailed(f"not ready at {url} after {READY_TIMEOUT_S} s:\n{tail(log_path)}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), delay)
        delay = min(delay * 2, 0.5)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for a failure message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@asynccontextmanager
async def alertmanager(webhook_url: str) -> AsyncIterator[str]:
    """Alertmanager sending every alert to ``webhook_url`` at once; yields its base URL.

    Groups by alert name and job name, waits 1 s before a group's first notification and 1 s
    between updates, and sends resolved notifications too.
    """
    program = require_program("prometheus-alertmanager", "prometheus-alertmanager")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kontod-test-alertmanager-") as tmp:
        folder = Path(tmp)
        config = {
            "route": {
                "receiver": "test",
                "group_by": ["alertname", "job_name"],
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [
                {"name": "test", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}
            ],
        }
        (folder / "alertmanager.yml").write_text(json.dumps(config, indent=2))
        url = f"http://127.0.0.1:{port}"
        argv = [
            program,
            f"--config.file={folder / 'alertmanager.yml'}",
            f"--storage.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            # no peers: an empty address turns clustering off
            "--cluster.listen-address=",
        ]
        async with running_program(argv, folder / "alertmanager.log", f"{url}/-/ready"):
            yield url


@asynccontextmanager
async def prometheus(
    *,
    targets: Sequence[str] = (),
    rule_files: Sequence[Path] = (),
    alertmanager_url: str | None = None,
    job: str = "kontod",
    interval: str = "1s",
    extra_flags: Sequence[str] = (),
) -> AsyncIterator[Prometheus]:
    """Prometheus scraping ``targets`` (host:port) as ``job`` every ``interval``.

    ``rule_files`` are copied into its folder; alerts go to ``alertmanager_url`` and are re-sent
    every second, so a test does not wait for the default minute.
    """
    program = require_program("prometheus", "prometheus")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kontod-test-prometheus-") as tmp:
        folder = Path(tmp)
        copied = []
        for i, path in enumerate(rule_files):
            dest = folder / f"rules-{i}-{path.name}"
            dest.write_text(path.read_text())
            copied.append(dest.name)
        config: dict[str, Any] = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": copied,
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        if alertmanager_url is not None:
            host = alertmanager_url.removeprefix("http://")
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [host]}]}]}
        (folder / "prometheus.yml").write_text(json.dumps(config, indent=2))
        url = f"http://127.0.0.1:{port}"
        argv = [
            program,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--rules.alert.resend-delay=1s",
            "--web.enable-lifecycle",
            *extra_flags,
        ]
        async with (
            running_program(argv, folder / "prometheus.log", f"{url}/-/ready"),
            aiohttp.ClientSession() as session,
        ):
            yield Prometheus(url=url, folder=folder, session=session)


async def wait_until(
    check: Callable[[], Any], *, timeout: float, every: float = 0.5, what: str = "condition"
) -> Any:
    """Call the coroutine function ``check`` every ``every`` seconds until it returns a truthy
    value, and return that value; raises TimeoutError naming ``what``.

    For state that lives in another process (Prometheus' series), which can only be asked.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise TimeoutError(f"{what} not met within {timeout} s (last: {last!r})")
