"""The demo's Konto as a SQLite file, made the way the web app makes its own: its table
definitions (``webapp_tables.sql``), then the demo's three users, their accounts and assets.

kontod itself never creates a Konto file (kontod/konto/sqlite.py refuses a missing one): this
is the demo standing in for the web app, and the tests build their Konto files with it too.
"""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path

from kontod.demo import sandbox
from kontod.konto import tokens

# The demo's data (kontod/demo/run.py's DEMO_SQL), in the web app's SQLite types: 0/1 flags.
DEMO_SQL = """
INSERT INTO users (id, email, name) VALUES
    (1, 'alice@example.org', 'Alice'), (2, 'bruno@example.org', 'Bruno'),
    (3, 'chloe@example.org', 'Chloé');
INSERT INTO bank_accounts (user_id, provider, provider_account_id, name, balance, hidden, type)
VALUES
    (1, NULL, NULL, 'Compte courant', 2450.37, 0, 'checking'),
    (1, NULL, NULL, 'Livret A', 12000.00, 0, 'savings'),
    (1, NULL, NULL, 'Ancien compte', 999.99, 1, 'checking'),
    (1, NULL, NULL, 'Prêt immo', -145000.00, 0, 'loan'),
    (2, 'powens', '1001', 'Compte chèques', 0, 0, 'checking'),
    (2, 'powens', '1002', 'LDDS', 0, 0, 'checking'),
    (2, 'powens', '1003', 'PEA', 0, 0, 'checking');
INSERT INTO bank_accounts (user_id, provider, name, balance, type, subtype, currency) VALUES
    (1, 'blockchain', 'Ledger BTC', 0.35, 'investment', 'crypto', 'BTC'),
    (1, NULL, 'Chase checking (USD)', 1520.40, 'checking', NULL, 'USD');
INSERT INTO assets (user_id, type, name, purchase_price, current_value) VALUES
    (1, 'real_estate', 'Appartement', 210000.00, 248500.00),
    (1, 'vehicle', 'Voiture', 18000.00, NULL),
    (2, 'valuable', 'Montre', NULL, NULL);
"""


def create_webapp_konto(path: Path) -> Path:
    """A new Konto SQLite file at ``path`` with the web app's tables and no row."""
    script = resources.files("kontod.demo").joinpath("webapp_tables.sql").read_text()
    conn = sqlite3.connect(path)
    try:
        conn.executescript(script)
    finally:
        conn.close()
    return path


def seed_konto(path: Path, key: bytes) -> bool:
    """Make the demo's Konto file at ``path`` if there is none; False when it exists already
    (a later demo keeps what the jobs wrote). Bruno's bank token is stored encrypted under
    ``key``, as the web app stores it. The file is made beside ``path`` and renamed into
    place once whole, so an interrupted demo leaves no half-made Konto behind."""
    if path.exists():
        return False
    part = path.with_name(path.name + ".part")
    part.unlink(missing_ok=True)
    create_webapp_konto(part)
    conn = sqlite3.connect(part)
    try:
        conn.executescript(DEMO_SQL)
        conn.execute(
            """INSERT INTO bank_connections (user_id, powens_connection_id, powens_token, status)
               VALUES (2, '2', ?, 'active')""",
            (tokens.encrypt(sandbox.token_for(2), key),),
        )
        conn.commit()
    finally:
        conn.close()
    part.replace(path)
    return True
