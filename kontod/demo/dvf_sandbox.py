"""A sandbox of the public geo-DVF files, for the demo and the tests: a real aiohttp server.

It serves, under ``/geo-dvf/latest/csv`` (``DvfSandbox.base(root)``):
- ``GET /``: the listing of the published years, an HTML index linking ``2024/``, ``2023/``…;
- ``GET /{year}/communes/{department}/{commune}.csv``: the commune's sales of that year, a
  CSV file with geo-DVF's own header (one line per lot, the sale's price on each, fields
  quoted where they hold a comma or a quote), with an ``ETag`` and a ``Last-Modified``; a
  conditional request whose validators still match gets a 304 and no body; a file the
  sandbox does not have (a year not published, a commune without sales) is a 404.

``DvfSandbox.fail(commune, kind, times)`` makes a commune's files misbehave (``http_500``,
``http_503``, ``garbage``: a 200 that is not a DVF file). ``requests`` counts the requests by
path and ``answers`` the statuses given, so that tests see what was asked and what was sent.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

from aiohttp import web

from kontod.demo.serving import listening

PREFIX = "/geo-dvf/latest/csv"
# geo-DVF's columns, in its order.
HEADER = (
    "id_mutation",
    "date_mutation",
    "numero_disposition",
    "nature_mutation",
    "valeur_fonciere",
    "adresse_numero",
    "adresse_suffixe",
    "adresse_nom_voie",
    "adresse_code_voie",
    "code_postal",
    "code_commune",
    "nom_commune",
    "code_departement",
    "ancien_code_commune",
    "ancien_nom_commune",
    "id_parcelle",
    "ancien_id_parcelle",
    "numero_volume",
    "lot1_numero",
    "lot1_surface_carrez",
    "lot2_numero",
    "lot2_surface_carrez",
    "lot3_numero",
    "lot3_surface_carrez",
    "lot4_numero",
    "lot4_surface_carrez",
    "lot5_numero",
    "lot5_surface_carrez",
    "nombre_lots",
    "code_type_local",
    "type_local",
    "surface_reelle_bati",
    "nombre_pieces_principales",
    "code_nature_culture",
    "nature_culture",
    "code_nature_culture_speciale",
    "nature_culture_speciale",
    "surface_terrain",
    "longitude",
    "latitude",
)
_TYPE_CODES = {"Maison": "1", "Appartement": "2", "Dépendance": "3", "Local industriel": "4"}


@dataclass(frozen=True)
class Lot:
    """One line of a sale: a local (``type_local``, its built surface) or bare land (None)."""

    type_local: str | None
    surface: str = ""


@dataclass(frozen=True)
class Mutation:
    """One sale as DVF records it: one line per lot, each with the sale's whole price."""

    id: str
    day: str
    price: str
    lots: Sequence[Lot]
    latitude: str = ""
    longitude: str = ""
    nature: str = "Vente"
    street: str = "RUE DE LA PAIX"
    commune_name: str = ""


def department_of(commune: str) -> str:
    return commune[:3] if commune.startswith("97") else commune[:2]


