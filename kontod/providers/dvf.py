"""The public DVF sales files (geo-DVF: one CSV per commune and year), read with the shared
client rules: a timeout per request, retries with backoff, a request rate, a size cap.

The source publishes ``{base}/{year}/communes/{department}/{commune}.csv`` under a listing of
its years (``{base}/``, an HTML index whose links are ``2024/``, ``2023/``, …). A commune with
no sale in a year, or a year not published yet, has no file (404): that is no sale, not a
failure. A file is asked for with the validators of the copy the caller keeps (``ETag`` as
``If-None-Match``, ``Last-Modified`` as ``If-Modified-Since``), so that an unchanged file
costs a 304 and no body.

A DVF file has one line per lot of a sale (the flat, its cellar, its parking space, each
with the sale's whole price), so the lines are grouped by their mutation id
(``group_sales``): a sale of one dwelling counts once with that dwelling's surface; a sale of
several dwellings is left out, since its price cannot be split between them.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Literal, Unpack

import aiohttp

from kontod.providers.answers import BodyTooLarge, MiB, read_body
from kontod.providers.backoff import Backoff, BackoffOptions, Transient, transient_status
from kontod.providers.powens import Observer, RateLimiter

# A commune's file of one year is at most a few MiB (Paris's arrondissements are the largest);
# KONTOD_PROVIDER_MAX_BODY changes it.
DVF_MAX_BODY = 64 * MiB
# The listing of years is a small HTML page.
LISTING_MAX_BODY = 1 * MiB
DWELLINGS = ("Appartement", "Maison")
SALE = "Vente"
# Surfaces under this (m²) are left out, as the web app does: a box, not a dwelling.
MIN_SURFACE = Decimal(9)
# The columns a file must have; the others are ignored.
COLUMNS = (
    "id_mutation",
    "nature_mutation",
    "valeur_fonciere",
    "type_local",
    "surface_reelle_bati",
    "longitude",
    "latitude",
)
# The observer's labels of the two kinds of request.
FILE = "dvf_file"
LISTING = "dvf_listing"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"

_COMMUNE = re.compile(r"(?:\d{2}|2[AB])\d{3}")
_YEAR_LINK = re.compile(r"""href=["']?(?:\./)?(\d{4})/["' >]""")


class DvfError(Exception):
    """The source gave no usable answer; ``str()`` says which file and why (safe to log)."""


class DvfUnavailable(DvfError):
    """The source did not answer, or answered 5xx/429, after every attempt."""


class DvfBadAnswer(DvfError):
    """The source answered something kontod cannot read (a status, a body, a missing column)."""


def department(commune: str) -> str:
    """The department of an INSEE commune code: its first two characters (``2A``/``2B`` for
    Corsica), or three for the overseas departments (971 to 976). ``ValueError`` for text that
    is not a commune code."""
    code = commune.strip().upper()
    if not _COMMUNE.fullmatch(code):
        raise ValueError(f"{commune!r} is not an INSEE commune code (5 characters, 2A/2B allowed)")
    return code[:3] if code.startswith("97") else code[:2]


@dataclass(frozen=True)
class Sale:
    """One sale of one dwelling: its price, surface and place (None: not geocoded)."""

    kind: str
    price: Decimal
    surface: Decimal
    latitude: float | None
    longitude: float | None

    @property
    def price_m2(self) -> Decimal:
        return self.price / self.surface


@dataclass
class Grouping:
    """What grouping a file's lines left out, by reason (for the run's counts)."""

    sales: list[Sale] = field(default_factory=list)
    several_dwellings: int = 0
    not_a_sale: int = 0
    unreadable: int = 0
    too_small: int = 0


def group_sales(rows: Iterable[dict[str, str]]) -> Grouping:
    """The dwelling sales of a file's lines, one per mutation, in the order they first appear."""
    mutations: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        mutations.setdefault(row["id_mutation"], []).append(row)
    out = Grouping()
    for lines in mutations.values():
        dwellings = [r for r in lines if r["type_local"] in DWELLINGS]
        if not dwellings:
            continue
        if len(dwellings) > 1:
            out.several_dwellings += 1
            continue
        (line,) = dwellings
        if line["nature_mutation"] != SALE:
            out.not_a_sale += 1
            continue
        price, surface = _decimal(line["valeur_fonciere"]), _decimal(line["surface_reelle_bati"])
        if price is None or surface is None or price <= 0:
            out.unreadable += 1
            continue
        if surface < MIN_SURFACE:
            out.too_small += 1
            continue
        out.sales.append(
            Sale(
                line["type_local"],
                price,
                surface,
                _coordinate(line["latitude"], 90),
                _coordinate(line["longitude"], 180),
            )
        )
    return out


def parse_file(body: bytes, what: str) -> Grouping:
    """The dwelling sales of a DVF CSV file (UTF-8, comma-separated, quoted fields allowed)."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DvfBadAnswer(f"{what}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DvfBadAnswer(f"{what}: no column {', '.join(missing)} in the header")
    try:
        # A short line's missing fields read as empty (restval); a long line's extra ones are
        # ignored.
        rows = [{c: (row.get(c) or "").strip() for c in COLUMNS} for row in reader]
    except csv.Error as exc:
        raise DvfBadAnswer(f"{what}: not a CSV file kontod can read ({exc})") from None
    return group_sales(rows)


def parse_years(body: bytes) -> list[int]:
    """The years the listing links to, newest first."""
    text = body.decode("utf-8", "replace")
    return sorted({int(y) for y in _YEAR_LINK.findall(text)}, reverse=True)


def _decimal(text: str) -> Decimal | None:
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _coordinate(text: str, bound: float) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and -bound <= value <= bound else None


@dataclass(frozen=True)
class Validators:
    """What identifies the copy of a file the caller keeps (None: the server gave none)."""

    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class Fetched:
    """One file as the source answered: ``changed`` (with its sales and validators),
    ``unchanged`` (304: the caller's copy stands) or ``missing`` (404: no sale)."""

    state: Literal["changed", "unchanged", "missing"]
    grouping: Grouping | None = None
    validators: Validators = Validators()
    size: int = 0


class DvfClient:
    """Reads the listing of years and the commune files of one geo-DVF base URL."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        timeout: float = 30.0,
        observe: Observer | None = None,
        rate: float | RateLimiter = 10.0,
        max_body: int | None = None,
        **retry: Unpack[BackoffOptions],
    ) -> None:
        self._session = session
        self.base = base_url.rstrip("/")
        self.max_body = DVF_MAX_BODY if max_body is None else max_body
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_s = timeout
        self._observe = observe
        self._retry = Backoff(**retry)
        self.limiter = rate if isinstance(rate, RateLimiter) else RateLimiter(rate)

    def file_url(self, commune: str, year: int) -> str:
        code = commune.strip().upper()
        return f"{self.base}/{year}/communes/{department(code)}/{code}.csv"

    async def years(self) -> list[int]:
        """The years the source publishes, newest first (``DvfBadAnswer`` when it lists none)."""
        url = f"{self.base}/"
        status, body, _ = await self._get(url, LISTING, "the listing of years", None)
        if status != 200:
            raise DvfBadAnswer(f"the listing of years {url}: HTTP {status}")
        years = parse_years(body)
        if not years:
            raise DvfBadAnswer(f"the listing of years {url} links to no year")
        return years

    async def fetch(self, commune: str, year: int, kept: Validators | None) -> Fetched:
        """The file of ``commune`` for ``year``, asked conditionally when ``kept`` is given."""
        url = self.file_url(commune, year)
        what = f"the DVF file of {commune.strip().upper()} for {year}"
        status, body, validators = await self._get(url, FILE, what, kept)
        if status == 304 and kept is not None:
            return Fetched("unchanged", validators=kept)
        if status in (404, 410):
            return Fetched("missing")
        if status != 200:
            raise DvfBadAnswer(f"{what}: HTTP {status}")
        return Fetched("changed", parse_file(body, what), validators, len(body))

    async def _get(
        self, url: str, endpoint: str, what: str, kept: Validators | None
    ) -> tuple[int, bytes, Validators]:
        headers = {}
        if kept is not None and kept.etag:
            headers["If-None-Match"] = kept.etag
        if kept is not None and kept.last_modified:
            headers["If-Modified-Since"] = kept.last_modified
        cap = LISTING_MAX_BODY if endpoint == LISTING else self.max_body

        async def attempt(n: int) -> tuple[int, bytes, Validators] | Transient:
            await self.limiter.acquire()
            started = time.monotonic()
            try:
                async with self._session.get(url, headers=headers, timeout=self._timeout) as resp:
                    status = resp.status
                    retry_header = resp.headers.get("Retry-After")
                    found = Validators(resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
                    body = await read_body(resp, cap) if status == 200 else b""
            except BodyTooLarge as exc:
                self._report(endpoint, "200", started)
                raise DvfBadAnswer(f"{what}: {exc}") from None
            except TimeoutError:
                self._report(endpoint, TIMEOUT, started)
                return Transient(
                    DvfUnavailable(
                        f"{what}: no answer within {self._timeout_s:g} s after {n} attempt(s)"
                    )
                )
            except aiohttp.ClientError as exc:
                self._report(endpoint, CONNECTION_ERROR, started)
                return Transient(
                    DvfUnavailable(
                        f"{what}: connection failed after {n} attempt(s)"
                        f" ({str(exc) or type(exc).__name__})"
                    )
                )
            self._report(endpoint, str(status), started)
            if transient_status(status):
                retry_after = self._retry.retry_after(retry_header)
                longest = self._retry.max_retry_after
                if retry_after is not None and retry_after > longest:
                    raise DvfUnavailable(
                        f"{what}: HTTP {status} asking for a pause of {retry_after:g} s, longer"
                        f" than the {longest:g} s kontod waits"
                    )
                return Transient(
                    DvfUnavailable(f"{what}: HTTP {status} after {n} attempt(s)"), retry_after
                )
            return status, body, found

        return await self._retry.run(attempt)

    def _report(self, endpoint: str, outcome: str, started: float) -> None:
        if self._observe is not None:
            self._observe(endpoint, outcome, time.monotonic() - started)
