"""A kontod daemon started in-process on loopback, for tests that talk HTTP to it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import aiohttp
import asyncpg

from kontod.config import Settings
from kontod.daemon import Daemon
from kontod.job import JobSpec
from kontod.metrics import Metrics
from kontod.runner import utcnow
from kontod.systemd import Notifier

TOKEN = "s3cret-admin-token"


def settings_for(dsn: str, **changes: object) -> Settings:
    base = Settings(
        database_url=dsn,
        state_dir=Path("/nonexistent"),
        listen_host="127.0.0.1",
        listen_port=0,
        timezone="Europe/Paris",
        admin_token=TOKEN,
        log_format="console",
        shutdown_timeout=2,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def running_daemon(
    settings: Settings,
    jobs: Callable[[asyncpg.Pool, aiohttp.ClientSession, Metrics | None], list[JobSpec]]
    | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> AsyncIterator[tuple[Daemon, str]]:
    """Yield the daemon and its base URL; stop it afterwards."""
    daemon = Daemon(settings, jobs=jobs, clock=clock, notifier=Notifier.from_env({}))
    await daemon.start()
    try:
        yield daemon, f"http://127.0.0.1:{daemon.port}"
    finally:
        await daemon.stop()
