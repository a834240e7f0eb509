"""What the demo keeps in its state folder so that a restart prints the same thing: the ports
of its sandboxes (the printed ``export`` line stays right) and its admin token."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger("kontod.demo")

PORTS_FILE = "ports.json"
TOKEN_FILE = "admin-token"  # noqa: S105 (the file's name, not a token)


def saved_ports(folder: Path) -> dict[str, int]:
    """The ports the sandboxes had at the last start, by name; {} when none is saved or the
    file is not what the demo writes (it is written again at this start)."""
    try:
        data = json.loads((folder / PORTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int) and 0 < v < 65536}


def save_ports(folder: Path, ports: dict[str, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PORTS_FILE).write_text(json.dumps(ports, sort_keys=True) + "\n")


async def serve_on(
    stack: contextlib.AsyncExitStack,
    serve: Callable[[int], AbstractAsyncContextManager[str]],
    name: str,
    port: int | None,
) -> str:
    """``serve(port)`` entered on ``stack``: on ``port`` when it is free, else on any free one
    (the printed URLs change then, so it is said)."""
    if port:
        try:
            return await stack.enter_async_context(serve(port))
        except OSError as exc:
            log.warning("demo.port_taken", sandbox=name, port=port, error=str(exc))
    return await stack.enter_async_context(serve(0))


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def admin_token(folder: Path) -> str:
    """The demo's admin token: made at the first start, kept (readable by its owner only)."""
    path = folder / TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if token:
            return token
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
