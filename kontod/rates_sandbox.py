"""A sandbox of the two rate sources, for the demo and the tests: a real aiohttp server.

- ``GET /stats/eurofxref/eurofxref-daily.xml``: the ECB's daily reference rates file
  (a ``gesmes:Envelope`` whose ``<Cube time=...>`` holds ``<Cube currency rate>`` items, units
  of each currency per 1 EUR).
- ``GET /api/v3/simple/price?ids=...&vs_currencies=...``: CoinGecko's simple price answer,
  ``{coin id: {vs currency: price}}``; unknown ids and currencies are left out, a missing
  parameter is a 400, rate limiting a 429 with CoinGecko's ``{status: {error_code,
  error_message}}`` body and a ``Retry-After`` header.

Faults are injected per source: an HTTP error, a rate limit, a timeout (no answer), or a 200
whose body cannot be parsed, for the next N requests or for all of them.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

from aiohttp import web

ECB_PATH = "/stats/eurofxref/eurofxref-daily.xml"
PRICE_PATH = "/api/v3/simple/price"
ECB = "ecb"
CRYPTO = "crypto"

# A plausible day of reference rates (units per 1 EUR) and of prices (per coin).
DEMO_DAY = date(2026, 6, 9)
DEMO_ECB_RATES = {
    "USD": Decimal("1.0834"),
    "JPY": Decimal("169.42"),
    "GBP": Decimal("0.84638"),
    "CHF": Decimal("0.9312"),
    "SEK": Decimal("11.3595"),
    "CAD": Decimal("1.4670"),
}
DEMO_PRICES = {
    "bitcoin": {"eur": Decimal("58213.37"), "usd": Decimal("63068.3"), "chf": Decimal("54208.3")},
    "ethereum": {"eur": Decimal("3124.5"), "usd": Decimal("3385.1"), "chf": Decimal("2909.6")},
}


@dataclass
class Fault:
    """What a faulty source does: ``kind`` is ``http_500``, ``http_503``, ``http_404``,
    ``rate_limit``, ``timeout`` or ``garbage``; ``times`` requests (None: every one)."""

    kind: str
    times: int | None = None


@dataclass
class RateSandbox:
    """The state both endpoints serve; tests change it between runs."""

    ecb_day: date = DEMO_DAY
    ecb_rates: dict[str, Decimal] = field(default_factory=lambda: dict(DEMO_ECB_RATES))
    prices: dict[str, dict[str, Decimal]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEMO_PRICES.items()}
    )
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    last_query: dict[str, dict[str, str]] = field(default_factory=dict)
    timeout_s: float = 30.0
    # When set, the price endpoint wants it in x-cg-demo-api-key, as CoinGecko's Demo plan.
    api_key: str | None = None

    def fail(self, source: str, kind: str, times: int | None = None) -> None:
        self.faults[source] = Fault(kind, times)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(ECB_PATH, self._ecb)
        app.router.add_get(PRICE_PATH, self._prices)
        return app

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Listen on ``host:port`` (0: any free port) and yield the root URL."""
        runner = web.AppRunner(self.app(), handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_host, bound_port = runner.addresses[0][:2]
            yield f"http://{bound_host}:{bound_port}"
        finally:
            await runner.cleanup()

    async def _ecb(self, request: web.Request) -> web.StreamResponse:
        self.requests[ECB] += 1
        fault = self._next_fault(ECB)
        if fault is not None:
            return await self._fault(fault, xml=True)
        items = "\n".join(
            f"\t\t\t<Cube currency='{cur}' rate='{rate}'/>" for cur, rate in self.ecb_rates.items()
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<gesmes:Envelope xmlns:gesmes="http://www.gesmes.org/xml/2002-08-01"'
            ' xmlns="http://www.ecb.int/vocabulary/2002-08-01/eurofxref">\n'
            "\t<gesmes:subject>Reference rates</gesmes:subject>\n"
            "\t<gesmes:Sender>\n\t\t<gesmes:name>European Central Bank</gesmes:name>\n"
            "\t</gesmes:Sender>\n"
            f"\t<Cube>\n\t\t<Cube time='{self.ecb_day.isoformat()}'>\n{items}\n"
            "\t\t</Cube>\n\t</Cube>\n</gesmes:Envelope>\n"
        )
        return web.Response(text=body, content_type="text/xml")

    async def _prices(self, request: web.Request) -> web.StreamResponse:
        self.requests[CRYPTO] += 1
        self.last_query[CRYPTO] = dict(request.query)
        fault = self._next_fault(CRYPTO)
        if fault is not None:
            return await self._fault(fault, xml=False)
        if self.api_key is not None:
            given = request.headers.get("x-cg-demo-api-key")
            if given != self.api_key:
                code, text = (
                    (10002, "API Key Missing") if given is None else (10011, "Invalid API Key")
                )
                body = {"status": {"error_code": code, "error_message": text}}
                return web.json_response(body, status=401)
        for param in ("ids", "vs_currencies"):
            if not request.query.get(param):
                return web.json_response({"error": f"Missing parameter {param}"}, status=400)
        ids = request.query["ids"].split(",")
        vs = request.query["vs_currencies"].lower().split(",")
        # Decimals written as JSON numbers exactly as stored, as the API does with
        # precision=full.
        entries = []
        for coin in ids:
            quoted = self.prices.get(coin.strip(), {})
            fields = [f"{json.dumps(v)}: {quoted[v]}" for v in vs if v in quoted]
            if fields:
                entries.append(f"{json.dumps(coin.strip())}: {{{', '.join(fields)}}}")
        return web.Response(text="{" + ", ".join(entries) + "}", content_type="application/json")

    def _next_fault(self, source: str) -> Fault | None:
        fault = self.faults.get(source)
        if fault is None:
            return None
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[source]
        return fault

    async def _fault(self, fault: Fault, *, xml: bool) -> web.StreamResponse:
        if fault.kind == "timeout":
            await asyncio.sleep(self.timeout_s)
            return web.Response(status=504)
        if fault.kind == "garbage":
            text = "<html><body>Maintenance</body></html>" if xml else '{"bitcoin": {"eur": '
            return web.Response(text=text, content_type="text/html" if xml else "application/json")
        if fault.kind == "rate_limit":
            body = {
                "status": {
                    "error_code": 429,
                    "error_message": "You've exceeded the Rate Limit. Please visit"
                    " https://www.coingecko.com/en/api/pricing to subscribe to our API plans"
                    " for higher rate limits.",
                }
            }
            return web.json_response(body, status=429, headers={"Retry-After": "1"})
        status = int(fault.kind.removeprefix("http_"))
        if xml:
            return web.Response(
                text=f"<html><body><h1>{status}</h1></body></html>",
                status=status,
                content_type="text/html",
            )
        body = {"status": {"error_code": status, "error_message": f"HTTP {status}"}}
        return web.json_response(body, status=status)


def urls(root: str) -> tuple[str, str]:
    """(fiat rates URL, crypto prices URL) of a sandbox served at ``root``."""
    return root + ECB_PATH, root + PRICE_PATH
