"""Exchange rates and crypto prices: fetched from their sources, stored per day in ``kontod_rates``.

Fiat rates come from the European Central Bank's daily reference rates (units of each currency
per 1 EUR), crypto prices from a CoinGecko-style ``/simple/price`` endpoint (price of one coin
in the base currency), and manual rates from the settings. A stored row says "currency_amount
units of the currency are worth base_amount units of the base currency", so every source is
kept exactly, cross rates through the euro included; the snapshot SQL converts with it.

One request per source, with timeouts and retries like the bank client, its body read whole
up to a cap and its JSON bounded as the bank's (kontod/providers/answers.py). A source that fails is
reported, never raised: the snapshot then uses the rates stored earlier. A rate is plausible
when it and both its figures lie within [1e-12, 1e12] and it is within a factor 1 000 of the
last plausible stored rate of its currency; an implausible one is refused, and its source
counted as failed. Stored rows that are not plausible are never used.
"""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Unpack
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import structlog

from kontod.db import Connection
from kontod.providers.answers import RATES_MAX_BODY, BodyTooLarge, loads, read_body
from kontod.providers.backoff import Backoff, BackoffOptions, Transient, transient_status

ECB = "ecb"
CRYPTO = "crypto"
MANUAL = "manual"
# An answer larger than this is not a rate file (the ECB's daily file is about 2 kB, its
# 90-day history 50 kB); KONTOD_PROVIDER_MAX_BODY changes it.
MAX_BODY = RATES_MAX_BODY
# The plausible range of a rate (value of one unit in the base currency) and of each of its
# two figures, and the largest factor between a new rate and the last stored one.
LOWEST = Decimal("1e-12")
HIGHEST = Decimal("1e12")
MAX_FACTOR = Decimal(1000)
# The same range in SQL, over a row of kontod_rates: NaN and Infinity fall outside it.
PLAUSIBLE_SQL = (
    "currency_amount BETWEEN 1e-12 AND 1e12 AND base_amount BETWEEN 1e-12 AND 1e12"
    " AND rate BETWEEN 1e-12 AND 1e12"
)
DEMO_KEY_HEADER = "x-cg-demo-api-key"
PRO_KEY_HEADER = "x-cg-pro-api-key"

# Symbols as crypto providers store them in bank_accounts.currency -> CoinGecko coin ids.
# KONTOD_CRYPTO_IDS adds to it or overrides it.
SHIPPED_CRYPTO_IDS: Mapping[str, str] = {
    "BTC": "bitcoin",
    "ETH": "ethereum",
    "USDT": "tether",
    "USDC": "usd-coin",
    "BNB": "binancecoin",
    "SOL": "solana",
    "XRP": "ripple",
    "ADA": "cardano",
    "DOGE": "dogecoin",
    "TRX": "tron",
    "DOT": "polkadot",
    "LTC": "litecoin",
    "BCH": "bitcoin-cash",
    "LINK": "chainlink",
    "XLM": "stellar",
    "XMR": "monero",
    "ETC": "ethereum-classic",
    "ATOM": "cosmos",
    "AVAX": "avalanche-2",
    "POL": "polygon-ecosystem-token",
    "MATIC": "matic-network",
    "DAI": "dai",
    "UNI": "uniswap",
    "XTZ": "tezos",
    "ALGO": "algorand",
}


