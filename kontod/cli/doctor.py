"""``kontod doctor``: the checks an operator runs before and after switching Konto's jobs over
to kontod, each ok, warn or fail with what to do.

The doctor only reads: it applies no migration, creates no table and sends no bank request on
a user's behalf (Powens is asked once, without a token, and must answer with its error body).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, TextIO

import aiohttp
import asyncpg

from kontod import db
from kontod.cli import times
from kontod.cli.commands import visible
from kontod.config import Settings
from kontod.jobs import SNAPSHOTS
from kontod.konto import lite_schema, tokens
from kontod.konto import schema as konto_schema
from kontod.konto.engines import open_konto
from kontod.konto.store import KontoError, KontoSql
from kontod.providers.rates import RateSourceError, RateSources

Status = Literal["ok", "warn", "fail"]
RANK: dict[Status, int] = {"ok": 0, "warn": 1, "fail": 2}
# The database's clock may differ from this host's by this much before a warning, and by the
# second figure before a failure (leases and schedules are read on the database's clock).
CLOCK_WARN_S = 2.0
CLOCK_FAIL_S = 60.0
# A created_at of SQLite's datetime('now') has whole seconds: a run's bounds are widened by it.
SLACK = timedelta(seconds=1)
HTTP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Check:
    """One verdict: its name, ok/warn/fail, what was found, and what to do (empty when ok)."""

    name: str
    status: Status
    detail: str
    todo: str = ""


def worst(checks: Sequence[Check]) -> Status:
    return max((c.status for c in checks), key=RANK.__getitem__, default="ok")


def as_json(checks: Sequence[Check]) -> dict[str, Any]:
    return {"status": worst(checks), "checks": [asdict(c) for c in checks]}


@dataclass(frozen=True)
class _Konto:
    """Konto's tables on either engine: the SQLite-family database, or kontod's PostgreSQL."""

    lite: KontoSql | None
    pg: asyncpg.Connection | None

    async def rows(self, lite_sql: str, pg_sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.lite is not None:
            return [tuple(r) for r in await self.lite.read(lite_sql, params)]
        assert self.pg is not None
        return [tuple(r) for r in await self.pg.fetch(pg_sql, *params)]


async def diagnose(settings: Settings) -> list[Check]:
    """Every check, in the order an operator fixes things."""
    checks: list[Check] = []
    conn = await _kontod_database(settings, checks)
    lite: KontoSql | None = None
    try:
        konto: _Konto | None = None
        if settings.konto.location is None or settings.konto.location.kind == "postgresql":
            if conn is None:
                checks.append(
                    Check(
                        "konto database",
                        "fail",
                        "Konto's tables are in kontod's PostgreSQL, which cannot be read",
                        "fix kontod's database first (above)",
                    )
                )
            else:
                konto = _Konto(None, conn)
                checks.append(Check("konto database", "ok", "in kontod's PostgreSQL"))
        else:
            lite, konto = await _konto_lite(settings, checks)
        # Konto's rows are read only when its tables hold what the reads name.
        if konto is not None and not await _konto_checks(settings, konto, checks):
            konto = None
        if conn is not None:
            checks.append(await _clock(conn))
        if conn is not None and konto is not None:
            checks.append(await _snapshot_writers(settings, conn, konto))
            checks.append(await _old_jobs(settings, conn, konto))
        async with aiohttp.ClientSession() as http:
            checks.append(await _powens(settings, http))
            checks.extend(await _rates(settings, http))
    finally:
        if lite is not None:
            await lite.close()
        if conn is not None:
            await conn.close()
    return checks


# -- the databases --------------------------------------------------------------------------


async def _kontod_database(settings: Settings, checks: list[Check]) -> asyncpg.Connection | None:
    """kontod's own PostgreSQL, reached and migrated (read only: nothing is applied)."""
    name = "kontod database"
    url = settings.database.url
    if url is None:
        checks.append(
            Check(name, "fail", "no KONTOD_DATABASE_URL is set", "set it to kontod's PostgreSQL")
        )
        return None
    try:
        conn: asyncpg.Connection = await asyncpg.connect(url, timeout=HTTP_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        checks.append(
            Check(
                name,
                "fail",
                f"cannot connect: {type(exc).__name__}: {exc}",
                "check KONTOD_DATABASE_URL, the server and its pg_hba.conf",
            )
        )
        return None
    known = {m.version: f"{m.version:04d}_{m.name}" for m in db.migrations()}
    done: set[int] = set()
    if await conn.fetchval("SELECT to_regclass('kontod_migrations')") is not None:
        done = {r[0] for r in await conn.fetch("SELECT version FROM kontod_migrations")}
    pending = [known[v] for v in sorted(set(known) - done)]
    if pending:
        checks.append(
            Check(
                name,
                "warn",
                f"reachable; {len(pending)} migration(s) not applied: {', '.join(pending)}",
                "run kontod migrate (kontod run applies them too)",
            )
        )
    else:
        checks.append(Check(name, "ok", f"reachable, migrated ({len(known)} migrations)"))
    return conn


async def _konto_lite(
    settings: Settings, checks: list[Check]
) -> tuple[KontoSql | None, _Konto | None]:
    name = "konto database"
    lite = None
    try:
        lite = open_konto(settings.konto)
        assert lite is not None
        await lite.read("SELECT 1")
    except KontoError as exc:
        if lite is not None:
            await lite.close()
        checks.append(
            Check(name, "fail", str(exc), "check KONTOD_KONTO_URL (and KONTOD_KONTO_AUTH_TOKEN)")
        )
        return None, None
    checks.append(Check(name, "ok", f"reachable: {lite.location.kind} {lite.location.target}"))
    return lite, _Konto(lite, None)


async def _konto_checks(settings: Settings, konto: _Konto, checks: list[Check]) -> bool:
    """Konto's tables and columns, its users, and a sample of its tokens; False when the
    tables lack what kontod reads."""
    try:
        if konto.lite is not None:
            await lite_schema.load(konto.lite, absent_own_ok=True)
        else:
            assert konto.pg is not None
            await konto_schema.load(konto.pg)
    except konto_schema.KontoSchemaError as exc:
        checks.append(
            Check(
                "konto tables",
                "fail",
                str(exc),
                "point kontod at the web app's own database, and bring the web app up to date",
            )
        )
        return False
    checks.append(Check("konto tables", "ok", "every table and column kontod uses is there"))
    [(users,)] = await konto.rows("SELECT count(*) FROM users", "SELECT count(*) FROM users")
    if not users:
        checks.append(
            Check(
                "konto users",
                "fail",
                "no user: an empty database is not a real Konto",
                "point kontod at the database the web app serves",
            )
        )
    else:
        checks.append(Check("konto users", "ok", f"{users} user(s)"))
    checks.append(await _tokens(settings, konto))
    return True


async def _tokens(settings: Settings, konto: _Konto) -> Check:
    """The configured key opens the newest stored tokens that look encrypted; no token is
    printed, only counts."""
    name = "bank tokens"
    stored = await konto.rows(
        tokens.LITE_KEY_SAMPLE_SQL,
        """SELECT powens_token::text FROM bank_connections
            WHERE powens_token::text ~ '^[A-Za-z0-9+/]{38,}={0,2}$'
            ORDER BY id DESC LIMIT $1""",
        tokens.KEY_CHECK_SAMPLE,
    )
    sample = [str(r[0]) for r in stored if tokens.LOOKS_ENCRYPTED.fullmatch(str(r[0]))]
    if not sample:
        return Check(name, "ok", "no stored token looks encrypted: they are sent as stored")
    key = settings.refresh.db_encryption_key
    if key is None:
        return Check(
            name,
            "fail",
            f"{len(sample)} stored token(s) look encrypted and no key is configured",
            f"set {tokens.KEY_SETTING} to the web app's DB_ENCRYPTION_KEY",
        )
    try:
        opened = tokens.check_key_rows(sample, key)
    except tokens.WrongKey as exc:
        return Check(name, "fail", str(exc), "give kontod the key the web app encrypts with")
    return Check(name, "ok", f"the key opens {opened} of {len(sample)} sampled token(s)")


# -- time and writers -----------------------------------------------------------------------


async def _clock(conn: asyncpg.Connection) -> Check:
    name = "clock"
    before = time.time()
    theirs: datetime = await conn.fetchval("SELECT now()")
    after = time.time()
    skew = theirs.timestamp() - (before + after) / 2
    detail = f"the database's clock is {skew:+.1f} s from this host's"
    todo = "run NTP (chrony, systemd-timesyncd) on both hosts"
    if abs(skew) > CLOCK_FAIL_S:
        return Check(name, "fail", detail, todo)
    if abs(skew) > CLOCK_WARN_S:
        return Check(name, "warn", detail, todo)
    return Check(name, "ok", detail)


async def _has_runs(conn: asyncpg.Connection) -> bool:
    """Whether kontod's runs table exists (not before the first migration)."""
    return await conn.fetchval("SELECT to_regclass('kontod_runs')") is not None


def _instant(value: object) -> datetime | None:
    """A created_at as either engine gives it (SQLite's UTC text, PostgreSQL's text)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def _snapshot_writers(settings: Settings, conn: asyncpg.Connection, konto: _Konto) -> Check:
    """Today's snapshot rows written outside any kontod run of daily-snapshots: another writer
    (the web app's dashboard auto-snapshot, its ``POST /api/dashboard/snapshot``)."""
    name = "snapshot writers"
    today = datetime.now(settings.runner.tz).date()
    rows = await konto.rows(
        "SELECT created_at FROM patrimoine_snapshots WHERE date = ?",
        "SELECT created_at::text FROM patrimoine_snapshots WHERE date::text = $1",
        today.isoformat(),
    )
    runs = []
    if await _has_runs(conn):
        runs = await conn.fetch(
            """SELECT started_at, coalesce(finished_at, now()) AS ended FROM kontod_runs
                WHERE job = $1 AND coalesce(finished_at, now()) >= now() - interval '2 days'""",
            SNAPSHOTS,
        )
    spans = [(r["started_at"] - SLACK, r["ended"] + SLACK) for r in runs]
    outside = []
    for (value,) in rows:
        at = _instant(value)
        if at is not None and not any(start <= at <= end for start, end in spans):
            outside.append(at)
    if outside:
        return Check(
            name,
            "warn",
            f"{len(outside)} of today's {len(rows)} snapshot row(s) were written outside any"
            f" kontod run of {SNAPSHOTS}, the first at {times.text(min(outside), settings.runner.tz)}",
            "turn off the web app's own snapshot writes (dashboard auto-snapshot, POST"
            " /api/dashboard/snapshot), see the cut-over guide",
        )
    return Check(name, "ok", f"today's {len(rows)} snapshot row(s) come from kontod's runs")


async def _old_jobs(settings: Settings, conn: asyncpg.Connection, konto: _Konto) -> Check:
    """Transactions without a key dated after kontod's first run: only the web app's old
    refresh job writes those (``transactions`` has no creation time, so its date stands in)."""
    name = "web app jobs"
    first: datetime | None = None
    if await _has_runs(conn):
        first = await conn.fetchval("SELECT min(started_at) FROM kontod_runs")
    if first is None:
        return Check(name, "ok", "kontod has not run yet: nothing to compare")
    since: date = first.astimezone(settings.runner.tz).date()
    [(count, newest)] = await konto.rows(
        "SELECT count(*), max(date) FROM transactions"
        " WHERE tx_hash IS NULL AND substr(date, 1, 10) > ?",
        "SELECT count(*), max(date)::text FROM transactions"
        " WHERE tx_hash IS NULL AND left(date::text, 10) > $1",
        since.isoformat(),
    )
    if count:
        return Check(
            name,
            "warn",
            f"{count} transaction(s) without tx_hash dated after kontod's first run"
            f" ({since.isoformat()}), the newest {newest}: the web app's refresh job still runs",
            "stop the web app's two jobs (cut-over guide)",
        )
    return Check(name, "ok", f"no unkeyed transaction dated after {since.isoformat()}")


# -- the providers --------------------------------------------------------------------------


async def _powens(settings: Settings, http: aiohttp.ClientSession) -> Check:
    """One request without a token: Powens must refuse it with its JSON error body."""
    name = "powens api"
    base = settings.refresh.powens_url
    if base is None:
        return Check(
            name,
            "warn",
            "KONTOD_POWENS_URL is not set: refresh-stale-connections has nothing to do",
            "set it to https://<domain>.biapi.pro/2.0",
        )
    url = f"{base.rstrip('/')}/users/me/connections"
    try:
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        async with http.get(url, timeout=timeout) as resp:
            status = resp.status
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Check(
            name,
            "fail",
            f"cannot reach {url}: {type(exc).__name__}",
            "check KONTOD_POWENS_URL and this host's access to it",
        )
    if status in (401, 403) and isinstance(body, dict) and "code" in body:
        return Check(name, "ok", f"answers (HTTP {status} {body['code']} without a token)")
    return Check(
        name,
        "fail",
        f"{url} answered HTTP {status} without Powens' error body",
        "check that KONTOD_POWENS_URL is the Powens API 2.0 base URL",
    )


async def _rates(settings: Settings, http: aiohttp.ClientSession) -> list[Check]:
    """The ECB file and one crypto price (bitcoin in the base currency). A source down is a
    warning: snapshots use the stored rates while they are recent enough."""
    r = settings.rates
    sources = RateSources(
        http,
        fiat_url=r.fiat_url,
        crypto_url=r.crypto_url,
        timeout=HTTP_TIMEOUT_S,
        api_key=r.crypto_api_key,
        attempts=1,
    )
    checks = []
    try:
        days = await sources.ecb()
        checks.append(Check("fiat rates", "ok", f"the ECB file holds {len(days)} day(s)"))
    except RateSourceError as exc:
        checks.append(Check("fiat rates", "warn", str(exc), "check KONTOD_FIAT_RATES_URL"))
    try:
        prices = await sources.crypto(["bitcoin"], r.base_currency.lower())
        checks.append(Check("crypto prices", "ok", f"{len(prices)} price(s) for bitcoin"))
    except RateSourceError as exc:
        checks.append(
            Check(
                "crypto prices",
                "warn",
                str(exc),
                "check KONTOD_CRYPTO_PRICES_URL and KONTOD_CRYPTO_API_KEY",
            )
        )
    return checks


def print_checks(checks: Sequence[Check], json_out: bool, out: TextIO | None = None) -> None:
    """A line per check (status, name, what was found) and an indented line with what to do;
    or, with ``--json``, everything as one object."""
    out = out or sys.stdout
    if json_out:
        print(json.dumps(as_json(checks), indent=2), file=out)
        return
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        print(visible(f"{c.status:<5} {c.name:<{width}}  {c.detail}"), file=out)
        if c.todo:
            print(visible(f"      {'':<{width}}  -> {c.todo}"), file=out)
    print(f"overall: {worst(checks)}", file=out)
