"""A client for the Powens API 2.0 endpoints the refresh job reads, with timeouts, retries and a rate.

It runs on an ``aiohttp.ClientSession`` shared by the whole process: ``GET /users/me/connections``
(state of each bank connection), ``GET /users/me/accounts?all`` (deleted and disabled accounts
included), ``GET /users/me/accounts/{id}/transactions`` (``limit=1000``, pages followed through
``_links.next.href`` as given) and ``POST /auth/token/refresh`` (a new token pair for a refresh
token, with the web app's client id and secret; one attempt). Every request, retries included,
first takes a token from a bucket shared by the process (``rate`` requests per second). Transient
failures (connection errors, timeouts, 5xx, 429) are retried with exponential backoff and jitter,
honouring ``Retry-After``; every other failure raises a typed ``ProviderError`` whose message is
safe to log and store: the user's token never appears in it.

Answers are bounded: a body is read to its end up to ``max_body`` bytes (kontod/providers/answers.py),
its JSON may nest at most 64 levels and holds no ``NaN`` or ``Infinity``, and the pages of one
account's transactions may bring at most ``max_items`` transactions and ``max_bytes`` bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Unpack
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from kontod.providers.answers import BANK_MAX_BODY, BodyTooLarge, MiB, format_size, loads, read_body
from kontod.providers.backoff import Backoff, BackoffOptions, Sleep, Transient, transient_status
from kontod.providers.backoff import backoff_seconds as backoff_seconds
from kontod.providers.backoff import retry_after_seconds as retry_after_seconds

# (endpoint label, status code as text or "timeout"/"connection_error", seconds), once per attempt.
Observer = Callable[[str, str, float], None]

CONNECTIONS = "connections"
ACCOUNTS = "accounts"
TRANSACTIONS = "transactions"
TOKEN_REFRESH = "token_refresh"  # noqa: S105 (an endpoint label, not a secret)
# The two tokens of a refresh's answer, access first.
TOKEN_FIELDS = ("access_token", "refresh_token")
# Powens' maximum page size for transactions; the parameter is required.
PAGE_LIMIT = 1000
# A transaction list longer than this many pages is taken for a loop in the provider's links.
MAX_PAGES = 10_000
# What the pages of one account may bring in all, before the account is refused: a real
# account has far fewer transactions since its last sync (100 000 is 27 a day for ten years),
# and the bytes bound what the parsed pages can hold in memory.
MAX_ACCOUNT_ITEMS = 100_000
MAX_ACCOUNT_BYTES = 128 * MiB
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"


class ProviderError(Exception):
    """The provider did not give a usable answer; ``str()`` says what and where, without secrets.

    ``status``, ``code``, ``description`` and ``request_id`` come from the HTTP answer and the
    Powens error body (``{code, description, message, request_id}``) when there was one.
    """

    kind = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        code: str | None = None,
        description: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.description = description
        self.request_id = request_id


class ProviderAuthError(ProviderError):
    """401: the token is wrong or revoked; the connection needs a new token."""

    kind = "token_rejected"


class ProviderSetupError(ProviderError):
    """403: the token lacks a scope, a problem of the Powens client set-up, not of the user."""

    kind = "setup_error"


class ProviderBadResponse(ProviderError):
    """The answer was a success but its body cannot be used (not JSON, missing fields)."""

    kind = "bad_response"


class ProviderUnavailable(ProviderError):
    """Every attempt hit a transient failure (timeout, connection error, 5xx, 429)."""

    kind = "unavailable"


@dataclass(frozen=True)
class TokenPair:
    """The access and refresh tokens ``/auth/token/refresh`` gives; kept out of repr."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)


@dataclass(frozen=True)
class ProviderConnection:
    """A bank connection as Powens reports it; ``state`` None means the last sync went well."""

    id: str
    state: str | None
    error_message: str | None
    last_update: datetime | None
    next_try: datetime | None


@dataclass(frozen=True)
class ProviderAccount:
    """One account as the provider reports it; ``balance`` None when the provider has none.

    ``last_update`` is when Powens last got the account's data from the bank.
    """

    id: str
    name: str | None
    type: str | None
    usage: str | None
    balance: Decimal | None
    connection_id: str | None
    currency: str | None = None
    last_update: datetime | None = None
    deleted: bool = False
    disabled: bool = False