class RateSourceError(Exception):
    """A source gave no usable answer; ``str()`` says which source and why (safe to log)."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source


@dataclass(frozen=True)
class Quote:
    """``currency_amount`` units of ``currency`` are worth ``base_amount`` of the base, on ``day``."""

    currency: str
    day: date
    currency_amount: Decimal
    base_amount: Decimal
    source: str


@dataclass(frozen=True)
class CurrencyRate:
    """What the run knows of one currency the accounts use, after the sources were asked."""

    currency: str
    fetched: bool  # a source (or the manual list) gave it in this run
    day: date | None  # newest stored rate on or before the snapshot date
    source: str | None
    age_days: int | None
    usable: bool  # within the maximum age


@dataclass
class RateReport:
    """The outcome of asking the sources at the start of a snapshot run."""

    currencies: dict[str, CurrencyRate] = field(default_factory=dict)
    failed_sources: dict[str, str] = field(default_factory=dict)
    # currency -> why its fetched rate was refused as implausible
    refused: dict[str, str] = field(default_factory=dict)
    stored: int = 0


def split_sources(
    currencies: Iterable[str], base: str, crypto_ids: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """(fiat currencies to ask the ECB for, crypto symbols to ask the price API for).

    The base currency needs no rate; a fiat code is any three letters not in the crypto map.
    """
    fiat, crypto = [], []
    for cur in sorted(set(currencies)):
        if cur == base:
            continue
        if cur in crypto_ids:
            crypto.append(cur)
        elif re.fullmatch(r"[A-Z]{3}", cur):
            fiat.append(cur)
    return fiat, crypto


def parse_ecb(body: bytes) -> dict[date, dict[str, Decimal]]:
    """Units of each currency per 1 EUR, by day, from an ``eurofxref`` XML file.

    Works on the daily file and on the history files (several ``<Cube time=...>``).
    """
    try:
        # ElementTree resolves no external entity, and the expat shipped with Python 3.11
        # refuses entity-expansion bombs; the body size is capped before this.
        root = ET.fromstring(body)  # noqa: S314
    except ET.ParseError as exc:
        raise RateSourceError(ECB, f"the answer is not XML ({exc})") from None
    days: dict[date, dict[str, Decimal]] = {}
    for cube in root.iter():
        if not cube.tag.endswith("Cube") or "time" not in cube.attrib:
            continue
        try:
            day = date.fromisoformat(cube.attrib["time"])
        except ValueError:
            raise RateSourceError(ECB, f"bad date time={cube.attrib['time']!r}") from None
        rates = days.setdefault(day, {})
        for item in cube:
            cur, raw = item.attrib.get("currency", ""), item.attrib.get("rate", "")
            if not re.fullmatch(r"[A-Z]{3}", cur):
                raise RateSourceError(ECB, f"bad currency code {cur[:20]!r} on {day}")
            rates[cur] = _positive(raw, ECB, f"the rate of {cur} on {day}")
    if not days:
        raise RateSourceError(ECB, "the answer has no <Cube time=...> element")
    return days


def parse_simple_price(body: bytes, ids: Iterable[str], vs: str) -> dict[str, Decimal]:
    """Price of one coin in ``vs`` by coin id, from a ``/simple/price`` JSON answer.

    Ids the API does not know are absent from its answer, and so from the result.
    """
    try:
        data = loads(body)
    except ValueError as exc:
        raise RateSourceError(CRYPTO, f"the answer is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RateSourceError(CRYPTO, f"the answer is not an object ({type(data).__name__})")
    if isinstance(data.get("status"), dict) and "error_code" in data["status"]:
        raise RateSourceError(CRYPTO, f"error in the answer ({_error_text(data)})")
    prices: dict[str, Decimal] = {}
    for coin in ids:
        entry = data.get(coin)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise RateSourceError(CRYPTO, f"the entry of {coin!r} is not an object")
        value = entry.get(vs)
        if value is not None:
            prices[coin] = _positive(value, CRYPTO, f"the {vs} price of {coin}")
    return prices


def fiat_quotes(
    days: Mapping[date, Mapping[str, Decimal]], base: str, currencies: Iterable[str]
) -> list[Quote]:
    """Quotes to ``base`` from ECB rates (per 1 EUR), crossing through the euro when needed.

    With base CHF, 1.0834 USD = 1 EUR = 0.9312 CHF gives the quote 1.0834 USD = 0.9312 CHF.
    A day whose file lacks the base currency gives nothing.
    """
    wanted = list(currencies)
    quotes = []
    for day, per_eur in days.items():
        per_eur = {**per_eur, "EUR": Decimal(1)}
        base_per_eur = per_eur.get(base)
        if base_per_eur is None:
            continue
        for cur in wanted:
            if cur in per_eur and cur != base:
                quotes.append(Quote(cur, day, per_eur[cur], base_per_eur, ECB))
    return quotes


def crypto_quotes(
    prices: Mapping[str, Decimal], symbols: Iterable[str], ids: Mapping[str, str], day: date
) -> list[Quote]:
    """One quote per symbol whose coin has a price: 1 coin = price units of the base."""
    return [
        Quote(sym, day, Decimal(1), prices[ids[sym]], CRYPTO)
        for sym in symbols
        if ids[sym] in prices
    ]


def manual_quotes(manual: Mapping[str, Decimal], base: str, day: date) -> list[Quote]:
    return [
        Quote(cur, day, Decimal(1), value, MANUAL) for cur, value in manual.items() if cur != base
    ]


class RateSources:
    """The two rate sources, asked over one shared ``aiohttp.ClientSession``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        fiat_url: str,
        crypto_url: str,
        timeout: float = 30.0,
        api_key: str | None = None,
        max_body: int | None = None,
        **retry: Unpack[BackoffOptions],
    ) -> None:
        """``retry`` sets the retries (``attempts``, ``backoff``, ... of ``Backoff``); a
        ``Retry-After`` of up to 60 s is waited for unless ``max_retry_after`` says otherwise.
        ``max_body`` caps an answer's body (None: 2 MiB)."""
        self._session = session
        self.max_body = MAX_BODY if max_body is None else max_body
        self.fiat_url = fiat_url
        self.crypto_url = crypto_url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_s = timeout
        retry.setdefault("max_retry_after", 60.0)
        self._retry = Backoff(**retry)
        # CoinGecko takes a Demo plan key on api.coingecko.com and a paid plan's key on
        # pro-api.coingecko.com, each in a header of its own.
        self._headers: dict[str, str] = {}
        if api_key:
            pro = (urlsplit(crypto_url).hostname or "").startswith("pro-api.")
            self._headers[PRO_KEY_HEADER if pro else DEMO_KEY_HEADER] = api_key

    async def ecb(self) -> dict[date, dict[str, Decimal]]:
        """The ECB reference rates file, parsed."""
        return parse_ecb(await self._get(ECB, self.fiat_url, None, {}))

    async def crypto(self, ids: Iterable[str], vs: str) -> dict[str, Decimal]:
        """Prices of the given coin ids in ``vs`` (lower case), in one request."""
        wanted = sorted(set(ids))
        params = {"ids": ",".join(wanted), "vs_currencies": vs, "precision": "full"}
        body = await self._get(CRYPTO, self.crypto_url, params, self._headers)
        return parse_simple_price(body, wanted, vs)

    async def _get(
        self,
        source: str,
        url: str,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str],
    ) -> bytes:
        """The body of a 2xx answer, retrying timeouts, connection errors, 429 and 5xx."""

        def unavailable(last: str, retry_after: float | None = None) -> Transient:
            error = RateSourceError(source, f"{last} after {self._retry.attempts} attempt(s)")
            return Transient(error, retry_after)

        async def attempt(_: int) -> bytes | Transient:
            try:
                async with self._session.get(
                    url,
                    params=params,
                    headers=headers,
                    timeout=self._timeout,
                    # An API key goes to the configured host only, never where a redirect points.
                    allow_redirects=not headers,
                ) as resp:
                    status = resp.status
                    retry_header = resp.headers.get("Retry-After")
                    body = await read_body(resp, self.max_body)
            except BodyTooLarge as exc:
                raise RateSourceError(source, str(exc)) from None
            except TimeoutError:
                return unavailable(f"no answer within {self._timeout_s:g} s")
            except aiohttp.ClientError as exc:
                return unavailable(f"connection failed ({str(exc) or type(exc).__name__})")
            if 200 <= status < 300:
                return body
            last = f"HTTP {status}" + _detail(body)
            if not transient_status(status):
                raise RateSourceError(source, last)
            retry_after = self._retry.retry_after(retry_header)
            if retry_after is not None and retry_after > self._retry.max_retry_after:
                raise RateSourceError(
                    source, f"{last}; Retry-After {retry_after:g} s is longer than kontod waits"
                )
            return unavailable(last, retry_after)

        return await self._retry.run(attempt)


