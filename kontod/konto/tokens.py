"""Bank tokens as Konto's web app stores them: AES-256-GCM, or plaintext from before encryption.

A stored value is ``base64(IV[12] || tag[16] || ciphertext)`` under a 32-byte key. The web app's
fallback rule is kept exactly: a value that is not base64, decodes to 28 bytes or fewer, or
fails authentication is the token as it is. Without a key, a value that would decode to more
than 28 bytes cannot be told from ciphertext, so it is refused rather than sent to the bank.

Because a value that fails authentication is used as it is, a wrong key would look like many
plaintext tokens: ``check_key`` finds it at start, when the key opens none of the values that
look encrypted. This module imports nothing of kontod.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Iterable

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

IV_BYTES = 12
TAG_BYTES = 16
# The newest stored values that look encrypted tried at start: enough to tell a wrong key,
# few enough for a start of well under a second on any table.
KEY_CHECK_SAMPLE = 1000
KEY_SETTING = "KONTOD_DB_ENCRYPTION_KEY"
# A stored value that may be ciphertext (base64 of more than IV and tag), as check_key's SQL.
LOOKS_ENCRYPTED = re.compile(r"[A-Za-z0-9+/]{38,}={0,2}")
# The same sample read from Konto's SQLite-family database, which has no regular expressions:
# GLOB keeps the base64 alphabet (with '=' anywhere), ``check_key_rows`` the exact shape.
# Parameter: KEY_CHECK_SAMPLE.
LITE_KEY_SAMPLE_SQL = """
SELECT powens_token FROM bank_connections
 WHERE length(powens_token) >= 38 AND powens_token NOT GLOB '*[^A-Za-z0-9+/=]*'
 ORDER BY id DESC LIMIT ?"""


class TokenEncryptedNoKey(Exception):
    """The stored token looks encrypted and no key is configured; the message holds no secret."""

    kind = "token_encrypted_no_key"


class TokenInvalid(Exception):
    """The token holds a character an HTTP header cannot carry; the message holds no secret."""

    kind = "token_invalid"


class WrongKey(Exception):
    """The configured key opens none of the stored values that look encrypted."""


def _ciphertext(stored: str) -> bytes | None:
    """The decoded bytes when ``stored`` has the shape of an encrypted value, else None."""
    try:
        raw = base64.b64decode(stored, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) > IV_BYTES + TAG_BYTES else None


def decrypt(stored: str, key: bytes | None) -> str:
    """The token to send for a stored value, by the web app's rule (see the module's doc)."""
    raw = _ciphertext(stored)
    if raw is None:
        return stored
    if key is None:
        raise TokenEncryptedNoKey(
            "the stored token looks encrypted and no DB_ENCRYPTION_KEY is configured"
        )
    iv, tag, body = (
        raw[:IV_BYTES],
        raw[IV_BYTES : IV_BYTES + TAG_BYTES],
        raw[IV_BYTES + TAG_BYTES :],
    )
    try:
        # AESGCM expects the tag after the ciphertext; the web app stores it before.
        plain = AESGCM(key).decrypt(iv, body + tag, None)
    except InvalidTag:
        return stored
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        return stored


def header_safe(token: str) -> str:
    """``token`` unchanged when an ``Authorization`` header can carry it, else ``TokenInvalid``.

    Refused: control characters (C0, DEL, C1: a newline would split the header) and anything
    beyond Latin-1, which HTTP/1.1 field values cannot hold.
    """
    for position, char in enumerate(token):
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F or code > 0xFF:
            what = "a control character" if code <= 0x9F else "a character beyond Latin-1"
            raise TokenInvalid(
                f"the bank token holds {what} at position {position}:"
                " an HTTP header cannot carry it"
            )
    return token


def opens(stored: str, key: bytes) -> bool | None:
    """Whether ``key`` authenticates ``stored``; None when ``stored`` does not look encrypted."""
    raw = _ciphertext(stored)
    if raw is None:
        return None
    iv, tag, body = (
        raw[:IV_BYTES],
        raw[IV_BYTES : IV_BYTES + TAG_BYTES],
        raw[IV_BYTES + TAG_BYTES :],
    )
    try:
        AESGCM(key).decrypt(iv, body + tag, None)
    except InvalidTag:
        return False
    return True


async def check_key(conn: asyncpg.Connection | PoolConnectionProxy, key: bytes) -> int:
    """Try ``key`` on the newest stored tokens that look encrypted; return how many it opened.

    Raises ``WrongKey`` when there are some and the key opens none of them: row by row a value
    that does not decrypt is taken for a plaintext token, so a wrong key would otherwise send
    ciphertext to the bank without a word.
    """
    rows = await conn.fetch(
        """SELECT powens_token::text AS stored FROM bank_connections
            WHERE powens_token::text ~ '^[A-Za-z0-9+/]{38,}={0,2}$'
            ORDER BY id DESC LIMIT $1""",
        KEY_CHECK_SAMPLE,
    )
    return check_key_rows([r["stored"] for r in rows], key)


def check_key_rows(stored: Iterable[str], key: bytes) -> int:
    """``check_key`` on stored values the caller read (``LITE_KEY_SAMPLE_SQL`` on Konto's
    SQLite-family database, newest first): the first ``KEY_CHECK_SAMPLE`` that look encrypted
    are tried; returns how many the key opened, ``WrongKey`` when it opens none of them."""
    sample = [s for s in stored if LOOKS_ENCRYPTED.fullmatch(s)][:KEY_CHECK_SAMPLE]
    results = [opens(s, key) for s in sample]
    tried = sum(1 for r in results if r is not None)
    opened = sum(1 for r in results if r)
    if tried and not opened:
        raise WrongKey(
            f"{KEY_SETTING} (or DB_ENCRYPTION_KEY, or the credential db_encryption_key) opens"
            f" none of the {tried} stored bank tokens that look encrypted"
            " (bank_connections.powens_token): it is not the key the web app encrypts them with"
        )
    return opened


def key_fingerprint(key: bytes | None) -> str | None:
    """A keyed hash naming ``key`` (None without a key): tells a changed key, reveals nothing."""
    if key is None:
        return None
    return hmac.new(key, b"kontod key fingerprint", hashlib.sha256).hexdigest()[:32]


def encrypt(token: str, key: bytes, iv: bytes | None = None) -> str:
    """A stored value as the web app writes it (for the demo and the tests)."""
    nonce = iv if iv is not None else os.urandom(IV_BYTES)
    sealed = AESGCM(key).encrypt(nonce, token.encode("utf-8"), None)
    body, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
    return base64.b64encode(nonce + tag + body).decode("ascii")


def fingerprint(stored: str) -> str:
    """SHA-256 (hex) of the stored value: tells a changed token apart without keeping it.

    The refresh job computes the same in SQL (``sha256(convert_to(powens_token, 'UTF8'))``).
    """
    return hashlib.sha256(stored.encode("utf-8")).hexdigest()
