"""Pings to an outside dead man's switch, in the Healthchecks convention.

For a job with a ping URL, a run sends ``<url>/start?rid=<uuid>`` when it starts, then
``<url>?rid=<uuid>`` on success or ``<url>/fail?rid=<uuid>`` otherwise, each a POST whose body
is the run's summary (at most ``BODY_LIMIT`` bytes). The service alerts when pings stop coming,
which still works when the host, kontod and its Prometheus are all down together.

A ping never fails or delays a run: it is sent in the background, retried with backoff on
network errors, 5xx and 429 answers (the clients' shared ``Backoff``), and its outcome is
counted (``observe``) and logged.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import structlog

from kontod.config import ConfigError
from kontod.providers.answers import read_prefix
from kontod.providers.backoff import Backoff, Transient, transient_status
from kontod.scheduler.contract import LOST, RunContext, RunStatus

BODY_LIMIT = 10_000  # bytes; what Healthchecks stores of a ping body by default
ATTEMPTS = 4
TIMEOUT_S = 10.0
BACKOFF_S = 1.0  # before jitter; doubling
DRAIN_S = 5.0  # how long a stopping kontod waits for pings in flight
# Fixed, so a run's rid is the same wherever it is computed.
RID_NAMESPACE = uuid.UUID("6b6f6e74-6f64-5069-6e67-000000000001")

log = structlog.get_logger("kontod.pings")
Observer = Callable[[str, str, str], None]  # (job, kind, outcome)


class PingFailed(Exception):
    """A ping the service did not accept, with what it answered (or the network error)."""


def run_uuid(job: str, run_id: int) -> uuid.UUID:
    """The rid of a run: a UUID derived from its job and id (canonical lower-case form)."""
    return uuid.uuid5(RID_NAMESPACE, f"{job}/{run_id}")


def ping_urls(
    jobs: Iterable[str], per_job: Mapping[str, str], base_url: str | None
) -> dict[str, str]:
    """The ping URL of each job: its own, else ``<base_url>/<job name>`` (a Healthchecks slug).

    Raises ConfigError for a per-job setting that names no job.
    """
    names = list(jobs)
    for job in per_job:
        if job not in names:
            var = "KONTOD_PING_URL_" + job.upper().replace("-", "_")
            raise ConfigError(var, "<hidden>", "names no job; jobs: " + ", ".join(names))
    urls = {name: _at(base_url, f"/{name}") for name in names} if base_url else {}
    urls.update(per_job)
    return urls


@dataclass(frozen=True)
class Summary:
    """What a finished run says about itself, as the body of its last ping."""

    job: str
    run_id: int
    trigger: str
    status: str
    duration_s: float
    counts: Mapping[str, int] = field(default_factory=dict)
    error: str | None = None

    def body(self, limit: int = BODY_LIMIT) -> bytes:
        lines = [
            f"kontod {self.job} run {self.run_id}: {self.status} in {self.duration_s:.1f} s",
            f"trigger: {self.trigger}",
        ]
        if self.counts:
            lines.append("counts: " + " ".join(f"{k}={v}" for k, v in sorted(self.counts.items())))
        if self.error:
            lines.append(f"error: {self.error}")
        return truncate("\n".join(lines) + "\n", limit)


def truncate(text: str, limit: int) -> bytes:
    """``text`` in UTF-8, cut to ``limit`` bytes without splitting a character."""
    data = text.encode()
    if len(data) <= limit:
        return data
    return data[:limit].decode(errors="ignore").encode()


def _where(url: str) -> str:
    """The host (and port) of a ping URL, all of it that is logged: user info, path and query
    can each hold the check's secret."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host


def _secrets(url: str) -> list[str]:
    """The parts of ``url`` that may be secret, as written and percent-decoded, longest first."""
    parts = urlsplit(url)
    found = {parts.netloc.rpartition("@")[0], parts.path.strip("/"), parts.query}
    found |= {unquote(part) for part in found}
    return sorted((part for part in found if part), key=len, reverse=True)