async def update(
    pool: asyncpg.Pool,
    sources: RateSources | None,
    *,
    base: str,
    day: date,
    max_age_days: int,
    crypto_ids: Mapping[str, str],
    manual: Mapping[str, Decimal],
    now: datetime,
    log: structlog.typing.FilteringBoundLogger,
    before_write: Callable[[Connection], Awaitable[None]],
    in_use: Iterable[str] | None = None,
) -> RateReport:
    """Ask each source once for the currencies the accounts use, store what they give for
    ``day``, and say for each currency which stored rate the snapshot of ``day`` can use.

    ``before_write`` runs inside the write transaction (the run's claim check). ``in_use``:
    the currencies the accounts use, read by the caller when Konto's tables are not in this
    PostgreSQL database (None: read from its bank_accounts).
    """
    report = RateReport()
    async with pool.acquire() as conn:
        accounts = await currencies_in_use(conn) if in_use is None else in_use
        used = sorted({cur for cur in accounts if cur != base})
        last = await last_rates(conn, base, used, day)
    fiat, crypto = split_sources((cur for cur in used if cur not in manual), base, crypto_ids)
    quotes: list[Quote] = []
    fetched: set[str] = set()
    if sources is not None:
        asks: dict[str, Awaitable[list[Quote]]] = {}
        if fiat:
            asks[ECB] = _ask_ecb(sources, base, fiat)
        if crypto:
            asks[CRYPTO] = _ask_crypto(sources, base, crypto, crypto_ids, day)
        answers = await asyncio.gather(*asks.values(), return_exceptions=True)
        for source, answer in zip(asks, answers, strict=True):
            if isinstance(answer, RateSourceError):
                report.failed_sources[source] = str(answer)
                log.warning("rates.source_failed", source=source, error=str(answer))
            elif isinstance(answer, Exception):
                # Whatever a source's answer did to its parser, it is that source's failure:
                # the run goes on with the stored rates.
                error = f"{source}: {type(answer).__name__}: {str(answer)[:300]}"
                report.failed_sources[source] = error
                log.warning("rates.source_failed", source=source, error=error)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                kept = _plausible(answer, last, report, log)
                if len(kept) < len(answer):
                    refused = sorted({q.currency for q in answer} - {q.currency for q in kept})
                    report.failed_sources[source] = (
                        f"{source}: implausible rate refused for {', '.join(refused)}"
                    )
                quotes.extend(kept)
                # A day newer than the snapshot's (a run for an earlier date) is kept but
                # does not count as this run's rate.
                fetched.update(q.currency for q in kept if q.day <= day)
    # The operator's rates are not held to the last stored rate: they are there to correct it.
    own = _plausible(manual_quotes(manual, base, day), {}, report, log)
    quotes.extend(own)
    fetched.update(q.currency for q in own)
    async with pool.acquire() as conn:
        async with conn.transaction():
            await before_write(conn)
            report.stored = await store(conn, base, quotes, now)
        stored = await newest(conn, base, used, day)
    for cur in sorted(used):
        found = stored.get(cur)
        age = (day - found[0]).days if found else None
        rate = CurrencyRate(
            currency=cur,
            fetched=cur in fetched,
            day=found[0] if found else None,
            source=found[1] if found else None,
            age_days=age,
            usable=age is not None and age <= max_age_days,
        )
        report.currencies[cur] = rate
        if not rate.usable:
            log.warning("rates.missing", currency=cur, newest_day=_iso(rate.day), age_days=age)
        elif not rate.fetched:
            log.warning("rates.fallback", currency=cur, day=_iso(rate.day), age_days=age)
    log.info(
        "rates.updated",
        base=base,
        currencies=len(used),
        stored=report.stored,
        failed_sources=sorted(report.failed_sources),
    )
    return report


