"""How a client retries a request to a third party: attempts, exponential backoff with jitter,
and the pause a ``Retry-After`` header asks for, up to a maximum.

The clients (the bank API, the rate sources) keep their own requests, errors and messages;
this module only decides whether another attempt comes and how long to wait before it. The
clock, the sleep and the jitter are parameters, so that tests decide them.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypedDict, TypeVar

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or HTTP date); None if unusable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_seconds(attempt: int, *, base: float, cap: float, jitter: float) -> float:
    """Delay after failed attempt ``attempt`` (1-based): exponential, capped, half of it jittered.

    ``jitter`` is a number in [0, 1). Keeping half the delay fixed means a retry never comes
    right away, while the random half spreads workers that failed together.
    """
    full = min(cap, base * 2.0 ** (attempt - 1))
    return full / 2 + jitter * full / 2


def transient_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt: 429 and the 5xx."""
    return status == 429 or status >= 500


@dataclass(frozen=True)
class Transient:
    """An attempt that failed in a way another attempt may cure (timeout, connection error,
    429, 5xx); ``error`` is raised when no attempt is left."""

    error: Exception
    retry_after: float | None = None  # seconds the server asked for, if it did


def _utc_now() -> datetime:
    return datetime.now(UTC)


class BackoffOptions(TypedDict, total=False):
    """The fields of a ``Backoff`` as keyword arguments, for the clients' constructors."""

    attempts: int
    backoff: float
    max_backoff: float
    max_retry_after: float
    sleep: Sleep
    jitter: Callable[[], float]
    now: Callable[[], datetime]


@dataclass(frozen=True)
class Backoff:
    """Up to ``attempts`` attempts at a request, with a capped exponential pause between them.

    A server asking (``Retry-After``) for a longer pause than ``max_retry_after`` is taken for
    unavailable now: the client fails the request rather than hold a worker for minutes.
    """

    attempts: int = 4
    backoff: float = 0.5  # the pause after the first failure, before jitter; doubles each time
    max_backoff: float = 30.0
    max_retry_after: float = 60.0
    sleep: Sleep = asyncio.sleep
    jitter: Callable[[], float] = random.random
    now: Callable[[], datetime] = _utc_now

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")

    def retry_after(self, header: str | None) -> float | None:
        """The pause a ``Retry-After`` header asks for, read at ``now``; None if unusable."""
        return retry_after_seconds(header, self.now())

    async def run(self, attempt: Callable[[int], Awaitable[T | Transient]]) -> T:
        """The result of the first ``attempt(n)`` (``n`` from 1) that returns no ``Transient``.

        An attempt raises what must not be retried; after the last one, the last
        ``Transient``'s error is raised.
        """
        n = 1
        while True:
            outcome = await attempt(n)
            if not isinstance(outcome, Transient):
                return outcome
            if n >= self.attempts:
                raise outcome.error
            delay = backoff_seconds(
                n, base=self.backoff, cap=self.max_backoff, jitter=self.jitter()
            )
            await self.sleep(max(delay, outcome.retry_after or 0.0))
            n += 1