def _scrub(text: str, url: str) -> str:
    """A text from the HTTP library or the service with the ping URL's user info, path and
    query blotted out.

    Some of aiohttp's errors (an invalid URL, too many redirects) quote the whole URL, and a
    service's error page may quote the path it was asked for.
    """
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def _at(url: str, suffix: str) -> str:
    """``url`` with ``suffix`` added to its path, its query kept after it."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix))


class Pinger:
    """Sends the pings of every run in the background; ``drain`` waits for what is in flight."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        urls: Mapping[str, str],
        *,
        observe: Observer | None = None,
        attempts: int = ATTEMPTS,
        timeout_s: float = TIMEOUT_S,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        self.http = http
        self.urls = dict(urls)
        self.observe = observe
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._starts: dict[int, asyncio.Task[bool]] = {}
        self._pending: set[asyncio.Task[bool]] = set()

    # Run observer (see kontod.scheduler.runner.RunObserver)
    def run_started(self, ctx: RunContext) -> None:
        """A run began: send its /start ping."""
        url = self.urls.get(ctx.job)
        if url is None:
            return
        rid = run_uuid(ctx.job, ctx.run_id)
        self._starts[ctx.run_id] = self._spawn(
            self.send(ctx.job, "start", _at(url, "/start"), rid, b"")
        )

    def run_ended(self, ctx: RunContext, status: str, error: str | None, duration_s: float) -> None:
        """A run ended: send its success or /fail ping with its summary. A run that lost its
        claim sends nothing: the replica that takes it over pings for it."""
        if status == LOST:
            self._starts.pop(ctx.run_id, None)
            return
        self.finished(
            Summary(ctx.job, ctx.run_id, ctx.trigger, status, duration_s, dict(ctx.counts), error)
        )

    def finished(self, summary: Summary) -> None:
        """Send the success or /fail ping of a run, after its /start ping."""
        url = self.urls.get(summary.job)
        if url is None:
            return
        start = self._starts.pop(summary.run_id, None)
        kind, target = (
            ("success", url) if summary.status == RunStatus.SUCCESS else ("fail", _at(url, "/fail"))
        )

        async def after_start() -> bool:
            if start is not None:
                await asyncio.wait([start])  # keep the order the service expects
            return await self.send(
                summary.job, kind, target, run_uuid(summary.job, summary.run_id), summary.body()
            )

        self._spawn(after_start())

    async def send(self, job: str, kind: str, url: str, rid: uuid.UUID, body: bytes) -> bool:
        """One ping with its retries; True when the service accepted it. Never raises."""

        async def attempt(n: int) -> bool | Transient:
            try:
                async with self.http.post(
                    url,
                    params={"rid": str(rid)},
                    data=body,
                    headers={"Content-Type": "text/plain; charset=utf-8"},
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                ) as resp:
                    # Only the start is shown: a service answering without end is not read on.
                    head = await read_prefix(resp, 1024)
                    answer = head.decode(errors="replace")[:200].strip()
                    if 200 <= resp.status < 300:
                        return True
                    problem = PingFailed(_scrub(f"HTTP {resp.status}: {answer}", url))
                    if not transient_status(resp.status):
                        raise problem  # the URL or the request is wrong: retrying cannot help
                    retry_after = retry.retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                detail = _scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), url)
                problem, retry_after = PingFailed(detail), None
            log.info("ping.retrying", job=job, kind=kind, attempt=n, error=str(problem))
            return Transient(problem, retry_after)

        retry = Backoff(
            attempts=self.attempts,
            backoff=self.backoff_s,
            max_backoff=8 * self.backoff_s,
            max_retry_after=self.timeout_s,
        )
        try:
            await retry.run(attempt)
        except PingFailed as exc:
            self._count(job, kind, "failed")
            log.warning("ping.failed", job=job, kind=kind, host=_where(url), error=str(exc))
            return False
        self._count(job, kind, "ok")
        log.debug("ping.sent", job=job, kind=kind, host=_where(url))
        return True

    async def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the pings in flight, then cancel what is left."""
        pending = list(self._pending)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, bool]) -> asyncio.Task[bool]:
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    def _count(self, job: str, kind: str, outcome: str) -> None:
        if self.observe is not None:
            self.observe(job, kind, outcome)