async def _ask_ecb(sources: RateSources, base: str, fiat: list[str]) -> list[Quote]:
    return fiat_quotes(await sources.ecb(), base, fiat)


async def _ask_crypto(
    sources: RateSources, base: str, symbols: list[str], ids: Mapping[str, str], day: date
) -> list[Quote]:
    prices = await sources.crypto((ids[s] for s in symbols), base.lower())
    return crypto_quotes(prices, symbols, ids, day)


def implausible(quote: Quote, last: Decimal | None = None) -> str | None:
    """Why ``quote`` cannot be a rate of its currency, or None when it is plausible.

    ``last`` is the last stored rate of the currency (value of one unit in the base), if any.
    """
    for name, figure in (("amount", quote.currency_amount), ("base amount", quote.base_amount)):
        if not figure.is_finite() or not LOWEST <= figure <= HIGHEST:
            return f"its {name} {_figure(figure)} is outside [1e-12, 1e12]"
    rate = quote.base_amount / quote.currency_amount
    if not LOWEST <= rate <= HIGHEST:
        return f"the rate {_figure(rate)} is outside [1e-12, 1e12]"
    if last is not None and (rate > last * MAX_FACTOR or rate * MAX_FACTOR < last):
        return (
            f"the rate {_figure(rate)} is more than {MAX_FACTOR} times away from the last"
            f" stored one ({_figure(last)})"
        )
    return None


def _figure(value: Decimal) -> str:
    text = str(value)
    return text if len(text) <= 30 else f"{value:.6E}"


def _plausible(
    quotes: list[Quote],
    last: Mapping[str, Decimal],
    report: RateReport,
    log: structlog.typing.FilteringBoundLogger,
) -> list[Quote]:
    """The plausible quotes; each refused one is logged and noted in the report."""
    kept = []
    for q in quotes:
        why = implausible(q, last.get(q.currency))
        if why is None:
            kept.append(q)
            continue
        report.refused[q.currency] = f"{q.source}: {why}"
        log.warning(
            "rates.refused", source=q.source, currency=q.currency, day=q.day.isoformat(), why=why
        )
    return kept


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value is not None else None


async def currencies_in_use(conn: Connection) -> list[str]:
    """Every currency of an account, as the snapshot reads it (blank: EUR, Konto's default)."""
    rows = await conn.fetch(
        """SELECT DISTINCT coalesce(nullif(upper(btrim(currency)), ''), 'EUR') AS currency
             FROM bank_accounts"""
    )
    return [r["currency"] for r in rows]