def csv_file(commune: str, mutations: Iterable[Mutation]) -> str:
    """The text of a commune's file: the header, then one line per lot."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for m in mutations:
        for n, lot in enumerate(m.lots, start=1):
            row = dict.fromkeys(HEADER, "")
            row.update(
                id_mutation=m.id,
                date_mutation=m.day,
                numero_disposition="000001",
                nature_mutation=m.nature,
                valeur_fonciere=m.price,
                adresse_numero=str(n),
                adresse_nom_voie=m.street,
                code_postal=commune,
                code_commune=commune,
                nom_commune=m.commune_name,
                code_departement=department_of(commune),
                id_parcelle=f"{commune}000AB{n:04d}",
                nombre_lots=str(len(m.lots)),
                code_type_local=_TYPE_CODES.get(lot.type_local or "", ""),
                type_local=lot.type_local or "",
                surface_reelle_bati=lot.surface,
                longitude=m.longitude,
                latitude=m.latitude,
            )
            writer.writerow(row[c] for c in HEADER)
    return out.getvalue()


@dataclass
class _File:
    body: bytes
    etag: str
    last_modified: datetime


@dataclass
class DvfSandbox:
    """The files the server holds, by (year, commune); tests change them between runs."""

    files: dict[tuple[int, str], _File] = field(default_factory=dict)
    # Years the listing links to, beside those that have a file.
    listed: set[int] = field(default_factory=set)
    faults: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    answers: Counter[int] = field(default_factory=Counter)

    def put(
        self,
        year: int,
        commune: str,
        mutations: Iterable[Mutation] | str,
        modified: datetime | None = None,
    ) -> None:
        """Publish a commune's file for ``year`` (mutations, or a CSV text as it is)."""
        text = mutations if isinstance(mutations, str) else csv_file(commune, mutations)
        body = text.encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        when = (modified or datetime.now(UTC)).replace(microsecond=0)
        self.files[(year, commune)] = _File(body, etag, when)
        self.listed.add(year)

    def fail(self, commune: str, kind: str, times: int | None = None) -> None:
        """Make the commune's files answer ``kind`` for ``times`` requests (None: all)."""
        self.faults[commune] = (kind, times)

    def file_requests(self) -> int:
        return sum(n for path, n in self.requests.items() if path.endswith(".csv"))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(PREFIX + "/", self._listing)
        app.router.add_get(PREFIX + "/{year}/communes/{department}/{commune}.csv", self._file)
        return app

    @staticmethod
    def base(root: str) -> str:
        """The base URL kontod is given (``KONTOD_DVF_URL``) for a server at ``root``."""
        return root + PREFIX

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Listen on ``host:port`` (0: any free port) and yield the base URL of the files."""
        async with listening(self.app(), host, port) as root:
            yield self.base(root)

    async def _listing(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        links = "\n".join(
            f'<a href="{y}/">{y}/</a>' for y in sorted(self.listed | {y for y, _ in self.files})
        )
        return self._answer(
            web.Response(
                text=f"<html><body><h1>Index of {PREFIX}/</h1>\n{links}\n</body></html>",
                content_type="text/html",
            )
        )

    async def _file(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        commune = request.match_info["commune"]
        fault = self._next_fault(commune)
        if fault in ("http_500", "http_503"):
            return self._answer(web.Response(status=int(fault[-3:]), text="upstream error"))
        if fault == "garbage":
            return self._answer(web.Response(text="<html>maintenance</html>"))
        try:
            year = int(request.match_info["year"])
        except ValueError:
            return self._answer(web.Response(status=404))
        found = self.files.get((year, commune))
        if found is None or request.match_info["department"] != department_of(commune):
            return self._answer(web.Response(status=404, text="Not Found"))
        headers = {"ETag": found.etag, "Last-Modified": format_datetime(found.last_modified, True)}
        if _not_modified(request, found):
            return self._answer(web.Response(status=304, headers=headers))
        return self._answer(
            web.Response(body=found.body, content_type="text/csv", charset="utf-8", headers=headers)
        )

    def _answer(self, response: web.Response) -> web.Response:
        self.answers[response.status] += 1
        return response

    def _next_fault(self, commune: str) -> str | None:
        if commune not in self.faults:
            return None
        kind, times = self.faults[commune]
        if times is not None:
            if times <= 1:
                del self.faults[commune]
            else:
                self.faults[commune] = (kind, times - 1)
        return kind


def _not_modified(request: web.Request, found: _File) -> bool:
    """HTTP's rule: If-None-Match decides when given, else If-Modified-Since."""
    match = request.headers.get("If-None-Match")
    if match is not None:
        return found.etag in [t.strip() for t in match.split(",")] or match.strip() == "*"
    since = request.headers.get("If-Modified-Since")
    if since is None:
        return False
    try:
        when = parsedate_to_datetime(since)
    except (TypeError, ValueError):
        return False
    return found.last_modified <= when


# The demo's commune: Lyon 1er, with sales of flats and houses over two years, a sale of a
# flat with its cellar, a sale of two flats, a sale without coordinates; no file for the
# latest listed year (not published yet).
DEMO_COMMUNE = "69381"
DEMO_YEARS = (2022, 2023, 2024)


def demo_sandbox(years: Sequence[int] = DEMO_YEARS) -> DvfSandbox:
    """A sandbox holding the demo's sales of ``DEMO_COMMUNE`` (every year but the latest)."""
    sandbox = DvfSandbox(listed=set(years))
    older = sorted(years)[:-1]
    for n, year in enumerate(older):
        mutations = []
        for i in range(8):
            surface = 35 + 9 * i
            price = surface * (4800 + 150 * i + 200 * n)
            mutations.append(
                Mutation(
                    f"{year}-{i + 1}",
                    f"{year}-{i % 12 + 1:02d}-15",
                    str(price),
                    [Lot("Appartement", str(surface))]
                    + ([Lot("Dépendance")] if i % 3 == 0 else []),
                    f"{45.7640 + 0.0007 * i:.4f}" if i != 5 else "",
                    f"{4.8300 + 0.0009 * i:.4f}" if i != 5 else "",
                    street="RUE DE LA RÉPUBLIQUE, BAT A" if i % 2 else "QUAI SAINT-ANTOINE",
                    commune_name="Lyon 1er Arrondissement",
                )
            )
        mutations.append(
            Mutation(
                f"{year}-90",
                f"{year}-06-30",
                "720000",
                [Lot("Appartement", "48"), Lot("Appartement", "52")],
                "45.7660",
                "4.8320",
            )
        )
        mutations.append(
            Mutation(
                f"{year}-91", f"{year}-09-01", "640000", [Lot("Maison", "120")], "45.7700", "4.8350"
            )
        )
        sandbox.put(year, DEMO_COMMUNE, mutations)
    return sandbox
