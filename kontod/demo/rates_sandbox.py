"""A sandbox of the two rate sources, for the demo and the tests: a real aiohttp server.

- ``GET /stats/eurofxref/eurofxref-daily.xml``: the ECB's daily reference rates file
  (a ``gesmes:Envelope`` whose ``<Cube time=...>`` holds ``<Cube currency rate>`` items, units
  of each currency per 1 EUR).
- ``GET /api/v3/simple/price?ids=...&vs_currencies=...``: CoinGecko's simple price answer,
  ``{coin id: {vs currency: price}}``; unknown ids and currencies are left out, a missing
  parameter is a 400, rate limiting a 429 with CoinGecko's ``{status: {error_code,
  error_message}}`` body and a ``Retry-After`` header.
- ``GET /api/v3/search?query=...``: CoinGecko's search answer, ``{coins: [{id, name,
  api_symbol, symbol, market_cap_rank, thumb, large}], exchanges, icons, categories, nfts}``:
  the coins of ``RateSandbox.coins`` whose id, name or symbol contains the query (case aside),
  ranked coins first by market-cap rank; a missing query is a 400. Its faults go by ``search``.

Faults are injected per source, for the next N requests or for all of them, with
``RateSandbox.fail(source, kind, times, **options)``:

- ``http_500``, ``http_503``, ``http_404``: that status; ``rate_limit``: a 429 with
  ``Retry-After``; ``timeout``: no answer; ``garbage``: a 200 whose body cannot be parsed;
- ``deep``: a 200 of 100 000 nested JSON arrays (or XML elements for the ECB);
- ``control``: a 200 whose strings hold a raw NUL and control characters;
- ``split``: the regular answer sent in two writes ``pause`` seconds apart (default 0.3);
- ``oversized``: a 200 of ``size`` bytes that starts like a valid answer, streamed without a
  length; ``endless``: a 200 body that never ends (bytes written: ``RateSandbox.streamed``);
- ``raw``: a 200 whose body is ``body``, as it is.

A rate or a price given as a string (``prices["bitcoin"]["eur"] = "1e400"``, ``"NaN"``,
``"1e200000"``) is written into the answer as it is. ``ecb_history_days`` adds that many
earlier days to the ECB file, as its history files have.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal

from aiohttp import web

from kontod.demo.sandbox import deep_json, write_split, write_stream
from kontod.demo.serving import listening

ECB_PATH = "/stats/eurofxref/eurofxref-daily.xml"
PRICE_PATH = "/api/v3/simple/price"
SEARCH_PATH = "/api/v3/search"
ECB = "ecb"
CRYPTO = "crypto"
SEARCH = "search"

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
    "pepe": {"eur": Decimal("0.00001127"), "usd": Decimal("0.00001221")},
}
# What the search knows: (id, name, symbol, market-cap rank or None). The mapped coins, one
# unmapped coin, and a symbol three coins share.
DEMO_COINS = [
    ("bitcoin", "Bitcoin", "BTC", 1),
    ("ethereum", "Ethereum", "ETH", 2),
    ("pepe", "Pepe", "PEPE", 24),
    ("pepe-classic", "Pepe Classic", "PEPE", None),
    ("based-pepe", "Based Pepe", "PEPE", 2210),
]


@dataclass
class Fault:
    """What a faulty source does (``kind``, see the module's docstring) for ``times``
    requests (None: every one)."""

    kind: str
    times: int | None = None
    pause: float = 0.3
    size: int = 0
    body: str = ""


@dataclass
class RateSandbox:
    """The state both endpoints serve; tests change it between runs."""

    ecb_day: date = DEMO_DAY
    ecb_rates: dict[str, Decimal | str] = field(default_factory=lambda: dict(DEMO_ECB_RATES))
    ecb_history_days: int = 0
    prices: dict[str, dict[str, Decimal | str]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEMO_PRICES.items()}
    )
    coins: list[tuple[str, str, str, int | None]] = field(default_factory=lambda: list(DEMO_COINS))
    faults: dict[str, Fault] = field(default_factory=dict)
    streamed: list[int] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    last_query: dict[str, dict[str, str]] = field(default_factory=dict)
    timeout_s: float = 30.0
    # When set, the price endpoint wants it in x-cg-demo-api-key, as CoinGecko's Demo plan.
    api_key: str | None = None

    def fail(
        self,
        source: str,
        kind: str,
        times: int | None = None,
        *,
        pause: float = 0.3,
        size: int = 0,
        body: str = "",
    ) -> None:
        """Make ``source`` (``ecb``, ``crypto`` or ``search``) misbehave as ``kind`` says."""
        self.faults[source] = Fault(kind, times, pause, size, body)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(ECB_PATH, self._ecb)
        app.router.add_get(PRICE_PATH, self._prices)
        app.router.add_get(SEARCH_PATH, self._search)
        return app

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Listen on ``host:port`` (0: any free port) and yield the root URL."""
        async with listening(self.app(), host, port) as root:
            yield root

    async def _ecb(self, request: web.Request) -> web.StreamResponse:
        self.requests[ECB] += 1
        fault = self._next_fault(ECB)
        if fault is not None and fault.kind != "split":
            return await self._fault(fault, request, xml=True)
        items = "\n".join(
            f"\t\t\t<Cube currency='{cur}' rate='{rate}'/>" for cur, rate in self.ecb_rates.items()
        )
        days = [self.ecb_day - timedelta(days=n) for n in range(self.ecb_history_days + 1)]
        cubes = "".join(
            f"\t\t<Cube time='{day.isoformat()}'>\n{items}\n\t\t</Cube>\n" for day in days
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<gesmes:Envelope xmlns:gesmes="http://www.gesmes.org/xml/2002-08-01"'
            ' xmlns="http://www.ecb.int/vocabulary/2002-08-01/eurofxref">\n'
            "\t<gesmes:subject>Reference rates</gesmes:subject>\n"
            "\t<gesmes:Sender>\n\t\t<gesmes:name>European Central Bank</gesmes:name>\n"
            "\t</gesmes:Sender>\n"
            f"\t<Cube>\n{cubes}\t</Cube>\n</gesmes:Envelope>\n"
        )
        if fault is not None:
            return await write_split(request, 200, body.encode(), fault.pause, "text/xml")
        return web.Response(text=body, content_type="text/xml")

    async def _prices(self, request: web.Request) -> web.StreamResponse:
        self.requests[CRYPTO] += 1
        self.last_query[CRYPTO] = dict(request.query)
        fault = self._next_fault(CRYPTO)
        if fault is not None and fault.kind != "split":
            return await self._fault(fault, request, xml=False)
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
        text = "{" + ", ".join(entries) + "}"
        if fault is not None:
            return await write_split(request, 200, text.encode(), fault.pause)
        return web.Response(text=text, content_type="application/json")

    async def _search(self, request: web.Request) -> web.StreamResponse:
        self.requests[SEARCH] += 1
        self.last_query[SEARCH] = dict(request.query)
        fault = self._next_fault(SEARCH)
        if fault is not None and fault.kind != "split":
            return await self._fault(fault, request, xml=False)
        query = request.query.get("query", "").strip().lower()
        if not query:
            return web.json_response({"error": "Missing parameter query"}, status=400)
        hits = sorted(
            (c for c in self.coins if any(query in text.lower() for text in c[:3])),
            key=lambda c: (c[3] is None, c[3] or 0),
        )
        coins = [
            {
                "id": coin_id,
                "name": name,
                "api_symbol": coin_id,
                "symbol": symbol,
                "market_cap_rank": rank,
                "thumb": f"https://coin-images.example/{coin_id}/thumb.png",
                "large": f"https://coin-images.example/{coin_id}/large.png",
            }
            for coin_id, name, symbol, rank in hits
        ]
        body = {"coins": coins, "exchanges": [], "icons": [], "categories": [], "nfts": []}
        if fault is not None:
            return await write_split(request, 200, json.dumps(body).encode(), fault.pause)
        return web.json_response(body)

    def _next_fault(self, source: str) -> Fault | None:
        fault = self.faults.get(source)
        if fault is None:
            return None
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[source]
        return fault

    async def _fault(self, fault: Fault, request: web.Request, *, xml: bool) -> web.StreamResponse:
        kind = "text/xml" if xml else "application/json"
        if fault.kind == "deep":
            depth = 100_000
            text = "<a>" * depth + "</a>" * depth if xml else deep_json(depth).text
            return web.Response(text=text, content_type=kind)
        if fault.kind == "control":
            text = (
                "<?xml version='1.0'?><Cube><Cube time='2026-06-09'><Cube currency='US\x00D'"
                " rate='1.08'/>\x1b]0;title\x07</Cube></Cube>"
                if xml
                else '{"bit\x00coin": {"eur": 1}, "ethereum\x1b[31m": {"eur": 2}}'
            )
            return web.Response(body=text.encode(), content_type=kind)
        if fault.kind == "raw":
            return web.Response(body=fault.body.encode(), content_type=kind)
        if fault.kind in ("oversized", "endless"):
            head, tail = (
                (b"<?xml version='1.0'?><Cube><!-- ", b" --></Cube>")
                if xml
                else (b'{"bitcoin": {"eur": 1}, "padding": "', b'"}')
            )
            size = fault.size if fault.kind == "oversized" else None
            return await write_stream(request, head, tail, size, self.streamed, kind)
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