def account_currency(raw: object) -> str:
    """An account's currency by the rule of ``currencies_in_use`` and the snapshot statement
    (spaces trimmed, upper case, blank or NULL: EUR), for a value read from Konto's SQLite."""
    text = "" if raw is None else raw if isinstance(raw, str) else str(raw)
    return text.strip(" ").upper() or "EUR"


STORE_SQL = """
INSERT INTO kontod_rates AS r (base, currency, day, currency_amount, base_amount, source, fetched_at)
SELECT $1, q.currency, q.day, q.currency_amount, q.base_amount, q.source, $7
  FROM unnest($2::text[], $3::date[], $4::numeric[], $5::numeric[], $6::text[])
       AS q (currency, day, currency_amount, base_amount, source)
ON CONFLICT (base, currency, day) DO UPDATE
   SET currency_amount = EXCLUDED.currency_amount, base_amount = EXCLUDED.base_amount,
       source = EXCLUDED.source, fetched_at = EXCLUDED.fetched_at
 WHERE (r.currency_amount, r.base_amount, r.source)
       IS DISTINCT FROM (EXCLUDED.currency_amount, EXCLUDED.base_amount, EXCLUDED.source)
"""


async def store(conn: Connection, base: str, quotes: Iterable[Quote], fetched_at: datetime) -> int:
    """Upsert the quotes in one statement (later quotes of a currency and day win); return
    how many rows were inserted or changed."""
    unique = {(q.currency, q.day): q for q in quotes}
    if not unique:
        return 0
    qs = list(unique.values())
    for q in qs:
        why = implausible(q)
        if why is not None:
            raise ValueError(f"not storing the rate of {q.currency} on {q.day}: {why}")
    status = await conn.execute(
        STORE_SQL,
        base,
        [q.currency for q in qs],
        [q.day for q in qs],
        [q.currency_amount for q in qs],
        [q.base_amount for q in qs],
        [q.source for q in qs],
        fetched_at,
    )
    return int(status.split()[-1])


async def newest(
    conn: Connection, base: str, currencies: Iterable[str], day: date
) -> dict[str, tuple[date, str]]:
    """The newest plausible stored rate (day, source) on or before ``day`` of each currency,
    any age; a stored row with a non-finite or out-of-range figure is passed over."""
    rows = await conn.fetch(
        f"""SELECT DISTINCT ON (currency) currency, day, source FROM kontod_rates
             WHERE base = $1 AND currency = ANY($2::text[]) AND day <= $3 AND {PLAUSIBLE_SQL}
             ORDER BY currency, day DESC""",
        base,
        list(currencies),
        day,
    )
    return {r["currency"]: (r["day"], r["source"]) for r in rows}


async def last_rates(
    conn: Connection, base: str, currencies: Iterable[str], day: date
) -> dict[str, Decimal]:
    """The newest plausible stored rate (value of one unit in the base) on or before ``day``
    of each currency: what a new rate is held to."""
    rows = await conn.fetch(
        f"""SELECT DISTINCT ON (currency) currency, rate FROM kontod_rates
             WHERE base = $1 AND currency = ANY($2::text[]) AND day <= $3 AND {PLAUSIBLE_SQL}
             ORDER BY currency, day DESC""",
        base,
        list(currencies),
        day,
    )
    return {r["currency"]: r["rate"] for r in rows}


def _positive(value: Any, source: str, what: str) -> Decimal:
    amount: Decimal | None
    if isinstance(value, bool):
        amount = None
    elif isinstance(value, Decimal | int):
        amount = Decimal(value)
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            amount = None
    else:
        amount = None
    if amount is None or not amount.is_finite() or amount <= 0:
        raise RateSourceError(source, f"{what} is not a positive number ({str(value)[:40]!r})")
    return amount


def _error_text(data: Mapping[str, Any]) -> str:
    status = data.get("status")
    if isinstance(status, dict):
        return f"{status.get('error_code')}: {str(status.get('error_message', ''))[:200]}"
    return str(data.get("error", ""))[:200]


def _detail(body: bytes) -> str:
    """The message of a JSON error body (CoinGecko's ``{status: {error_code, error_message}}``
    or ``{error}``), if there is one."""
    try:
        data = loads(body)
    except ValueError:
        return ""
    text = _error_text(data) if isinstance(data, dict) else ""
    return f" ({text})" if text else ""


def crypto_map(overrides: Mapping[str, str]) -> dict[str, str]:
    """The shipped symbol -> coin id map with the operator's additions and changes."""
    return {**SHIPPED_CRYPTO_IDS, **overrides}
