"""A sandbox bank aggregator: the two Powens API 2.0 endpoints kontod reads, with demo data.

Tokens are ``sandbox-user-<n>`` (n >= 1); each sees the same deterministic accounts and
transactions every time (see ``demo_accounts``), so ``kontod demo`` and the tests can create
matching local rows. Per token, the sandbox can add latency and inject faults (error statuses,
``Retry-After``, hangs, malformed bodies, amounts as strings); it counts requests and the
highest number answered at once, so a test can check a concurrency bound at the server.

Run it alone with ``python -m kontod.sandbox --listen 127.0.0.1:8436``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, Literal

from aiohttp import web

TOKEN_PREFIX = "sandbox-user-"  # noqa: S105 (public demo tokens, not a secret)
API_PREFIX = "/2.0"
ACCOUNTS = "accounts"
TRANSACTIONS = "transactions"

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
_LABELS = (
    ("CB CARREFOUR MARKET", "Alimentation"),
    ("PRLV SEPA EDF", "Énergie"),
    ("VIR SALAIRE", "Revenus"),
    ("CB SNCF INTERNET", "Transports"),
    ("RETRAIT DAB", "Retraits"),
)
_CATEGORY_IDS = {category: n for n, (_, category) in enumerate(_LABELS, start=1)}
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
        label, category = _LABELS[(account_id + i) % len(_LABELS)]
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


@dataclass
class Fault:
    """One injected misbehaviour, for the next ``times`` matching requests (None: every one).

    ``kind``: ``status`` answers ``status`` with a Powens error body, or with ``body`` (any JSON
    value) when given, and ``Retry-After`` when given; ``hang`` never answers; ``malformed``
    answers 200 with a body that is not JSON; ``missing_list`` answers 200 with JSON lacking
    the list.
    """

    kind: Literal["status", "hang", "malformed", "missing_list"] = "status"
    status: int = 500
    retry_after: str | None = None
    body: Any = None
    endpoint: Literal["accounts", "transactions"] | None = None
    times: int | None = None


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


class Sandbox:
    """The sandbox's state: behaviours by token and what it has seen."""

    def __init__(self, *, latency: float = 0.0) -> None:
        self.default = Behaviour(latency=latency)
        self.behaviours: dict[str, Behaviour] = {}
        self.requests: Counter[str] = Counter()
        self.requests_by_token: Counter[str] = Counter()
        self.arrivals: defaultdict[str, list[float]] = defaultdict(list)
        self.in_flight = 0
        self.max_in_flight = 0
        self._request_ids = itertools.count(1)
        self._stopping = asyncio.Event()

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
        """The aiohttp application serving ``/2.0/users/me/accounts[/{id}/transactions]``."""
        app = web.Application()
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
        runner = web.AppRunner(self.app(), handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        self._stopping.clear()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_host, bound_port = runner.addresses[0][:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            yield f"http://{shown}:{bound_port}{API_PREFIX}"
        finally:
            self._stopping.set()
            await runner.cleanup()

    async def _accounts(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, ACCOUNTS)

    async def _transactions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, TRANSACTIONS)

    async def _answer(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        token = _bearer(request)
        self.requests[endpoint] += 1
        self.requests_by_token[token] += 1
        self.arrivals[token].append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            behaviour = self.behaviours.get(token, self.default)
            if behaviour.latency > 0:
                await asyncio.sleep(behaviour.latency)
            fault = behaviour.next_fault(endpoint)
            if fault is not None:
                return await self._fault(fault)
            user = user_of(token)
            if user is None:
                return self._error(401, "invalidToken", "The access token is invalid or revoked.")
            if endpoint == ACCOUNTS:
                return _json(
                    {"accounts": _accounts_body(user, behaviour), "total": ACCOUNTS_PER_USER}
                )
            account = request.match_info["account_id"]
            owned = {str(a.id) for a in demo_accounts(user)}
            if account not in owned:
                return self._error(404, "accountNotFound", "No such account for this user.")
            limit = _limit(request.query.get("limit"))
            rows = _transactions_body(int(account), behaviour)[:limit]
            return _json({"transactions": rows, "first_date": None, "last_date": None})
        finally:
            self.in_flight -= 1

    async def _fault(self, fault: Fault) -> web.StreamResponse:
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
            return web.json_response(fault.body, status=fault.status, headers=headers)
        code, description = _DEFAULT_ERRORS.get(fault.status, ("error", "Injected failure."))
        return self._error(fault.status, code, description, headers)

    def _error(
        self, status: int, code: str, description: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        body = {
            "code": code,
            "description": description,
            "message": description,
            "request_id": f"sandbox-{next(self._request_ids)}",
        }
        return web.json_response(body, status=status, headers=headers)


_DEFAULT_ERRORS = {
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


def _limit(raw: str | None) -> int:
    if raw is None or not raw.isdigit():
        return 1000
    return max(1, int(raw))


def _amount(value: Decimal, behaviour: Behaviour) -> Any:
    # Two-decimal amounts survive float's shortest repr, so the JSON number is exact.
    return str(value) if behaviour.amounts_as_strings else float(value)


def _accounts_body(user: int, behaviour: Behaviour) -> list[dict[str, Any]]:
    return [
        {
            "id": a.id,
            "id_connection": user,
            "id_user": user,
            "name": a.name,
            "original_name": a.name.upper(),
            "type": a.type,
            "usage": a.usage,
            "balance": _amount(a.balance, behaviour),
            "coming": _amount(Decimal(0), behaviour),
            "currency": {"id": "EUR", "symbol": "€"},
            "last_update": "2026-03-01 06:00:00",
            "deleted": None,
            "disabled": None,
        }
        for a in demo_accounts(user)
    ]


def _transactions_body(account_id: int, behaviour: Behaviour) -> list[dict[str, Any]]:
    return [
        {
            "id": t.id,
            "id_account": account_id,
            "date": t.date.isoformat(),
            "rdate": t.date.isoformat(),
            "value": _amount(t.value, behaviour),
            "original_wording": t.wording,
            "wording": t.wording.title(),
            "category": {"id": _CATEGORY_IDS[t.category], "name": t.category},
        }
        for t in demo_transactions(account_id)
    ]


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(text=json.dumps(body), content_type="application/json")


@asynccontextmanager
async def serve(
    sandbox: Sandbox | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``sandbox`` (a fresh one when None) on ``host:port`` and yield the API base URL."""
    async with (sandbox or Sandbox()).serve(host, port) as base_url:
        yield base_url


async def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kontod.sandbox", description=__doc__.splitlines()[0] if __doc__ else None
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
