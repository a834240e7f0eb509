"""Coin ids for crypto symbols outside kontod's shipped map, found with the price API's search.

Coinbase and blockchain accounts hold whatever coin the user owns, and the shipped map
(``rates.SHIPPED_CRYPTO_IDS``) names only the common ones. For the others, the price API's own
``GET /search?query=<symbol>`` (CoinGecko) answers ``{"coins": [{id, name, api_symbol, symbol,
market_cap_rank, ...}], ...}``. It matches names and ids too, so only coins whose symbol is the
wanted one (case aside) count. Several coins share some symbols; the rule is: the best market-cap
rank wins (the smallest number), a ranked coin before an unranked one, then the smallest id.

The search takes one query per request, so a run asks at most ``MAX_LOOKUPS`` symbols (the first
in alphabetical order; the others wait for the next run) and stops at the first failure. Found
ids are kept in ``kontod_coin_ids``: a symbol is looked up once. The operator's
``KONTOD_CRYPTO_IDS`` and the shipped map win over both.

Only currencies of accounts kept by a crypto provider are looked up, and never a code the ECB
quotes or a fixed parity: Binance accounts hold USD, and a fiat code must never be priced as a
coin that happens to share its letters.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from kontod.db import Connection
from kontod.providers.answers import loads

MAX_LOOKUPS = 5
CRYPTO_PROVIDERS = ("coinbase", "blockchain", "binance")
# The currencies of the ECB's reference rates, and the euro: fiat, never looked up as coins.
ECB_CURRENCIES = frozenset(
    {
        "EUR", "USD", "JPY", "BGN", "CZK", "DKK", "GBP", "HUF", "PLN", "RON", "SEK", "CHF",
        "ISK", "NOK", "TRY", "AUD", "BRL", "CAD", "CNY", "HKD", "IDR", "ILS", "INR", "KRW",
        "MXN", "MYR", "NZD", "PHP", "SGD", "THB", "ZAR",
    }
)  # fmt: skip
# A coin id goes into the comma-separated ``ids`` of the price request.
_COIN_ID = re.compile(r"[A-Za-z0-9._-]{1,100}")


@dataclass(frozen=True)
class Coin:
    """One coin of a search answer."""

    id: str
    symbol: str
    rank: int | None


def parse_search(body: bytes) -> list[Coin]:
    """The coins of a ``/search`` answer; ValueError saying what is wrong with it."""
    data = loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("coins"), list):
        raise ValueError("the answer is not an object with a 'coins' list")
    found = []
    for entry in data["coins"]:
        if not isinstance(entry, dict):
            raise ValueError("an entry of 'coins' is not an object")
        coin_id, symbol, rank = entry.get("id"), entry.get("symbol"), entry.get("market_cap_rank")
        if not isinstance(coin_id, str) or not _COIN_ID.fullmatch(coin_id):
            raise ValueError(f"a coin has a bad id {str(coin_id)[:40]!r}")
        if not isinstance(symbol, str):
            raise ValueError(f"the coin {coin_id!r} has no symbol")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise ValueError(f"the coin {coin_id!r} has a bad market_cap_rank {str(rank)[:20]!r}")
        found.append(Coin(coin_id, symbol.strip().upper(), rank))
    return found


def choose(symbol: str, coins: Iterable[Coin]) -> Coin | None:
    """The coin ``symbol`` stands for by the rule of this module, or None when none has it."""
    same = [c for c in coins if c.symbol == symbol.upper()]
    if not same:
        return None
    return min(same, key=lambda c: (c.rank is None, c.rank or 0, c.id))


def to_look_up(held: Iterable[str], known: Container[str], base: str) -> list[str]:
    """The symbols of crypto accounts that nothing else explains, in order; ``known`` holds
    the mapped, cached, manual and fixed-parity codes."""
    return sorted(
        {cur for cur in held if cur != base and cur not in known and cur not in ECB_CURRENCIES}
    )


async def crypto_held(conn: Connection) -> list[str]:
    """The currencies of accounts kept by a crypto provider, read as the snapshot reads them."""
    rows = await conn.fetch(
        """SELECT DISTINCT coalesce(nullif(upper(btrim(currency)), ''), 'EUR') AS currency
             FROM bank_accounts WHERE provider = ANY($1::text[])""",
        list(CRYPTO_PROVIDERS),
    )
    return [r["currency"] for r in rows]


async def cached(conn: Connection, symbols: Iterable[str]) -> dict[str, str]:
    """The coin ids found earlier for these symbols."""
    rows = await conn.fetch(
        "SELECT symbol, coin_id FROM kontod_coin_ids WHERE symbol = ANY($1::text[])",
        list(symbols),
    )
    return {r["symbol"]: r["coin_id"] for r in rows}


async def remember(conn: Connection, found: Mapping[str, Coin], at: datetime) -> None:
    """Keep the coin ids found in this run (one statement)."""
    if not found:
        return
    await conn.execute(
        """INSERT INTO kontod_coin_ids (symbol, coin_id, market_cap_rank, resolved_at)
           SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::timestamptz[])
           ON CONFLICT (symbol) DO UPDATE
              SET coin_id = EXCLUDED.coin_id, market_cap_rank = EXCLUDED.market_cap_rank,
                  resolved_at = EXCLUDED.resolved_at""",
        list(found),
        [c.id for c in found.values()],
        [c.rank for c in found.values()],
        [at] * len(found),
    )
