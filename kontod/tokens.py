"""Bank tokens as Konto's web app stores them: AES-256-GCM, or plaintext from before encryption.

A stored value is ``base64(IV[12] || tag[16] || ciphertext)`` under a 32-byte key. The web app's
fallback rule is kept exactly: a value that is not base64, decodes to 28 bytes or fewer, or
fails authentication is the token as it is. Without a key, a value that would decode to more
than 28 bytes cannot be told from ciphertext, so it is refused rather than sent to the bank.
This module imports nothing of kontod.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

IV_BYTES = 12
TAG_BYTES = 16


class TokenEncryptedNoKey(Exception):
    """The stored token looks encrypted and no key is configured; the message holds no secret."""

    kind = "token_encrypted_no_key"


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
