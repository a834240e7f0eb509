"""The classification table: Konto's rules for type, usage and subtype, plus Powens usage codes."""

from __future__ import annotations

import pytest

from kontod.konto.classify import Classification, classify, classify_type, classify_usage


@pytest.mark.parametrize(
    ("provider_type", "name", "expected"),
    [
        ("checking", "Whatever", "checking"),
        ("card", "Carte Visa", "checking"),
        ("savings", None, "savings"),
        ("deposit", None, "savings"),
        ("livreta", None, "savings"),
        ("livretb", None, "savings"),
        ("ldds", None, "savings"),
        ("cel", None, "savings"),
        ("pel", None, "savings"),
        ("loan", "Compte", "loan"),
        ("market", None, "investment"),
        ("pea", None, "investment"),
        ("pee", None, "investment"),
        ("per", None, "investment"),
        ("perco", None, "investment"),
        ("perp", None, "investment"),
        ("lifeinsurance", None, "investment"),
        ("madelin", None, "investment"),
        ("capitalisation", None, "investment"),
        ("crowdlending", None, "investment"),
        ("realEstate", None, "investment"),
        ("article83", None, "investment"),
        # Any other provider type is kept as the provider spelled it, the name is not consulted.
        ("joint", "Livret", "joint"),
        ("unknown", None, "unknown"),
        # No provider type: the lower-cased name decides, first rule first.
        (None, "Livret A", "savings"),
        (None, "Plan Épargne Logement", "savings"),
        (None, "compte epargne", "savings"),
        (None, "LDD solidaire", "savings"),
        (None, "Mon PEA", "investment"),
        (None, "PER individuel", "investment"),
        (None, "Assurance vie", "investment"),
        (None, "Prêt auto", "loan"),
        (None, "pret perso", "loan"),
        (None, "Crédit conso", "loan"),
        (None, "credit", "loan"),
        (None, "Student loan", "loan"),
        (None, "Immo", "loan"),
        (None, "Compte courant", "checking"),
        (None, "Personnel", "checking"),  # "per " needs its space
        (None, None, "checking"),
        ("", "Livret", "savings"),
    ],
)
def test_type(provider_type: str | None, name: str | None, expected: str) -> None:
    assert classify_type(provider_type, name) == expected


@pytest.mark.parametrize(
    ("usage", "has_company", "expected"),
    [
        ("professional", False, "professional"),
        ("private", True, "private"),
        # The web app's rule: Powens' real values are not recognised; the company decides.
        ("PRIV", True, "professional"),
        ("ORGA", False, "personal"),
        ("ASSO", False, "personal"),
        ("priv", False, "personal"),
        ("Professional", False, "personal"),
        (None, False, "personal"),
        (None, True, "professional"),
        ("something else", False, "personal"),
        ("", True, "professional"),
    ],
)
def test_usage(usage: str | None, has_company: bool, expected: str) -> None:
    assert classify_usage(usage, has_company) == expected


@pytest.mark.parametrize(
    ("provider", "provider_type", "name", "expected_subtype"),
    [
        ("powens", "pea", "PEA Bourse", "stocks"),
        ("powens", "market", "Compte-titres actions", "stocks"),
        ("powens", "market", "Bourse Direct", "stocks"),
        ("powens", "market", "Trading", "stocks"),
        ("powens", "market", "US stocks", "stocks"),
        ("powens", "market", "Lingots or physique", "gold"),
        ("powens", "market", "Gold vault", "gold"),
        ("powens", "market", "Métaux précieux", "gold"),
        ("powens", "market", "metaux", "gold"),
        ("powens", "lifeinsurance", "Assurance vie", "other"),
        ("coinbase", "market", "Portefeuille", "crypto"),
        ("binance", "market", "Spot", "crypto"),
        ("blockchain", "market", "Bitcoin", "crypto"),
    ],
)
def test_investment_subtype(
    provider: str, provider_type: str, name: str, expected_subtype: str
) -> None:
    result = classify(
        provider_type=provider_type, name=name, usage=None, has_company=False, provider=provider
    )
    assert result == Classification("investment", "personal", expected_subtype)


@pytest.mark.parametrize("provider_type", ["checking", "savings", "loan", "joint"])
def test_subtype_only_for_investments(provider_type: str) -> None:
    result = classify(provider_type=provider_type, name="PEA or", usage="ORGA", has_company=True)
    assert result.subtype is None
    assert result.usage == "professional"
