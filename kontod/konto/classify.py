"""Classification of a provider account into Konto's type, usage and subtype.

Pure and table-driven: the tables below are the rules Konto's web app applies, to the letter
where both write the same column (the usage ignores Powens' ``PRIV``, ``ORGA``, ``ASSO`` as the
web app does). This module imports nothing of kontod.
"""

from __future__ import annotations

from dataclasses import dataclass

# Provider account type -> Konto type. Keys are lower-cased; unknown types are kept as given.
TYPE_BY_PROVIDER_TYPE: dict[str, str] = {
    "checking": "checking",
    "card": "checking",
    **dict.fromkeys(
        ("savings", "deposit", "livreta", "livretb", "ldds", "cel", "pel"),
        "savings",
    ),
    "loan": "loan",
    **dict.fromkeys(
        (
            "market",
            "pea",
            "pee",
            "per",
            "perco",
            "perp",
            "lifeinsurance",
            "madelin",
            "capitalisation",
            "crowdlending",
            "realestate",
            "article83",
        ),
        "investment",
    ),
}

# Without a provider type, the lower-cased name decides; the first matching row wins and the
# order matters ("plan épargne en actions" is savings, as in Konto). Trailing spaces are part
# of the needle: "per " must not match "personnel".
TYPE_BY_NAME: tuple[tuple[tuple[str, ...], str], ...] = (
    (("livret", "épargne", "epargne", "ldd"), "savings"),
    (("pea", "per ", "assurance"), "investment"),
    (("prêt", "pret", "crédit", "credit", "loan", "immo"), "loan"),
)
DEFAULT_TYPE = "checking"

CRYPTO_PROVIDERS = frozenset({"blockchain", "coinbase", "binance"})
SUBTYPE_BY_NAME: tuple[tuple[tuple[str, ...], str], ...] = (
    (("pea", "action", "bourse", "trading", "stock"), "stocks"),
    (("or ", "gold", "métaux", "metaux"), "gold"),
)
DEFAULT_SUBTYPE = "other"

# Provider usage -> Konto usage, the web app's rule: only these two literals, exactly as given,
# are taken; anything else (Powens' real values PRIV, ORGA, ASSO among them) is decided by the
# company. kontod writes what the web app writes, or each would overwrite the other.
USAGE_BY_PROVIDER_USAGE: dict[str, str] = {
    "professional": "professional",
    "private": "private",
}


@dataclass(frozen=True)
class Classification:
    """Konto's view of an account: ``subtype`` is set for investment accounts only."""

    type: str
    usage: str
    subtype: str | None


def classify(
    *,
    provider_type: str | None,
    name: str | None,
    usage: str | None,
    has_company: bool,
    provider: str | None = "powens",
) -> Classification:
    """Derive type, usage and subtype from what the provider says and the local account."""
    account_type = classify_type(provider_type, name)
    subtype = classify_subtype(provider, name) if account_type == "investment" else None
    return Classification(account_type, classify_usage(usage, has_company), subtype)


def classify_type(provider_type: str | None, name: str | None) -> str:
    """The Konto type: the provider's type through the table, else guessed from the name."""
    if provider_type and provider_type.strip():
        return TYPE_BY_PROVIDER_TYPE.get(provider_type.strip().lower(), provider_type)
    return _first_match(TYPE_BY_NAME, name) or DEFAULT_TYPE


def classify_subtype(provider: str | None, name: str | None) -> str:
    """The subtype of an investment account: crypto by provider, else by name."""
    if provider and provider.lower() in CRYPTO_PROVIDERS:
        return "crypto"
    return _first_match(SUBTYPE_BY_NAME, name) or DEFAULT_SUBTYPE


def classify_usage(usage: str | None, has_company: bool) -> str:
    """The Konto usage, as the web app decides it: the literal ``professional`` or ``private``,
    else ``professional`` for an account of a company and ``personal`` otherwise."""
    known = USAGE_BY_PROVIDER_USAGE.get(usage or "")
    if known is not None:
        return known
    return "professional" if has_company else "personal"


def _first_match(rules: tuple[tuple[tuple[str, ...], str], ...], name: str | None) -> str | None:
    lowered = (name or "").lower()
    for needles, value in rules:
        if any(needle in lowered for needle in needles):
            return value
    return None
