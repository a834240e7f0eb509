"""Reading third parties' answers: a body read to its end under a size cap, and strict JSON.

The bank client and the rate sources read every body through ``read_body``: it reads what
the server sends, however many writes it takes, until the end of the body or until the cap is
passed, and then stops (the rest is never buffered: the connection is dropped). ``loads`` is
the one JSON parser of outside answers: it measures the nesting depth before parsing (so no
answer can reach Python's recursion limit), keeps decimals exact, and refuses ``NaN`` and
``Infinity``, so that no non-finite number comes out of it.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from itertools import accumulate
from typing import Any

import aiohttp

MiB = 1024 * 1024
# When KONTOD_PROVIDER_MAX_BODY is unset: a page of 1 000 Powens transactions is about 1 MB,
# the ECB's history of 90 days about 50 kB and a price answer a few kB.
BANK_MAX_BODY = 8 * MiB
RATES_MAX_BODY = 2 * MiB
MAX_BODY_SETTING = "KONTOD_PROVIDER_MAX_BODY"
# No answer kontod reads nests deeper than about 5 levels.
MAX_DEPTH = 64
_CHUNK = 64 * 1024


class BodyTooLarge(Exception):
    """An answer's body is larger than the cap; ``str()`` names the cap and its setting."""

    def __init__(self, cap: int, announced: int | None = None) -> None:
        said = f"; it announced {announced} bytes" if announced is not None else ""
        super().__init__(
            f"the answer is larger than {cap} bytes ({format_size(cap)}){said};"
            f" {MAX_BODY_SETTING} sets the limit"
        )
        self.cap = cap


class JSONRejected(ValueError):
    """A JSON text kontod does not accept (too deep, a non-finite constant)."""


def format_size(size: int) -> str:
    """A byte count for people: ``8 MiB``, ``512 KiB`` or ``1500 bytes``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", MiB), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


async def read_body(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The whole body of ``resp``, read to its end; ``BodyTooLarge`` once more than ``cap``
    bytes arrived (or were announced by ``Content-Length``), without reading further."""
    announced = resp.content_length
    if announced is not None and announced > cap:
        raise BodyTooLarge(cap, announced)
    body = bytearray()
    # iter_chunked waits for more data until the end of the body: a body sent in several
    # writes, with pauses between them, comes back whole.
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > cap:
            raise BodyTooLarge(cap)
    return bytes(body)


async def read_prefix(resp: aiohttp.ClientResponse, size: int) -> bytes:
    """At most the first ``size`` bytes of the body of ``resp`` (all of it when shorter), for
    answers only shown in part; the rest is never read."""
    head = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        head += chunk
        if len(head) >= size:
            break
    return bytes(head[:size])


# A JSON string: from a quote to the next unescaped quote, or to the end of the text when it
# is never closed. The possessive quantifiers and the end-of-text branch mean a match never
# has to be retried from a later quote, so this stays linear on any input.
_STRING = re.compile(rb'"[^"\\]*+(?:\\[\s\S]?[^"\\]*+)*+(?:"|\Z)')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def depth(text: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets in strings ignored)."""
    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    return max(accumulate(_STEP[b] for b in brackets), default=0)


def loads(text: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """The value of a JSON text from outside: floats as exact ``Decimal``, ``NaN`` and
    ``Infinity`` refused, nesting deeper than ``max_depth`` refused before parsing.

    Raises ``ValueError`` (``JSONRejected`` or ``json.JSONDecodeError``) with what was wrong.
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    found = depth(raw)
    if found > max_depth:
        raise JSONRejected(f"nested deeper than {max_depth} levels ({found})")
    return json.loads(raw, parse_float=Decimal, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise JSONRejected(f"{name} is not a number kontod accepts")
