"""The pure rules behind pegged currencies and coin lookups, with tables and no database."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from kontod.providers import coins, rates

DAY = date(2026, 6, 10)


def coin(coin_id: str, symbol: str, rank: int | None) -> coins.Coin:
    return coins.Coin(coin_id, symbol, rank)


@pytest.mark.parametrize(
    ("candidates", "chosen"),
    [
        # the best market-cap rank wins, whatever the order of the answer
        ([coin("based-pepe", "PEPE", 2210), coin("pepe", "PEPE", 24)], "pepe"),
        # a ranked coin before an unranked one
        ([coin("aaa-pepe", "PEPE", None), coin("zzz-pepe", "PEPE", 9000)], "zzz-pepe"),
        # among unranked coins, the smallest id
        ([coin("pepe-b", "PEPE", None), coin("pepe-a", "PEPE", None)], "pepe-a"),
        # a coin whose name matched but whose symbol differs does not count
        ([coin("pepecoin", "PEPECOIN", 1), coin("pepe", "PEPE", 50)], "pepe"),
        ([coin("pepecoin", "PEPECOIN", 1)], None),
        ([], None),
    ],
)
def test_a_shared_symbol_goes_to_the_best_ranked_coin(
    candidates: list[coins.Coin], chosen: str | None
) -> None:
    found = coins.choose("pepe", candidates)
    assert (found.id if found else None) == chosen


def test_search_answers_are_read_strictly() -> None:
    body = (
        b'{"coins": [{"id": "pepe", "name": "Pepe", "api_symbol": "pepe", "symbol": "pepe",'
        b' "market_cap_rank": 24}, {"id": "x", "symbol": "X", "market_cap_rank": null}],'
        b' "exchanges": [], "icons": [], "categories": [], "nfts": []}'
    )
    assert coins.parse_search(body) == [coin("pepe", "PEPE", 24), coin("x", "X", None)]
    for bad, why in [
        (b"[]", "'coins' list"),
        (b'{"coins": [{"id": "a,b", "symbol": "A"}]}', "bad id"),
        (b'{"coins": [{"id": "a"}]}', "no symbol"),
        (b'{"coins": [{"id": "a", "symbol": "A", "market_cap_rank": "1"}]}', "market_cap_rank"),
    ]:
        with pytest.raises(ValueError, match=why):
            coins.parse_search(bad)


def test_only_unexplained_symbols_of_crypto_accounts_are_looked_up() -> None:
    held = ["PEPE", "USD", "BTC", "XOF", "EUR", "WIF", "CHF"]
    known = {"BTC", "XOF"}
    assert coins.to_look_up(held, known, base="CHF") == ["PEPE", "WIF"]


@pytest.mark.parametrize(
    ("base_units", "base_euros", "currency", "figures"),
    [
        (Decimal(1), Decimal(1), "XOF", (Decimal("655.957"), Decimal(1))),
        (Decimal(1), Decimal(1), "XPF", (Decimal(1), Decimal("0.00838"))),
        (Decimal(1), Decimal(1), "KMF", (Decimal("491.96775"), Decimal(1))),
        (Decimal(1), Decimal(1), "BAM", (Decimal("1.95583"), Decimal(1))),
        # base CHF (0.9312 per euro): 655.957 XOF = 1 EUR = 0.9312 CHF
        (Decimal("0.9312"), Decimal(1), "XAF", (Decimal("655.957"), Decimal("0.9312"))),
        (Decimal("0.9312"), Decimal(1), "XPF", (Decimal(1), Decimal("0.00780345600"))),
        # base XOF, pegged too: 1 XPF = 0.00838 EUR = 5.49691966 XOF, exact
        (Decimal("655.957"), Decimal(1), "XPF", (Decimal(1), Decimal("5.49691966"))),
    ],
)
def test_fixed_parities_are_exact_in_any_base(
    base_units: Decimal, base_euros: Decimal, currency: str, figures: tuple[Decimal, Decimal]
) -> None:
    [quote] = rates.fixed_quotes([currency], DAY, base_units, base_euros)
    assert (quote.currency_amount, quote.base_amount) == figures
    assert quote.source == rates.FIXED
    assert rates.euro_parity("EUR") == (Decimal(1), Decimal(1))
    assert rates.euro_parity("XPF") == (Decimal(1), Decimal("0.00838"))
    assert rates.euro_parity("USD") is None
