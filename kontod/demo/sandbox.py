"""A sandbox bank aggregator speaking the Powens API 2.0 endpoints kontod reads, with demo data.

Served: ``GET /2.0/users/me/connections`` (``state``, ``error_message``, ``last_update``,
``next_try``; ``expand=accounts``), ``GET /2.0/users/me/accounts`` (deleted and disabled
accounts only with ``all``; ``balance`` may be null; ``currency`` objects) and
``GET /2.0/users/me/accounts/{id}/transactions`` (``limit`` required, at most 1000, else 400 with
a Powens error body; pages linked by ``_links.next.href``; filters ``last_update``,
``min_date``, ``max_date``, ``all``; ``categories`` with ``expand=categories``; ``coming`` and
``deleted`` transactions, and transactions with a null ``date``, ``value`` or ``id``), and
``POST /2.0/auth/token/refresh`` (``{client_id, client_secret, refresh_token}`` as JSON) with
refresh-token rotation: each refresh token is taken once, the answer is a new access and
refresh token, and the access token that went with the old refresh token stops working. A
wrong client or a refresh token unknown or already used gets a Powens error body.

Each token is one Powens user. Tokens ``sandbox-user-<n>`` (n >= 1) get deterministic demo data
(see ``demo_accounts``) the first time they are used; a test may change that data through
``Sandbox.user(token)`` or register a user of its own with ``Sandbox.add_user``. Per token, the
sandbox can add latency and inject faults (error statuses, ``Retry-After``, hangs, malformed
bodies, amounts as strings); it counts requests and the highest number answered at once.

Hostile answers, as real HTTP on the wire:

- ``Raw(text)`` is JSON text written as is where a value goes: in a ``Fault``'s ``body``, or
  as an account's ``balance``, a transaction's ``value`` or a connection's ``error_message``.
  ``Raw("1e400")`` and ``Raw("1e200000")`` are numbers beyond any float, ``Raw("NaN")`` and
  ``Raw("Infinity")`` the literals JSON does not have, ``Raw('"a\x00b"')`` a raw NUL in a
  string, ``deep_json(100_000)`` 100 000 nested arrays. A NUL or control character the JSON
  escapes (``"a\u0000b"``) needs no ``Raw``: ``Fault(status=400, body={"code": "x",
  "description": "bad\u0000text"})`` is a Powens error whose description holds a NUL.
- ``Fault(kind="split", pause=0.3)``: the regular answer (or ``status`` and ``body`` when a
  body is given) sent in two writes, ``pause`` seconds apart.
- ``Fault(kind="oversized", size=n)``: a 200 whose valid JSON body is ``n`` bytes, streamed
  without a length; ``Fault(kind="endless")``: a 200 body that never ends. The bytes each such
  answer managed to write before the client hung up are appended to ``Sandbox.streamed``.

Run it alone with ``python -m kontod.demo.sandbox --listen 127.0.0.1:8436``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from aiohttp import web

from kontod.demo.serving import listening

TOKEN_PREFIX = "sandbox-user-"  # noqa: S105 (public demo tokens, not a secret)
API_PREFIX = "/2.0"
CONNECTIONS = "connections"
ACCOUNTS = "accounts"
TRANSACTIONS = "transactions"
TOKEN_REFRESH = "token_refresh"  # noqa: S105 (an endpoint label, not a secret)
MAX_LIMIT = 1000

_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"([1-9]\d{0,8})")

# (name, Powens type, Powens usage, base balance): every demo user has these five accounts.
_ACCOUNT_TEMPLATES: tuple[tuple[str, str, str, Decimal], ...] = (
    ("Compte chèques", "checking", "PRIV", Decimal("1520.37")),
    ("LDDS", "ldds", "PRIV", Decimal("8250.00")),
    ("PEA Bourse", "pea", "PRIV", Decimal("12034.18")),
    ("Prêt immobilier", "loan", "PRIV", Decimal("-148200.55")),
    ("Compte courant pro", "checking", "ORGA", Decimal("4310.90")),
)
ACCOUNTS_PER_USER = len(_ACCOUNT_TEMPLATES)
# (label, category code, parent category code), Powens' ``categories`` shape.
_LABELS = (
    ("CB CARREFOUR MARKET", "groceries", "food"),
    ("PRLV SEPA EDF", "electricity", "housing"),
    ("VIR SALAIRE", "salaries", "income"),
    ("CB SNCF INTERNET", "train", "transport"),
    ("RETRAIT DAB", "withdrawals", "cash"),
)
_PARENTS = {code: parent for _, code, parent in _LABELS}
TRANSACTIONS_PER_ACCOUNT = 3


@dataclass(frozen=True)
class DemoAccount:
    """A demo account as the sandbox serves it to ``token_for(user)``."""

    id: int
    user: int
    name: str
    type: str
    usage: str
    balance: Decimal


@dataclass(frozen=True)
class DemoTransaction:
    """A demo transaction; ``id`` is unique across the whole sandbox."""

    id: int
    account_id: int
    date: date
    value: Decimal
    wording: str
    category: str


def token_for(user: int) -> str:
    """The bearer token of demo user ``user`` (1-based)."""
    return f"{TOKEN_PREFIX}{user}"


def user_of(token: str) -> int | None:
    """The demo user a token stands for, or None when the sandbox does not know it."""
    m = _TOKEN.fullmatch(token)
    return int(m.group(1)) if m else None


def demo_accounts(user: int) -> list[DemoAccount]:
    """The accounts of demo user ``user``: ids ``1000 * (user - 1) + 1`` to ``... + 5``."""
    # Cents vary with the user so that totals differ between users, deterministically.
    shift = Decimal((user * 37) % 1000) + Decimal((user * 13) % 100) / 100
    return [
        DemoAccount(
            id=1000 * (user - 1) + k,
            user=user,
            name=name,
            type=kind,
            usage=usage,
            balance=base - shift if base < 0 else base + shift,
        )
        for k, (name, kind, usage, base) in enumerate(_ACCOUNT_TEMPLATES, start=1)
    ]


def demo_transactions(account_id: int) -> list[DemoTransaction]:
    """The transactions of a demo account, newest first."""
    out = []
    for i in range(TRANSACTIONS_PER_ACCOUNT):
        label, category, _ = _LABELS[(account_id + i) % len(_LABELS)]
        cents = (account_id * 7919 + i * 104729) % 50000 + 1
        value = Decimal(cents) / 100
        out.append(
            DemoTransaction(
                id=account_id * 100 + i + 1,
                account_id=account_id,
                date=date(2026, 3, 1) - timedelta(days=(account_id + i * 5) % 28 + i),
                value=value if label == "VIR SALAIRE" else -value,
                wording=label,
                category=category,
            )
        )
    return out


@dataclass(frozen=True)
class Raw:
    """JSON text the sandbox writes as it is, where a JSON value goes."""

    text: str


def deep_json(depth: int) -> Raw:
    """``depth`` arrays nested in one another: valid JSON no sane answer looks like."""
    return Raw("[" * depth + "]" * depth)


@dataclass
class Fault:
    """One injected misbehaviour, for the next ``times`` matching requests (None: every one).

    ``kind``: ``status`` answers ``status`` with a Powens error body, or with ``body`` (any JSON
    value, ``Raw`` parts written as they are) when given, and ``Retry-After`` when given;
    ``hang`` never answers; ``malformed`` answers 200 with a body that is not JSON;
    ``missing_list`` answers 200 with JSON lacking the list; ``split`` sends the regular answer
    (or ``status`` and ``body``) in two writes ``pause`` seconds apart; ``oversized`` streams
    a 200 of ``size`` bytes; ``endless`` streams a 200 that never ends.
    """

    kind: Literal[
        "status", "hang", "malformed", "missing_list", "split", "oversized", "endless"
    ] = "status"
    status: int = 500
    retry_after: str | None = None
    body: Any = None
    endpoint: Literal["connections", "accounts", "transactions"] | None = None
    times: int | None = None
    pause: float = 0.3
    size: int = 0


@dataclass
class Behaviour:
    """How the sandbox treats one token."""

    latency: float = 0.0
    amounts_as_strings: bool = False
    faults: list[Fault] = field(default_factory=list)

    def next_fault(self, endpoint: str) -> Fault | None:
        """The fault for this request, using up one of its ``times``."""
        for fault in self.faults:
            if fault.endpoint not in (None, endpoint):
                continue
            if fault.times is None:
                return fault
            if fault.times > 0:
                fault.times -= 1
                return fault
        return None


@dataclass
class SandboxConnection:
    """A Powens connection: ``state`` None after a good sync, else why syncing stopped."""

    id: int
    last_update: datetime | None
    state: str | None = None
    error_message: str | Raw | None = None
    next_try: datetime | None = None


@dataclass
class SandboxAccount:
    """A Powens bank account; ``balance`` None is what Powens sends when it has none."""

    id: int
    id_connection: int
    name: str
    type: str
    usage: str | None
    balance: Decimal | Raw | None
    last_update: datetime | None
    currency: str = "EUR"
    deleted: datetime | None = None
    disabled: datetime | None = None


@dataclass
class SandboxTransaction:
    """A Powens transaction; ``coming`` not booked yet, ``deleted`` removed by Powens; ``id``
    None: one Powens gives without an id."""

    id: int | None
    id_account: int
    date: date | None
    value: Decimal | Raw | None
    wording: str
    category: str | None
    last_update: datetime
    coming: bool = False
    deleted: datetime | None = None


@dataclass
class PowensUser:
    """What one token (one Powens user) sees; tests change it in place."""

    connections: list[SandboxConnection]
    accounts: list[SandboxAccount]
    transactions: dict[int, list[SandboxTransaction]] = field(default_factory=dict)

    def account(self, account_id: int) -> SandboxAccount:
        return next(a for a in self.accounts if a.id == account_id)


def demo_user(user: int, synced_at: datetime) -> PowensUser:
    """Demo user ``user``: one connection (id ``user``), five accounts, three transactions each."""
    accounts = [
        SandboxAccount(
            id=a.id,
            id_connection=user,
            name=a.name,
            type=a.type,
            usage=a.usage,
            balance=a.balance,
            last_update=synced_at,
        )
        for a in demo_accounts(user)
    ]
    transactions = {
        a.id: [
            SandboxTransaction(
                id=t.id,
                id_account=a.id,
                date=t.date,
                value=t.value,
                wording=t.wording,
                category=t.category,
                last_update=synced_at,
            )
            for t in demo_transactions(a.id)
        ]
        for a in accounts
    }
    return PowensUser([SandboxConnection(id=user, last_update=synced_at)], accounts, transactions)


RequestHook = Callable[[str, str], Awaitable[None]]


class Sandbox:
    """The sandbox's state: Powens users and behaviours by token, and what it has seen.

    ``synced_at`` is when the demo data was last "synced from the bank": an hour before the
    sandbox was made, unless given.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        synced_at: datetime | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
    ) -> None:
        # The client allowed to refresh tokens; none: every refresh is refused.
        self.client_id = client_id
        self.client_secret = client_secret
        # Refresh tokens not used yet, each with the access token it was issued with.
        self.refresh_tokens: dict[str, str] = {}
        self.used_refresh_tokens: set[str] = set()
        # Access tokens a rotation ended.
        self.revoked: set[str] = set()
        # The refresh token of every refresh asked, accepted or not; the pairs issued.
        self.refreshes: list[str] = []
        self.rotations: list[tuple[str, str]] = []
        self.default = Behaviour(latency=latency)
        self.behaviours: dict[str, Behaviour] = {}
        self.synced_at = synced_at or (
            datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
        )
        self.users: dict[str, PowensUser] = {}
        self.requests: Counter[str] = Counter()
        self.requests_by_token: Counter[str] = Counter()
        self.requests_by_endpoint_token: Counter[tuple[str, str]] = Counter()
        self.arrivals: defaultdict[str, list[float]] = defaultdict(list)
        self.queries: list[tuple[str, dict[str, str]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        # Bytes written by each oversized or endless answer, recorded when it ended.
        self.streamed: list[int] = []
        # Awaited before each answer with (token, endpoint): lets a test act mid-run. For a
        # refresh: (the refresh token, TOKEN_REFRESH), before the client is checked.
        self.on_request: RequestHook | None = None
        self._request_ids = itertools.count(1)
        self._stopping = asyncio.Event()

    def user(self, token: str) -> PowensUser | None:
        """The Powens user behind ``token`` (demo data for sandbox tokens), None if unknown."""
        return None if token in self.revoked else self._owner(token)

    def _owner(self, token: str) -> PowensUser | None:
        """The Powens user an access token was issued for, whether it still works or not."""
        found = self.users.get(token)
        if found is None:
            n = user_of(token)
            if n is None:
                return None
            found = self.users[token] = demo_user(n, self.synced_at)
        return found

    def add_user(self, token: str, user: PowensUser) -> None:
        """Serve ``user`` to ``token`` from now on."""
        self.users[token] = user

    def refresh_token_for(self, access: str) -> str:
        """A refresh token issued with ``access``, as the first code exchange gives one."""
        refresh = f"sandbox-refresh-{secrets.token_hex(8)}"
        self.refresh_tokens[refresh] = access
        return refresh

    def expire(self, access: str) -> None:
        """``access`` stops working (a 401 from now on), as an access token does after its
        hour; a refresh token issued with it still gives a new pair."""
        self.revoked.add(access)

    def grant(self, access: str) -> tuple[str, str]:
        """A new (access, refresh) pair for the Powens user behind ``access``; ``access``
        stays valid. A refresh uses it; a test stands for another client with it."""
        user = self._owner(access)
        if user is None:
            raise ValueError("the sandbox knows no user behind that access token")
        new_access = f"sandbox-access-{secrets.token_hex(8)}"
        self.users[new_access] = user
        return new_access, self.refresh_token_for(new_access)

    def behave(
        self,
        token: str,
        *faults: Fault,
        latency: float | None = None,
        amounts_as_strings: bool = False,
    ) -> None:
        """Set how ``token``'s requests are answered from now on."""
        self.behaviours[token] = Behaviour(
            latency=self.default.latency if latency is None else latency,
            amounts_as_strings=amounts_as_strings,
            faults=list(faults),
        )

    def app(self) -> web.Application:
        """The aiohttp application serving the four endpoints under ``/2.0``."""
        app = web.Application()
        app.router.add_post(f"{API_PREFIX}/auth/token/refresh", self._token_refresh)
        app.router.add_get(f"{API_PREFIX}/users/me/connections", self._connections)
        app.router.add_get(f"{API_PREFIX}/users/me/accounts", self._accounts)
        app.router.add_get(
            f"{API_PREFIX}/users/me/accounts/{{account_id}}/transactions", self._transactions
        )
        return app

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Listen on ``host:port`` (0: any free port) and yield the API base URL."""
        # Cancelling a handler when its client goes away keeps ``in_flight`` true to what the
        # clients are waiting for, and lets a hung request end with the client's timeout.
        self._stopping.clear()
        async with listening(self.app(), host, port) as root:
            try:
                yield root + API_PREFIX
            finally:
                self._stopping.set()

    async def _token_refresh(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self._error(400, "invalidValue", "The body must be a JSON object.")
        refresh = body.get("refresh_token")
        refresh = refresh if isinstance(refresh, str) else ""
        self.requests[TOKEN_REFRESH] += 1
        self.refreshes.append(refresh)
        if self.on_request is not None:
            await self.on_request(refresh, TOKEN_REFRESH)
        if (
            self.client_id is None
            or body.get("client_id") != self.client_id
            or body.get("client_secret") != self.client_secret
        ):
            return self._error(401, "invalidClient", "The client id or secret is wrong.")
        access = self.refresh_tokens.pop(refresh, None)
        if access is None:
            used = refresh in self.used_refresh_tokens
            return self._error(
                400,
                "invalidToken",
                "The refresh token was already used." if used else "The refresh token is unknown.",
            )
        self.used_refresh_tokens.add(refresh)
        new_access, new_refresh = self.grant(access)
        self.revoked.add(access)
        self.rotations.append((new_access, new_refresh))
        return web.json_response(
            {"access_token": new_access, "refresh_token": new_refresh, "token_type": "Bearer"}
        )

    async def _connections(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, CONNECTIONS)

    async def _accounts(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, ACCOUNTS)

    async def _transactions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, TRANSACTIONS)

    async def _answer(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        token = _bearer(request)
        self.requests[endpoint] += 1
        self.requests_by_token[token] += 1
        self.requests_by_endpoint_token[(endpoint, token)] += 1
        self.arrivals[token].append(time.monotonic())
        self.queries.append((request.path, dict(request.query)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            behaviour = self.behaviours.get(token, self.default)
            if behaviour.latency > 0:
                await asyncio.sleep(behaviour.latency)
            if self.on_request is not None:
                await self.on_request(token, endpoint)
            fault = behaviour.next_fault(endpoint)
            if fault is not None and (fault.kind != "split" or fault.body is not None):
                return await self._fault(fault, request)
            answer = self._regular(request, endpoint, token, behaviour)
            if fault is not None:
                return await write_split(request, answer.status, _bytes(answer), fault.pause)
            return answer
        finally:
            self.in_flight -= 1

    def _regular(
        self, request: web.Request, endpoint: str, token: str, behaviour: Behaviour
    ) -> web.Response:
        user = self.user(token)
        if user is None:
            return self._error(401, "invalidToken", "The access token is invalid or revoked.")
        if endpoint == CONNECTIONS:
            return self._connections_answer(request, user, behaviour)
        if endpoint == ACCOUNTS:
            return self._accounts_answer(request, user, behaviour)
        return self._transactions_answer(request, user, behaviour)

    def _connections_answer(
        self, request: web.Request, user: PowensUser, behaviour: Behaviour
    ) -> web.Response:
        expand = "accounts" in request.query.get("expand", "").split(",")
        out = []
        for c in user.connections:
            item = _connection_body(c)
            if expand:
                item["accounts"] = [
                    _account_body(a, behaviour)
                    for a in user.accounts
                    if a.id_connection == c.id and a.deleted is None and a.disabled is None
                ]
            out.append(item)
        return _json({"connections": out, "total": len(out)})

    def _accounts_answer(
        self, request: web.Request, user: PowensUser, behaviour: Behaviour
    ) -> web.Response:
        every = _truthy(request.query.get("all"))
        shown = [a for a in user.accounts if every or (a.deleted is None and a.disabled is None)]
        balances: dict[str, Decimal] = defaultdict(Decimal)
        for a in shown:
            if isinstance(a.balance, Decimal) and a.deleted is None and a.disabled is None:
                balances[a.currency] += a.balance
        return _json(
            {
                "accounts": [_account_body(a, behaviour) for a in shown],
                "balances": {k: _amount(v, behaviour) for k, v in balances.items()},
                "total": len(shown),
            }
        )

    def _transactions_answer(
        self, request: web.Request, user: PowensUser, behaviour: Behaviour
    ) -> web.Response:
        query = request.query
        raw_id = request.match_info["account_id"]
        if not raw_id.isdigit() or not any(a.id == int(raw_id) for a in user.accounts):
            return self._error(404, "accountNotFound", "No such account for this user.")
        if "limit" not in query:
            return self._error(400, "missingParameter", "The parameter 'limit' is required.")
        limit = query["limit"]
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
            return self._error(400, "invalidValue", "'limit' must be between 1 and 1000.")
        try:
            since = _parse_time(query.get("last_update"))
            min_date = _parse_day(query.get("min_date"))
            max_date = _parse_day(query.get("max_date"))
            offset = int(query.get("offset", "0"))
        except ValueError as exc:
            return self._error(400, "invalidValue", str(exc))
        every = _truthy(query.get("all"))
        rows = [
            t
            for t in user.transactions.get(int(raw_id), [])
            if (every or t.deleted is None)
            and (since is None or t.last_update >= since)
            # A transaction without a date is outside any date filter.
            and (min_date is None or (t.date is not None and t.date >= min_date))
            and (max_date is None or (t.date is not None and t.date <= max_date))
        ]
        rows.sort(key=lambda t: (t.date or date.min, t.id or 0), reverse=True)
        page = rows[offset : offset + int(limit)]
        categories = "categories" in query.get("expand", "").split(",")
        links: dict[str, Any] = {"self": {"href": str(request.url)}}
        if offset + int(limit) < len(rows):
            # An opaque link to the next page, as Powens gives it: the client follows it as is.
            links["next"] = {"href": str(request.url.update_query(offset=offset + int(limit)))}
        dated = [t.date for t in rows if t.date is not None]
        page_dated = [t.date for t in page if t.date is not None]
        return _json(
            {
                "transactions": [_transaction_body(t, behaviour, categories) for t in page],
                "first_date": min(dated).isoformat() if dated else None,
                "last_date": max(dated).isoformat() if dated else None,
                "result_min_date": min(page_dated).isoformat() if page_dated else None,
                "result_max_date": max(page_dated).isoformat() if page_dated else None,
                "_links": links,
            }
        )

    async def _fault(self, fault: Fault, request: web.Request) -> web.StreamResponse:
        if fault.kind == "split":
            return await write_split(request, fault.status, dumps(fault.body).encode(), fault.pause)
        if fault.kind in ("oversized", "endless"):
            size = fault.size if fault.kind == "oversized" else None
            head, tail = b'{"accounts": [], "transactions": [], "padding": "', b'"}'
            return await write_stream(request, head, tail, size, self.streamed)
        if fault.kind == "hang":
            await self._stopping.wait()
            return self._error(503, "shuttingDown", "The sandbox is stopping.")
        if fault.kind == "malformed":
            return web.Response(
                status=200, text='{"accounts": [{"id": 1,', content_type="application/json"
            )
        if fault.kind == "missing_list":
            return _json({"total": 0})
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        if fault.body is not None:
            return _json(fault.body, status=fault.status, headers=headers)
        code, description = _DEFAULT_ERRORS.get(fault.status, ("error", "Injected failure."))
        return self._error(fault.status, code, description, headers)

    def _error(
        self, status: int, code: str, description: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        body = {
            "code": code,
            "description": description,
            "message": None,
            "request_id": next(self._request_ids),
        }
        return web.json_response(body, status=status, headers=headers)


_DEFAULT_ERRORS = {
    400: ("invalidValue", "The request is invalid."),
    401: ("invalidToken", "The access token is invalid or revoked."),
    403: ("forbidden", "This token may not read this resource."),
    429: ("rateLimiting", "Too many requests."),
    500: ("internalError", "Something went wrong on the sandbox."),
    502: ("badGateway", "The sandbox's upstream failed."),
    503: ("serviceUnavailable", "The sandbox is unavailable."),
}


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _truthy(raw: str | None) -> bool:
    return raw is not None and raw.lower() in ("", "1", "true", "yes")


def _parse_time(raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"'last_update' is not a date and time: {raw!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parse_day(raw: str | None) -> date | None:
    if raw is None:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"not a date: {raw!r}") from None


def _powens_time(value: datetime | None) -> str | None:
    """Powens' time format: ``YYYY-MM-DD HH:MM:SS``, UTC."""
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _amount(value: Decimal | Raw | None, behaviour: Behaviour) -> Any:
    # Two-decimal amounts survive float's shortest repr, so the JSON number is exact.
    if value is None or isinstance(value, Raw):
        return value
    return str(value) if behaviour.amounts_as_strings else float(value)


def _connection_body(c: SandboxConnection) -> dict[str, Any]:
    return {
        "id": c.id,
        "id_connector": 59,
        "state": c.state,
        "error": c.state,
        "error_message": c.error_message,
        "last_update": _powens_time(c.last_update),
        "next_try": _powens_time(c.next_try),
        "active": True,
    }


def _account_body(a: SandboxAccount, behaviour: Behaviour) -> dict[str, Any]:
    return {
        "id": a.id,
        "id_connection": a.id_connection,
        "name": a.name,
        "original_name": a.name.upper(),
        "type": a.type,
        "usage": a.usage,
        "balance": _amount(a.balance, behaviour),
        "coming": _amount(Decimal(0), behaviour),
        "currency": {"id": a.currency, "name": a.currency, "symbol": a.currency, "precision": 2},
        "last_update": _powens_time(a.last_update),
        "deleted": _powens_time(a.deleted),
        "disabled": _powens_time(a.disabled),
        "error": None,
    }


def _transaction_body(
    t: SandboxTransaction, behaviour: Behaviour, categories: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": t.id,
        "id_account": t.id_account,
        "date": t.date.isoformat() if t.date else None,
        "rdate": t.date.isoformat() if t.date else None,
        "value": _amount(t.value, behaviour),
        "original_wording": t.wording,
        "wording": t.wording.title(),
        "coming": t.coming,
        "deleted": _powens_time(t.deleted),
        "last_update": _powens_time(t.last_update),
    }
    if categories:
        body["categories"] = (
            [{"code": t.category, "parent_code": _PARENTS.get(t.category)}] if t.category else []
        )
    return body


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=dumps(body), status=status, headers=headers, content_type="application/json"
    )


def _bytes(response: web.Response) -> bytes:
    body = response.body
    assert isinstance(body, bytes)
    return body


def dumps(value: Any) -> str:
    """``value`` as JSON text, each ``Raw`` in it written as it is."""
    raws: list[str] = []

    def mark(obj: object) -> str:
        if isinstance(obj, Raw):
            raws.append(obj.text)
            return f"\x00raw:{len(raws) - 1}\x00"
        raise TypeError(f"not JSON: {type(obj).__name__}")

    text = json.dumps(value, default=mark)
    for n, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw:{n}\x00"), raw, 1)
    return text


async def write_split(
    request: web.Request,
    status: int,
    body: bytes,
    pause: float,
    content_type: str = "application/json",
) -> web.StreamResponse:
    """Answer ``body`` in two writes ``pause`` seconds apart, as a slow server or network does."""
    response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
    response.content_length = len(body)
    await response.prepare(request)
    half = len(body) // 2
    await response.write(body[:half])
    await asyncio.sleep(pause)
    await response.write(body[half:])
    await response.write_eof()
    return response


_FILL = b"x" * 65536


async def write_stream(
    request: web.Request,
    head: bytes,
    tail: bytes,
    size: int | None,
    record: list[int],
    content_type: str = "application/json",
) -> web.StreamResponse:
    """A 200 of ``head``, filler and ``tail`` making ``size`` bytes (None: without end),
    written with no length announced; the bytes written are appended to ``record`` when the
    answer ends, whether it was finished or the client went away."""
    response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    written = 0
    try:
        await response.prepare(request)
        await response.write(head)
        written = len(head)
        while size is None or written + len(tail) < size:
            room = len(_FILL) if size is None else min(len(_FILL), size - len(tail) - written)
            await response.write(_FILL[:room])
            written += room
        await response.write(tail)
        written += len(tail)
        await response.write_eof()
    except ConnectionError:
        pass  # the client hung up: what it took is recorded below
    finally:
        record.append(written)
    return response


@asynccontextmanager
async def serve(
    sandbox: Sandbox | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``sandbox`` (a fresh one when None) on ``host:port`` and yield the API base URL."""
    async with (sandbox or Sandbox()).serve(host, port) as base_url:
        yield base_url


async def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kontod.demo.sandbox",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--listen", default="127.0.0.1:8436", help="host:port to listen on")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds added to every answer (default 0)"
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--listen {args.listen!r}: expected host:port such as 127.0.0.1:8436")
    sandbox = Sandbox(latency=args.latency)
    async with serve(sandbox, host.strip("[]"), int(port)) as base_url:
        print(f"sandbox listening; set KONTOD_POWENS_URL={base_url}", flush=True)
        print(f"tokens: {token_for(1)}, {token_for(2)}, ...", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    with suppress(KeyboardInterrupt):
        asyncio.run(_main())
