"""structlog set-up: JSON lines for journald, or a console view on a terminal.

Configured once by the CLI, never at import time. A last processor masks any field whose name
says it holds a secret, as a net under the rule that secrets are never logged. What the
libraries log through the standard ``logging`` module (aiohttp, asyncio) goes through the same
processors, so a traceback is always one field of one line, never free text in the stream.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_SECRET_WORDS = ("token", "password", "secret", "authorization", "dsn")
# accept() failing for want of descriptors or memory: asyncio retries every second and would
# report each failure; one line per ACCEPT_LOG_EVERY_S says it, with how many were dropped.
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_LOG_EVERY_S = 60.0

log = structlog.get_logger("kontod.logs")


def mask_secrets(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    for key in event:
        if any(word in key.lower() for word in _SECRET_WORDS):
            event[key] = "***"
    return event


def configure(fmt: str, level: str) -> None:
    """Route structlog and the standard logging module to stderr in ``fmt`` (json or console)
    at ``level``."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    stamp: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # On the console the renderer draws the traceback itself; in JSON it is one string field.
    last: list[Processor] = [mask_secrets]
    if fmt == "json":
        last.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*stamp, *last, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamp],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *last,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    # The libraries' info lines (pgserver's commands, asyncio's notes) are not kontod's events:
    # from them, warnings and errors only, as Python shows by default.
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]))


def watch_loop(
    loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.monotonic
) -> None:
    """Log what the event loop reports (an exception nobody retrieved, a failed accept) as one
    line each, and a burst of accept failures for lack of resources as one line a minute."""
    dropped = 0
    last = float("-inf")

    def handle(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal dropped, last
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS and "accept" in message:
            now = clock()
            if now - last < ACCEPT_LOG_EVERY_S:
                dropped += 1
                return
            log.error(
                "http.accept_failed",
                error=f"{type(exc).__name__}: {exc}",
                repeated_since_last=dropped,
                every_s=ACCEPT_LOG_EVERY_S,
            )
            dropped, last = 0, now
            return
        fields: dict[str, Any] = {
            k: repr(v)[:500] for k, v in context.items() if k not in ("exception", "message")
        }
        if exc is not None:
            fields["exc_info"] = exc
        log.error("asyncio.error", message=message, **fields)

    loop.set_exception_handler(handle)
