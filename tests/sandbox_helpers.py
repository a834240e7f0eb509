"""Shared pieces for tests against the sandbox bank: a fast client and matching local rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from kontod.demo.sandbox import PowensUser, Sandbox, demo_accounts, token_for
from kontod.providers.powens import Observer, PowensClient


@dataclass
class Bank:
    """A running sandbox bank and its base URL (the ``bank`` fixture)."""

    sandbox: Sandbox
    url: str


def powens_user(bank: Bank, user: int) -> PowensUser:
    """The sandbox's data for demo user ``user``, to change in place."""
    found = bank.sandbox.user(token_for(user))
    assert found is not None
    return found


def fast_client(
    http: aiohttp.ClientSession,
    base_url: str,
    *,
    timeout: float = 2.0,
    attempts: int = 3,
    observe: Observer | None = None,
    **kwargs: Any,
) -> PowensClient:
    """A client with short timeouts and backoffs, so failing paths stay quick."""
    kwargs.setdefault("backoff", 0.01)
    kwargs.setdefault("max_backoff", 0.05)
    kwargs.setdefault("rate", 10_000.0)
    return PowensClient(
        http, base_url, timeout=timeout, attempts=attempts, observe=observe, **kwargs
    )


async def seed_user(
    pool: asyncpg.Pool,
    user: int,
    *,
    last_sync: datetime | None = None,
    status: str | None = "active",
    with_transactions: bool = False,
    company_id: int | None = None,
) -> int | None:
    """Insert sandbox user ``user`` with its five Powens accounts (balance 0); return the
    connection id (None when ``status`` is None: no connection at all)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO users (id, email, name) VALUES ($1, $2, $3)",
            user,
            f"user{user}@example.org",
            f"User {user}",
        )
        ids = await conn.fetch(
            """INSERT INTO bank_accounts
                   (user_id, company_id, provider, provider_account_id, name, balance, last_sync)
               SELECT $1, $2, 'powens', pid, name, 0, $5
                 FROM unnest($3::text[], $4::text[]) AS t (pid, name)
               RETURNING id""",
            user,
            company_id,
            [str(a.id) for a in demo_accounts(user)],
            [a.name for a in demo_accounts(user)],
            last_sync,
        )
        if with_transactions:
            await conn.execute(
                """INSERT INTO transactions (bank_account_id, date, amount, label)
                   SELECT unnest($1::bigint[]), '2026-01-01', -1, 'old'""",
                [r["id"] for r in ids],
            )
        if status is None:
            return None
        connection_id: int = await conn.fetchval(
            """INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)
               VALUES ($1, $2, $3, $4) RETURNING id""",
            user,
            str(user),
            token_for(user),
            status,
        )
        return connection_id


def answer_raw(text: str) -> None:
    """From a sandbox ``on_request`` hook: answer 200 with ``text`` as the JSON body, as is.

    Serves what ``json.dumps`` cannot write (a raw ``1e400``, ten thousand brackets).
    """
    raise web.HTTPOk(text=text, content_type="application/json")


def raw_accounts(user: int, synced_at: datetime, balances: dict[int, str]) -> str:
    """Demo user ``user``'s accounts as a JSON body, with some balances as raw JSON text."""
    items = [
        {
            "id": a.id,
            "id_connection": user,
            "name": a.name,
            "type": a.type,
            "usage": a.usage,
            "balance": f"@balance {a.id}@",
            "currency": {"id": "EUR"},
            "last_update": synced_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "deleted": None,
            "disabled": None,
        }
        for a in demo_accounts(user)
    ]
    text = json.dumps({"accounts": items, "total": len(items)})
    for a in demo_accounts(user):
        text = text.replace(f'"@balance {a.id}@"', balances.get(a.id, str(a.balance)))
    return text


def raw_transactions(values: dict[int, str]) -> str:
    """A one-page transactions body: transaction id -> its ``value`` as raw JSON text."""
    items = [
        f'{{"id": {tx_id}, "date": "2026-11-02", "value": {raw}, "original_wording": "raw {tx_id}",'
        f' "coming": false, "deleted": null, "last_update": "2026-11-02 10:00:00"}}'
        for tx_id, raw in values.items()
    ]
    return '{"transactions": [' + ", ".join(items) + '], "_links": {}}'