@dataclass(frozen=True)
class ProviderTransaction:
    """One transaction; ``id`` is the provider's, stable across imports.

    ``category`` is the ``name`` of a ``category`` object, as the web app takes it (Powens
    documents no such field, so it is None in practice, as in the web app); ``coming`` is a pending
    transaction, not booked yet; ``deleted`` one Powens has removed. ``id`` is None when Powens
    gave none; ``date_text`` and ``value_text`` are then the date and the value as JavaScript
    prints the JSON it got (``date || rdate``, ``String(value)``), which the web app's key for
    such a transaction is made of.
    """

    id: str | None
    date: date | None
    amount: Decimal | None
    label: str | None
    category: str | None
    coming: bool = False
    deleted: bool = False
    last_update: datetime | None = None
    date_text: str | None = None
    value_text: str | None = None


class RateLimiter:
    """A token bucket: at most ``rate`` requests per second on average, bursts up to ``burst``.

    One instance is shared by every request of the process, whatever the worker.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be greater than 0")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self.burst
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait for a token; callers are served in the order they arrive."""
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await self._sleep((1 - self._tokens) / self.rate)


class PowensClient:
    """Reads a user's connections, accounts and transactions from Powens API 2.0 with the user's token."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        timeout: float = 30.0,
        observe: Observer | None = None,
        rate: float | RateLimiter = 10.0,
        max_body: int | None = None,
        max_items: int = MAX_ACCOUNT_ITEMS,
        max_bytes: int = MAX_ACCOUNT_BYTES,
        **retry: Unpack[BackoffOptions],
    ) -> None:
        """``retry`` sets the retries (``attempts``, ``backoff``, ... of ``Backoff``); a
        ``Retry-After`` of up to 120 s is waited for unless ``max_retry_after`` says otherwise.

        ``max_body`` caps one answer's body (None: 8 MiB); ``max_items`` and ``max_bytes``
        cap what the pages of one account's transactions bring in all."""
        self._session = session
        self.max_body = BANK_MAX_BODY if max_body is None else max_body
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._base = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_s = timeout
        # A provider asking for a longer pause than max_retry_after is treated as down for this
        # user now, rather than holding one of the few concurrency slots for minutes.
        retry.setdefault("max_retry_after", 120.0)
        self._retry = Backoff(**retry)
        self._observe = observe
        self.limiter = rate if isinstance(rate, RateLimiter) else RateLimiter(rate)
        base = urlsplit(self._base)
        self._origin = (base.scheme, base.netloc)

    async def connections(self, token: str) -> list[ProviderConnection]:
        """``GET /users/me/connections``: the token's bank connections and their sync state."""
        url = f"{self._base}/users/me/connections"
        body, _ = await self._get_json(token, CONNECTIONS, CONNECTIONS, url, None)
        return [_connection(item) for item in _list(body, CONNECTIONS, CONNECTIONS)]

    async def accounts(self, token: str) -> list[ProviderAccount]:
        """``GET /users/me/accounts?all``: every account of the token, deleted and disabled too."""
        url = f"{self._base}/users/me/accounts"
        body, _ = await self._get_json(token, ACCOUNTS, ACCOUNTS, url, {"all": "true"})
        return [_account(item) for item in _list(body, ACCOUNTS, ACCOUNTS)]

    async def transactions(
        self,
        token: str,
        account_id: str,
        *,
        since: datetime | None = None,
        limit: int = PAGE_LIMIT,
    ) -> list[ProviderTransaction]:
        """Every transaction of an account changed since ``since`` (all when None), every page.

        Deleted transactions are included (``all``), so that they can be removed locally.
        """
        url = f"{self._base}/users/me/accounts/{quote(account_id, safe='')}/transactions"
        what = f"transactions of account {account_id}"
        first = {"limit": str(limit), "all": "true"}
        if since is not None:
            first["last_update"] = since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        params: dict[str, str] | None = first
        out: list[ProviderTransaction] = []
        # Digests, not the links: a provider giving ever longer links must not grow this set.
        seen: set[bytes] = set()
        received = 0
        for _ in range(MAX_PAGES):
            body, size = await self._get_json(token, TRANSACTIONS, what, url, params)
            received += size
            if received > self.max_bytes:
                raise _bad_page(
                    f"{what}: the pages hold more than {self.max_bytes} bytes"
                    f" ({format_size(self.max_bytes)}), more than kontod takes for one account"
                )
            items = _list(body, TRANSACTIONS, what)
            if len(out) + len(items) > self.max_items:
                raise _bad_page(
                    f"{what}: the pages hold more than {self.max_items} transactions,"
                    " more than kontod takes for one account"
                )
            out.extend(_transaction(item, account_id) for item in items)
            href = _next_href(body)
            if href is None:
                return out
            # The link is followed as given (it carries the limit and filters); only its host
            # is checked, since the bearer token goes with it.
            url, params = urljoin(url, href), None
            if (urlsplit(url).scheme, urlsplit(url).netloc) != self._origin:
                raise _bad_page(f"{what}: the next page is on another host")
            digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).digest()
            if digest in seen:
                raise _bad_page(f"{what}: the next page link repeats itself")
            seen.add(digest)
        raise _bad_page(f"{what}: more than {MAX_PAGES} pages")

    async def refresh_token(self, client_id: str, client_secret: str, refresh: str) -> TokenPair:
        """``POST /auth/token/refresh`` as the web app calls it: a new pair for ``refresh``.

        One attempt, never retried: Powens takes a refresh token once, so a retry after an
        answer lost on the way would be refused and would hide the pair the first one made.
        """
        url = f"{self._base}/auth/token/refresh"
        what = "token refresh"
        payload = {"client_id": client_id, "client_secret": client_secret, "refresh_token": refresh}
        await self.limiter.acquire()
        started = time.monotonic()
        try:
            async with self._session.post(
                url,
                json=payload,
                headers={"Accept": "application/json"},
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                body = await read_body(resp, self.max_body)
        except BodyTooLarge as exc:
            self._report(TOKEN_REFRESH, str(status), started)
            raise ProviderBadResponse(
                f"{what}: {exc}", endpoint=TOKEN_REFRESH, status=status
            ) from None
        except TimeoutError:
            self._report(TOKEN_REFRESH, TIMEOUT, started)
            raise ProviderUnavailable(
                f"{what}: no answer within {self._timeout_s:g} s", endpoint=TOKEN_REFRESH
            ) from None
        except aiohttp.ClientError as exc:
            self._report(TOKEN_REFRESH, CONNECTION_ERROR, started)
            detail = _scrub(str(exc) or type(exc).__name__, refresh, client_secret)
            raise ProviderUnavailable(
                f"{what}: connection failed ({detail})", endpoint=TOKEN_REFRESH
            ) from None
        self._report(TOKEN_REFRESH, str(status), started)
        if not 200 <= status < 300:
            raise _error_from_body(TOKEN_REFRESH, what, status, body, refresh, client_secret)
        answer = _parse_json(body, TOKEN_REFRESH, what, refresh)
        tokens = [answer.get(k) if isinstance(answer, dict) else None for k in TOKEN_FIELDS]
        if not all(isinstance(t, str) and t for t in tokens):
            raise _bad(TOKEN_REFRESH, "the answer lacks access_token or refresh_token")
        return TokenPair(str(tokens[0]), str(tokens[1]))

    async def _get_json(
        self, token: str, endpoint: str, what: str, url: str, params: Mapping[str, str] | None
    ) -> tuple[Any, int]:
        """The decoded JSON of a 2xx answer and the size of its body, retrying transient
        failures.

        ``endpoint`` labels the attempt for the observer (few values); ``what`` names the
        request in error messages.
        """
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

        async def attempt(n: int) -> Any:
            await self.limiter.acquire()
            started = time.monotonic()
            try:
                # Redirects are not followed: the bearer token must only go to the configured host.
                async with self._session.get(
                    url,
                    headers=headers,
                    params=params,
                    timeout=self._timeout,
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
                    retry_header = resp.headers.get("Retry-After")
                    body = await read_body(resp, self.max_body)
            except BodyTooLarge as exc:
                self._report(endpoint, str(status), started)
                raise ProviderBadResponse(
                    f"{what}: {exc}", endpoint=endpoint, status=status
                ) from None
            except TimeoutError:
                self._report(endpoint, TIMEOUT, started)
                return Transient(
                    ProviderUnavailable(
                        f"{what}: no answer within {self._timeout_s:g} s after {n} attempt(s)",
                        endpoint=endpoint,
                    )
                )
            except aiohttp.ClientError as exc:
                self._report(endpoint, CONNECTION_ERROR, started)
                detail = _scrub(str(exc) or type(exc).__name__, token)
                return Transient(
                    ProviderUnavailable(
                        f"{what}: connection failed after {n} attempt(s) ({detail})",
                        endpoint=endpoint,
                    )
                )
            self._report(endpoint, str(status), started)
            if 200 <= status < 300:
                return _parse_json(body, endpoint, what, token), len(body)
            error = _error_from_body(endpoint, what, status, body, token)
            if not transient_status(status):
                raise error
            retry_after = self._retry.retry_after(retry_header)
            longest = self._retry.max_retry_after
            too_long = retry_after is not None and retry_after > longest
            note = (
                f" (Retry-After {retry_after:g} s is longer than the {longest:g} s kontod waits)"
                if too_long
                else ""
            )
            unavailable = ProviderUnavailable(
                f"{error} after {n} attempt(s){note}",
                endpoint=endpoint,
                status=status,
                code=error.code,
                description=error.description,
                request_id=error.request_id,
            )
            if too_long:
                raise unavailable
            return Transient(unavailable, retry_after)

        return await self._retry.run(attempt)

    def _report(self, endpoint: str, outcome: str, started: float) -> None:
        if self._observe is not None:
            self._observe(endpoint, outcome, time.monotonic() - started)


def _scrub(text: str, *secrets: str) -> str:
    """Text from outside (error bodies, library messages) with the token (and any other
    secret given) blotted out."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _parse_json(body: bytes, endpoint: str, what: str, token: str) -> Any:
    try:
        # Decimals keep money exact; NaN and Infinity are not amounts; the depth is bounded.
        return loads(body)
    except ValueError as exc:
        raise ProviderBadResponse(
            f"{what}: the answer is not valid JSON ({_scrub(str(exc), token)})",
            endpoint=endpoint,
            status=200,
        ) from None


# Control characters (NUL among them) in an error text: PostgreSQL text cannot hold NUL, and
# none belongs in a log line or a terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def _error_from_body(
    endpoint: str, what: str, status: int, body: bytes, *secrets: str
) -> ProviderError:
    """The error an HTTP failure stands for, with the fields of a Powens error body if any."""
    fields: dict[str, str] = {}
    try:
        parsed = loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for key in ("code", "description", "message", "request_id"):
            value = parsed.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool):
                text = _CONTROL.sub(" ", _scrub(str(value), *secrets)).strip()
                if text:
                    fields[key] = text[:300]
    code = fields.get("code")
    description = fields.get("description") or fields.get("message")
    detail = ": ".join(part for part in (code, description) if part)
    message = f"{what}: HTTP {status}" + (f" ({detail})" if detail else "")
    if fields.get("request_id"):
        message += f" [request_id {fields['request_id']}]"
    cls = {401: ProviderAuthError, 403: ProviderSetupError}.get(status, ProviderError)
    return cls(
        message,
        endpoint=endpoint,
        status=status,
        code=code,
        description=description,
        request_id=fields.get("request_id"),
    )


def _bad(endpoint: str, what: str) -> ProviderBadResponse:
    return ProviderBadResponse(f"{endpoint}: {what}", endpoint=endpoint, status=200)


def _show(value: object) -> str:
    """A short rendering of a bad value for a message: enough to recognise it, no more."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _identifier(value: object, endpoint: str, what: str) -> str:
    # PostgreSQL text cannot hold NUL, which JSON can: drop it rather than fail the batch.
    text = str(value).replace("\x00", "") if isinstance(value, int | str) else ""
    if isinstance(value, bool) or text == "":
        raise _bad(endpoint, f"{what} has no usable 'id' ({_show(value)})")
    return text


def _text(value: object) -> str | None:
    text = value.replace("\x00", "") if isinstance(value, str) else ""
    return text or None


def _decimal(value: object, endpoint: str, what: str) -> Decimal | None:
    """An exact amount from a JSON number (already a Decimal or int) or a numeric string."""
    if value is None:
        return None
    amount: Decimal | None = None
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int) and not isinstance(value, bool):
        amount = Decimal(value)
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            amount = None
    if amount is None or not amount.is_finite():
        raise _bad(endpoint, f"{what} is not a number ({_show(value)})")
    return amount


def _date(value: object, endpoint: str, what: str) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            # Powens sends "YYYY-MM-DD", sometimes followed by a time.
            return date.fromisoformat(value[:10])
        except ValueError:
            pass
    raise _bad(endpoint, f"{what} is not a date ({_show(value)})")


def _list(body: Any, key: str, what: str) -> list[Any]:
    items = body.get(key) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise ProviderBadResponse(
            f"{what}: the answer has no '{key}' list", endpoint=key, status=200
        )
    return items


def _bad_page(message: str) -> ProviderBadResponse:
    return ProviderBadResponse(message, endpoint=TRANSACTIONS, status=200)


def _next_href(body: Any) -> str | None:
    links = body.get("_links") if isinstance(body, dict) else None
    nxt = links.get("next") if isinstance(links, dict) else None
    href = nxt.get("href") if isinstance(nxt, dict) else None
    return href if isinstance(href, str) and href else None


def _datetime(value: object, endpoint: str, what: str) -> datetime | None:
    """A Powens time: ``YYYY-MM-DD HH:MM:SS`` in UTC, or ISO 8601 with an offset."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise _bad(endpoint, f"{what} is not a date and time ({_show(value)})")


def _flag(value: object) -> bool:
    """Powens marks ``deleted``/``disabled`` with a time (or true); null or false is not set."""
    return value is not None and value is not False and value != ""


def _connection(item: object) -> ProviderConnection:
    if not isinstance(item, dict):
        raise _bad(CONNECTIONS, f"an entry of 'connections' is not an object ({_show(item)})")
    cid = _identifier(item.get("id"), CONNECTIONS, "a connection")
    where = f"connection {cid}"
    return ProviderConnection(
        id=cid,
        state=_text(item.get("state")),
        error_message=_text(item.get("error_message")),
        last_update=_datetime(item.get("last_update"), CONNECTIONS, f"last_update of {where}"),
        next_try=_datetime(item.get("next_try"), CONNECTIONS, f"next_try of {where}"),
    )


def _account(item: object) -> ProviderAccount:
    if not isinstance(item, dict):
        raise _bad(ACCOUNTS, f"an entry of 'accounts' is not an object ({type(item).__name__})")
    account_id = _identifier(item.get("id"), ACCOUNTS, "an account")
    where = f"account {account_id}"
    balance = _decimal(item.get("balance"), ACCOUNTS, f"the balance of {where}")
    connection = item.get("id_connection")
    currency = item.get("currency")
    return ProviderAccount(
        id=account_id,
        name=_text(item.get("name")) or _text(item.get("original_name")),
        type=_text(item.get("type")),
        usage=_text(item.get("usage")),
        balance=balance,
        connection_id=None if connection is None else str(connection),
        currency=_text(currency.get("id")) if isinstance(currency, dict) else _text(currency),
        last_update=_datetime(item.get("last_update"), ACCOUNTS, f"last_update of {where}"),
        deleted=_flag(item.get("deleted")),
        disabled=_flag(item.get("disabled")),
    )


def _transaction(item: object, account_id: str) -> ProviderTransaction:
    where = f"a transaction of account {account_id}"
    if not isinstance(item, dict):
        raise _bad(TRANSACTIONS, f"{where} is not an object ({type(item).__name__})")
    raw_id = item.get("id")
    tx_id = None if raw_id is None else _identifier(raw_id, TRANSACTIONS, where)
    where = f"transaction {tx_id or '(no id)'} of account {account_id}"
    raw_date = item.get("date") or item.get("rdate")
    raw_amount = item.get("value") if item.get("value") is not None else item.get("amount")
    category = item.get("category")
    return ProviderTransaction(
        id=tx_id,
        date=_date(raw_date, TRANSACTIONS, f"the date of {where}"),
        amount=_decimal(raw_amount, TRANSACTIONS, f"the amount of {where}"),
        label=_text(item.get("original_wording")) or _text(item.get("wording")),
        category=_text(category.get("name")) if isinstance(category, dict) else None,
        coming=item.get("coming") is True,
        deleted=_flag(item.get("deleted")),
        last_update=_datetime(item.get("last_update"), TRANSACTIONS, f"last_update of {where}"),
        date_text=_js_text(raw_date),
        value_text=_js_text(item.get("value")),
    )


def _js_text(value: object) -> str:
    """A JSON value as JavaScript's ``String()`` prints it (numbers in their shortest form:
    ``100``, ``-12.5``, ``1e-7``), for the web app's keys."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal | int | float):
        number = float(value)
        if number.is_integer() and abs(number) < 1e21:
            return str(int(number))
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(number))
    return str(value)
