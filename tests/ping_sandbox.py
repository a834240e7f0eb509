"""A ping service for tests, speaking the Healthchecks pinging API on loopback.

What it follows of the API: ``HEAD|GET|POST /ping/<uuid>`` (success), ``/start``, ``/fail``,
``/<exit status>`` and ``/log`` after it, and the slug form ``/ping/<ping key>/<slug>``; an
optional ``rid`` query parameter that must be a UUID in canonical form; the body of a POST is
kept up to the body limit, announced in the ``Ping-Body-Limit`` header; answers are ``200 OK``
with ``OK``, ``404`` ``not found`` for an unknown check, ``400`` ``invalid uuid format`` for a
bad rid. ``fail_next`` makes the next answers fail, as a struggling service would.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

BODY_LIMIT = 10_000
_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class Ping:
    check: str
    kind: str  # success, start, fail, log, or an exit status
    rid: str | None
    method: str
    body: bytes


@dataclass
class PingService:
    checks: set[str] = field(default_factory=set)
    slugs: dict[tuple[str, str], str] = field(default_factory=dict)  # (ping key, slug) -> check
    pings: list[Ping] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)  # statuses of the next answers

    def new_check(self) -> str:
        code = str(uuid.uuid4())
        self.checks.add(code)
        return code

    def new_slug(self, ping_key: str, slug: str) -> str:
        code = self.new_check()
        self.slugs[(ping_key, slug)] = code
        return code

    def fail_next(self, *statuses: int) -> None:
        self.failures.extend(statuses)

    def of(self, check: str) -> list[Ping]:
        return [p for p in self.pings if p.check == check]

    def app(self) -> web.Application:
        app = web.Application()

        async def ping(request: web.Request) -> web.Response:
            if self.failures:
                return web.Response(status=self.failures.pop(0), text="service unavailable")
            parts = request.match_info["tail"].strip("/").split("/")
            check: str | None = None
            if parts and parts[0] in self.checks:
                check, rest = parts[0], parts[1:]
            elif len(parts) >= 2 and (parts[0], parts[1]) in self.slugs:
                check, rest = self.slugs[(parts[0], parts[1])], parts[2:]
            if check is None:
                return web.Response(status=404, text="not found")
            kind = rest[0] if rest else "success"
            if rest and (
                len(rest) > 1 or not (kind in ("start", "fail", "log") or kind.isdecimal())
            ):
                return web.Response(status=404, text="not found")
            rid = request.query.get("rid")
            if rid is not None and not _CANONICAL.fullmatch(rid):
                return web.Response(status=400, text="invalid uuid format")
            body = (await request.read())[:BODY_LIMIT] if request.method == "POST" else b""
            self.pings.append(Ping(check, kind, rid, request.method, body))
            return web.Response(text="OK", headers={"Ping-Body-Limit": str(BODY_LIMIT)})

        for method in ("GET", "POST", "HEAD"):
            app.router.add_route(method, "/ping/{tail:.+}", ping)
        return app


@asynccontextmanager
async def serve(service: PingService) -> AsyncIterator[str]:
    """Serve ``service`` on a free loopback port; yield the base URL of its ping endpoint."""
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/ping"
    finally:
        await runner.cleanup()
