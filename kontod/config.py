"""Settings: read once from the environment and an optional TOML file, checked before anything starts.

Every setting is one row of ``SETTINGS``: its variable ``KONTOD_<NAME>`` (or the prefix of a
per-job one), the other names it is read under, its parser, default, whether it is a secret,
its systemd credential, and the section and attribute it lands in. The TOML file named by
``KONTOD_CONFIG`` may hold the same settings as lower-case keys without the prefix
(``timezone = "Europe/Paris"``); the environment wins. The settings table of docs/configuration.md is generated
from the same rows (``make settings-table``). Each section goes to the one part of kontod that
uses it; durations are ``timedelta``. Of kontod this module imports only the schedule maths (a
pure module that imports nothing of kontod), to check schedules in the zone.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, get_type_hints
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from kontod.scheduler import schedule

DEFAULT_LISTEN = "127.0.0.1:8435"
ECB_DAILY_URL = "https://www.ecb.europa.eu/stats/eurofxref/eurofxref-daily.xml"
COINGECKO_SIMPLE_PRICE_URL = "https://api.coingecko.com/api/v3/simple/price"
GEO_DVF_URL = "https://files.data.gouv.fr/geo-dvf/latest/csv"
# ISO 4217 currency codes in use (funds, metals and SDR included; the testing code XTS and
# "no currency" XXX left out): what KONTOD_BASE_CURRENCY accepts.
ISO_4217 = frozenset(
    """AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN
    BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP
    ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR
    ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA
    MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK
    PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC
    SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND
    VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XUA YER ZAR ZMW ZWG""".split()  # noqa: SIM905 (a word list reads best as words)
)
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A setting has a value kontod cannot use; the message names it and what is accepted."""

    def __init__(self, setting: str, value: str, accepted: str) -> None:
        self.setting = setting
        self.value = value
        self.accepted = accepted
        super().__init__(f"invalid {setting}={value!r}: {accepted}")


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, safe to print.

    Works on text that does not parse too: a password may hold ``/``, ``#`` or ``?``.
    """
    # scheme://user:password@ up to the last @ (a user or a password may contain @, a user
    # name a space), then password= parameters and keyword settings, quoted ones whole.
    masked = re.sub(
        r"([a-z][a-z0-9+.-]*://[^:/]*:)(.*)@", r"\1***@", dsn, flags=re.IGNORECASE | re.DOTALL
    )
    return re.sub(
        r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^&\s]+)", r"\1***", masked, flags=re.IGNORECASE
    )


def default_state_dir(env: Mapping[str, str]) -> Path:
    """systemd's StateDirectory when set, else the XDG state folder of the user."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    base = env.get("XDG_STATE_HOME") or str(home / ".local" / "state")
    return Path(base) / "kontod"


def default_instance() -> str:
    """This process's name among replicas: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def system_timezone() -> str:
    """The machine's IANA zone name, UTC when it cannot be told."""
    try:
        from tzlocal import get_localzone_name

        name = get_localzone_name()
    except Exception:  # tzlocal raises its own errors on odd systems; UTC is a safe answer
        return "UTC"
    return name or "UTC"


@dataclass(frozen=True)
class KontoLocation:
    """Where Konto's tables are. ``target`` is a DSN, a file path or a server's base URL."""

    kind: Literal["postgresql", "sqlite", "libsql"]
    target: str

    def __str__(self) -> str:
        # A DSN may carry a password; a path or a server URL carries no secret (the token is
        # a setting of its own).
        if self.kind == "postgresql":
            return "kontod's PostgreSQL database"
        return f"{self.kind} {self.target}"


def parse_konto_location(text: str) -> KontoLocation:
    """``postgresql://…`` (or ``postgres://``), ``file:/path/konto.db`` or a plain path, or
    ``libsql://host`` / ``https://host`` / ``http://host:port`` (a libSQL server)."""
    text = text.strip()
    if not text:
        raise ValueError("expected a database URL or a file path, got an empty value")
    scheme = urlsplit(text).scheme.lower() if "://" in text or text.startswith("file:") else ""
    if scheme in ("postgresql", "postgres"):
        return KontoLocation("postgresql", text)
    if scheme == "file":
        path = text.removeprefix("file:")
        if path.startswith("//"):
            path = path[2:]  # file://host/path is not a local file; file:///path is
            if not path.startswith("/"):
                raise ValueError(f"expected file:/path or file:///path, got {text!r}")
        path = path.split("?", 1)[0]
        if not path:
            raise ValueError(f"expected a path after file:, got {text!r}")
        return KontoLocation("sqlite", path)
    if scheme == "libsql":
        # Turso's libsql:// URLs are served over HTTPS.
        return KontoLocation("libsql", "https://" + text.split("://", 1)[1].rstrip("/"))
    if scheme in ("https", "http"):
        if not urlsplit(text).hostname:
            raise ValueError(f"expected a server address in {text!r}")
        return KontoLocation("libsql", text.rstrip("/"))
    if scheme:
        raise ValueError(
            f"unknown scheme {scheme}: expected postgresql://, file:, libsql://, https:// or"
            " http://, or a plain file path"
        )
    return KontoLocation("sqlite", text)


# Parsers: each takes the raw text and returns the value or raises ValueError with what is
# accepted. Most are made by kind (seconds, whole numbers, URLs, choices) so that two settings
# of one kind are checked alike.

Parser = Callable[[str], Any]


def _parse_dsn(raw: str) -> str:
    if not raw.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected a URL such as postgresql://user:password@host:5432/dbname")
    try:
        _ = urlsplit(raw).port  # raises on a port that is not a number
    except ValueError:
        # The parser's own message may quote part of the password: say it in general terms.
        raise ValueError(
            "expected postgresql://user:password@host:port/dbname with a numeric port"
            " (a password holding / # ? or @ must be percent-encoded)"
        ) from None
    return raw


def _parse_listen(raw: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", raw.strip())
    if not m:
        raise ValueError("expected host:port such as 127.0.0.1:8435 or [::1]:8435")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError("the port must be between 0 and 65535")
    return host, port


def _parse_timezone(raw: str) -> str:
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("expected an IANA time zone name such as Europe/Paris or UTC") from None
    return raw


def _parse_cron(raw: str) -> str:
    expr = " ".join(raw.split())
    if len(expr.split()) not in (5, 6):
        raise ValueError("expected a cron expression of 5 fields, or 6 with seconds first")
    try:
        CronSim(expr, datetime(2026, 1, 1, tzinfo=UTC))
    except (CronSimError, ValueError) as exc:
        raise ValueError(
            f"expected a cron expression of 5 fields, or 6 with seconds first ({exc})"
        ) from None
    return expr


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value

    return parse


def _parse_flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0 (also true/false, yes/no, on/off)")


def _as_timedelta(seconds: float, accepted: str) -> timedelta:
    try:
        return timedelta(seconds=seconds)
    except OverflowError:  # more days than a timedelta holds (about 2.7 million years)
        raise ValueError(accepted) from None


def _seconds(minimum: float, *, inclusive: bool) -> Callable[[str], timedelta]:
    """A number of seconds above ``minimum`` (or from it, ``inclusive``), finite."""
    bound = "of at least" if inclusive else "greater than"
    accepted = f"expected a number of seconds {bound} {minimum:g}"

    def parse(raw: str) -> timedelta:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(accepted) from None
        # NaN fails both comparisons.
        if not (minimum <= value if inclusive else minimum < value) or value == float("inf"):
            raise ValueError(accepted)
        return _as_timedelta(value, accepted)

    return parse


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration(raw: str) -> timedelta:
    accepted = "expected a duration such as 7d, 12h, 30m, 45s or a number of seconds"
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", raw)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(accepted)
    return _as_timedelta(float(m.group(1)) * _UNITS[m.group(2) or "s"], accepted)


def _parse_rate(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValueError("expected a number of requests per second greater than 0, such as 10")
    return value


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
MIN_BODY = 1024
MAX_BODY = 1024**3


def _parse_size(raw: str) -> int:
    """A byte size: a whole number of bytes, or with ``K``, ``M`` or ``G`` (powers of 1024,
    ``KiB`` and ``KB`` read the same)."""
    accepted = "expected a size from 1K to 1G such as 8M, 512K or a number of bytes"
    m = re.fullmatch(r"\s*(\d{1,12})\s*(?:([kmg])(?:i?b)?|b)?\s*", raw, flags=re.IGNORECASE)
    if not m:
        raise ValueError(accepted)
    size = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    if not MIN_BODY <= size <= MAX_BODY:
        raise ValueError(accepted)
    return size


def _whole(minimum: int, maximum: int | None = None, why: str = "") -> Callable[[str], int]:
    """A whole number from ``minimum`` (to ``maximum``, ``why`` saying what bounds it)."""
    if minimum == 0:
        accepted = "expected a whole number of 0 or more"
    else:
        accepted = f"expected a whole number of at least {minimum}"

    def parse(raw: str) -> int:
        if not re.fullmatch(r"\s*\d+\s*", raw) or int(raw) < minimum:
            raise ValueError(accepted)
        value = int(raw)
        if maximum is not None and value > maximum:
            raise ValueError(f"expected at most {maximum}{why}")
        return value

    return parse


MAX_SNAPSHOT_WORKERS = 16
MIN_LEASE_S = 5.0


def _parse_days(raw: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*d?\s*", raw)
    if not m:
        raise ValueError("expected a whole number of days such as 7d (rates are daily)")
    return int(m.group(1))


def _parse_instance(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._:@/-]{1,63}", raw):
        raise ValueError(
            "expected 1 to 63 letters, digits or . _ : @ / - (such as web-1 or host:1234)"
        )
    return raw


def _http_url(example: str = "") -> Callable[[str], str]:
    """An http:// or https:// URL with a host, kept without its trailing ``/``."""
    accepted = "expected an http:// or https:// URL" + (f" such as {example}" if example else "")

    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(accepted)
        return raw.rstrip("/")

    return parse


def _parse_domain(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?", raw):
        raise ValueError("expected a host name such as konto-sandbox.biapi.pro")
    return f"https://{raw}/2.0"


def _parse_ping_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    try:
        _ = parts.port  # a port that is not a number raises here, not at the first ping
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL such as https://hc-ping.com/<uuid>")
    return raw.strip().rstrip("/")


def _parse_thresholds(raw: str) -> tuple[float | None, float | None]:
    """``duration=0.2,items=0.5`` (either may be left out), or ``off`` for neither check."""
    accepted = (
        "expected duration=F,items=F with fractions F from 0 to 1 (0 turns a check off), or off"
    )
    if raw.strip().lower() == "off":
        return 0.0, 0.0
    found: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(accepted) from None
        if not sep or key.strip() not in ("duration", "items") or not 0 <= number <= 1:
            raise ValueError(accepted)
        found[key.strip()] = number
    if not found:
        raise ValueError(accepted)
    return found.get("duration"), found.get("items")


def _parse_encryption_key(raw: str) -> bytes:
    text = raw.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ValueError("expected 64 hexadecimal characters (a 32-byte key)")
    return bytes.fromhex(text)


def _parse_years(raw: str) -> tuple[int, ...]:
    """Years separated by commas (``2024,2023,2022``), each from 2000 to 2999, newest first."""
    accepted = "expected years separated by commas, such as 2024,2023,2022"
    years = set()
    for part in filter(None, (p.strip() for p in raw.split(","))):
        if not re.fullmatch(r"2\d{3}", part):
            raise ValueError(accepted)
        years.add(int(part))
    if not years:
        raise ValueError(accepted)
    return tuple(sorted(years, reverse=True))


def _parse_token(raw: str) -> str:
    if not raw.strip():
        raise ValueError("expected a non-empty token")
    return raw.strip()


def _parse_currency(raw: str) -> str:
    code = raw.strip().upper()
    if code not in ISO_4217:
        raise ValueError("expected an ISO 4217 currency code such as EUR, USD or CHF")
    return code


_CODE = r"[A-Z0-9]{2,12}"


def _pairs(raw: str, what: str) -> list[tuple[str, str]]:
    """``KEY=VALUE`` items separated by commas (blanks allowed around them)."""
    pairs = []
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().upper()
        if not sep or not re.fullmatch(_CODE, key) or not value.strip():
            raise ValueError(f"expected {what}")
        pairs.append((key, value.strip()))
    return pairs


def _parse_crypto_ids(raw: str) -> dict[str, str]:
    what = "SYMBOL=id pairs separated by commas, such as BTC=bitcoin,ETH=ethereum"
    pairs = _pairs(raw, what)
    if any(not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", value) for _, value in pairs):
        raise ValueError(what)
    return dict(pairs)


def _parse_manual_rates(raw: str) -> dict[str, Decimal]:
    what = (
        "CURRENCY=value pairs separated by commas, the value of one unit in the base"
        " currency as a decimal number from 1e-12 to 1e12, such as XAU=2210.50,GBX=0.0117"
    )
    out: dict[str, Decimal] = {}
    for key, value in _pairs(raw, what):
        try:
            amount = Decimal(value)
        except InvalidOperation:
            raise ValueError(what) from None
        # The range every stored rate keeps to (kontod/providers/rates.py).
        if not amount.is_finite() or not Decimal("1e-12") <= amount <= Decimal("1e12"):
            raise ValueError(what)
        out[key] = amount
    return out


@dataclass(frozen=True)
class Alias:
    """Another name a setting is read under when its own is unset, with its own parser if the
    text means something else (a domain rather than a URL)."""

    env: str
    parse: Parser | None = None


@dataclass(frozen=True)
class Setting:
    """One setting: the names it is read under, how it is checked, where its value goes and
    how the docs document it."""

    env: str  # KONTOD_<NAME>, or the prefix KONTOD_<NAME>_ of a per-job setting
    where: str  # "section.attribute" of Settings; "" for one read before the others
    parse: Parser
    doc: str  # the settings table's "meaning" column
    default: str | None = None  # as it would be written in the environment; None: unset
    default_doc: str | None = (
        None  # the settings table's default column, when more than the default
    )
    aliases: tuple[Alias, ...] = ()
    secret: bool = False  # never shown: in errors as <hidden>, left out of repr
    credential: str | None = None  # also read from $CREDENTIALS_DIRECTORY/<credential>
    per_job: bool = False  # read as <env><JOB>, one value per job name
    shown: Callable[[str], str] | None = None  # how a bad value is shown when not a secret
    # The default when nothing is set, from the environment and whether stderr is a terminal;
    # the dataclass default (a bare Settings()) is computed with an empty environment.
    computed: Callable[[Mapping[str, str], bool], Any] | None = None

    @property
    def toml_key(self) -> str | None:
        """Its key in the TOML file (the prefix of the keys of a per-job setting)."""
        return _toml_key(self.env) if self.where else None

    @property
    def section(self) -> str:
        return self.where.partition(".")[0]

    @property
    def attr(self) -> str:
        return self.where.partition(".")[2]


def _toml_key(env: str) -> str | None:
    return env.removeprefix("KONTOD_").lower() if env.startswith("KONTOD_") else None


def _tty_format(env: Mapping[str, str], isatty: bool) -> str:
    return "console" if isatty else "json"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "KONTOD_CONFIG",
        "",
        str,
        "path of an optional TOML file with the settings below",
    ),
    # --- database: the database kontod opens (daemon and commands) --------------------------
    Setting(
        "KONTOD_DATABASE_URL",
        "database.url",
        _parse_dsn,
        "PostgreSQL DSN, `postgresql://user:password@host:5432/db`",
        default_doc="unset: `kontod run` refuses to start (exit 2) unless `KONTOD_EMBEDDED=1`, or"
        " Konto's tables are in a SQLite file or a libSQL server (`KONTOD_KONTO_URL`): then the"
        " embedded PostgreSQL holds kontod's own tables",
        aliases=(Alias("DATABASE_URL"),),
        credential="database_url",
        shown=redact_dsn,
    ),
    Setting(
        "KONTOD_EMBEDDED",
        "database.embedded",
        _parse_flag,
        "`1`: with no DSN, `kontod run` starts (and at its first start creates) the embedded"
        " PostgreSQL in `KONTOD_STATE_DIR/pgdata`; see"
        " [The embedded PostgreSQL](#the-embedded-postgresql)",
        default="0",
        default_doc="`0`, or `1` when `KONTOD_KONTO_URL` names a SQLite file or a libSQL server and"
        " no `KONTOD_DATABASE_URL` is set",
    ),
    Setting(
        "KONTOD_STATE_DIR",
        "database.state_dir",
        Path,
        "where the embedded PostgreSQL keeps its data (`pgdata/`)",
        default_doc="`$STATE_DIRECTORY` under systemd, else `$XDG_STATE_HOME/kontod` or"
        " `~/.local/state/kontod`",
        computed=lambda env, _: default_state_dir(env),
    ),
    # --- konto: where Konto's own tables are --------------------------------------------------
    Setting(
        "KONTOD_KONTO_URL",
        "konto.location",
        parse_konto_location,
        "where Konto's tables are: `postgresql://…` (a database of their own), `file:/path/konto.db`"
        " or a plain path (the web app's SQLite file), `libsql://…`, `https://…` or `http://…`"
        " (a libSQL server such as Turso)",
        default_doc="unset: Konto's tables are in kontod's own database (`KONTOD_DATABASE_URL`)",
        aliases=(Alias("TURSO_DATABASE_URL"),),
    ),
    Setting(
        "KONTOD_KONTO_AUTH_TOKEN",
        "konto.auth_token",
        _parse_token,
        "the libSQL server's auth token (Turso's database token)",
        default_doc="unset: no token is sent",
        aliases=(Alias("TURSO_AUTH_TOKEN"),),
        secret=True,
        credential="konto_auth_token",
    ),
    Setting(
        "KONTOD_KONTO_BUSY_TIMEOUT",
        "konto.busy_timeout",
        _parse_duration,
        "longest kontod waits, in all, for another writer of Konto's SQLite/libSQL database"
        " before a write fails (each write transaction is tried again until then)",
        default="30s",
    ),
    # --- http: the HTTP server -------------------------------------------------------------
    Setting(
        "KONTOD_LISTEN",
        "http.listen",
        _parse_listen,
        "`host:port` of the HTTP server",
        default=DEFAULT_LISTEN,
    ),
    Setting(
        "KONTOD_HTTP_HEADER_TIMEOUT",
        "http.header_timeout",
        _parse_duration,
        "how long a client gets to send a request's headers (and as long again for its body);"
        " an idle connection is closed after as long; see [HTTP endpoints](http-api.md)",
        default="10",
        default_doc="`10` (seconds; `30s`, `1m` work too)",
    ),
    Setting(
        "KONTOD_HTTP_MAX_CONNECTIONS",
        "http.max_connections",
        _whole(1),
        "open HTTP connections at most, lowered to half the process's file limit when above it",
        default="256",
    ),
    Setting(
        "KONTOD_ADMIN_TOKEN",
        "http.admin_token",
        _parse_token,
        "bearer token that allows manual triggers over HTTP",
        default_doc="unset: manual triggers over HTTP are refused",
        secret=True,
        credential="admin_token",
    ),
    # --- runner: the clock, the replicas, retries and the run history -----------------------
    Setting(
        "KONTOD_TIMEZONE",
        "runner.timezone",
        _parse_timezone,
        "IANA zone of the schedules and of snapshot dates",
        default="UTC",
        default_doc="the system's zone",
        computed=lambda env, _: system_timezone(),
    ),
    Setting(
        "KONTOD_SHUTDOWN_TIMEOUT",
        "runner.shutdown_timeout",
        _seconds(0, inclusive=False),
        "seconds a running job may take to finish after SIGTERM",
        default="25",
    ),
    Setting(
        "KONTOD_INSTANCE",
        "runner.instance",
        _parse_instance,
        "this process's name among replicas, stored on its runs and in its logs (1 to 63 of"
        " `A-Z a-z 0-9 . _ : @ / -`)",
        default_doc="`host:pid`",
        computed=lambda env, _: default_instance(),
    ),
    Setting(
        "KONTOD_LEASE_SECONDS",
        "runner.lease",
        _seconds(MIN_LEASE_S, inclusive=True),
        "lease of a running run: renewed every third of it, taken over when it expires (at"
        " least 5)",
        default="30",
    ),
    Setting(
        "KONTOD_RETRY_ATTEMPTS",
        "runner.retry_attempts",
        _whole(0),
        "times a failed scheduled tick is run again (takeovers included); `0` for never",
        default="3",
    ),
    Setting(
        "KONTOD_RETRY_DELAY",
        "runner.retry_delay",
        _parse_duration,
        "wait before the first retry, doubling each time (`5m`, `30s`, or seconds)",
        default="5m",
    ),
    Setting(
        "KONTOD_HISTORY_DAYS",
        "runner.history_days",
        _whole(1),
        "age after which runs are deleted, once a day (the last 100 runs, last failure and"
        " last success of each job are kept)",
        default="90",
    ),
    # --- logging -----------------------------------------------------------------------------
    Setting(
        "KONTOD_LOG_FORMAT",
        "logging.format",
        _choice("json", "console"),
        "`json` or `console`",
        default="json",
        default_doc="`console` on a terminal, `json` otherwise",
        computed=_tty_format,
    ),
    Setting(
        "KONTOD_LOG_LEVEL",
        "logging.level",
        _choice(*LOG_LEVELS),
        "`debug`, `info`, `warning` or `error`",
        default="info",
    ),
    # --- snapshots: the daily-snapshots job --------------------------------------------------
    Setting(
        "KONTOD_SNAPSHOT_SCHEDULE",
        "snapshots.schedule",
        _parse_cron,
        "cron expression of `daily-snapshots` (5 fields, or 6 with seconds first); refused at"
        " start when it does not fire within a year",
        default="0 2 * * *",
    ),
    Setting(
        "KONTOD_SNAPSHOT_BATCH_SIZE",
        "snapshots.batch_size",
        _whole(1),
        "users per snapshot batch (one transaction each)",
        default="1000",
    ),
    Setting(
        "KONTOD_SNAPSHOT_WORKERS",
        "snapshots.workers",
        _whole(1, MAX_SNAPSHOT_WORKERS, " (one database core each)"),
        "snapshot batches computed and written at once, each on a database connection of its"
        " own (1 to 16)",
        default="2",
    ),
    # --- refresh: the refresh-stale-connections job and its bank ------------------------------
    Setting(
        "KONTOD_REFRESH_SCHEDULE",
        "refresh.schedule",
        _parse_cron,
        "cron expression of `refresh-stale-connections`",
        default="0 */6 * * *",
    ),
    Setting(
        "KONTOD_POWENS_URL",
        "refresh.powens_url",
        _http_url("https://example.biapi.pro/2.0"),
        "base URL of the Powens API; `KONTOD_POWENS_DOMAIN` gives only its domain, the URL"
        " then being `https://{domain}/2.0`",
        default_doc="unset: the refresh job is reported as not configured",
        aliases=(Alias("KONTOD_POWENS_DOMAIN", _parse_domain),),
    ),
    Setting(
        "KONTOD_STALE_AFTER",
        "refresh.stale_after",
        _parse_duration,
        "age after which an account is stale (`7d`, `12h`, `30m`, or seconds)",
        default="7d",
    ),
    Setting(
        "KONTOD_REFRESH_CONCURRENCY",
        "refresh.concurrency",
        _whole(1),
        "users refreshed at once",
        default="8",
    ),
    Setting(
        "KONTOD_DB_ENCRYPTION_KEY",
        "refresh.db_encryption_key",
        _parse_encryption_key,
        "the web app's key for the bank tokens it stores encrypted: 64 hexadecimal"
        " characters; `kontod run` stops with exit status 2 when it opens none of the stored"
        " tokens that look encrypted",
        default_doc="unset: only plaintext tokens can be used",
        aliases=(Alias("DB_ENCRYPTION_KEY"),),
        secret=True,
        credential="db_encryption_key",
    ),
    Setting(
        "KONTOD_POWENS_CLIENT_ID",
        "refresh.powens_client_id",
        _parse_token,
        "the Powens client id the web app refreshes tokens with; with the secret, a 401 on a"
        " connection with a refresh token is answered by one refresh, as the web app does it",
        default_doc="unset: a 401 is not answered by a refresh",
        aliases=(Alias("POWENS_CLIENT_ID"),),
    ),
    Setting(
        "KONTOD_POWENS_CLIENT_SECRET",
        "refresh.powens_client_secret",
        _parse_token,
        "the Powens client secret that goes with `KONTOD_POWENS_CLIENT_ID`",
        default_doc="unset: a 401 is not answered by a refresh",
        aliases=(Alias("POWENS_CLIENT_SECRET"),),
        secret=True,
        credential="powens_client_secret",
    ),
    Setting(
        "KONTOD_TOKEN_HOLD",
        "refresh.rejection_hold",
        _parse_duration,
        "longest a connection whose token got a 401 is left alone before it is tried once"
        " again (`7d`, `12h`, `30m`, or seconds)",
        default="7d",
    ),
    # --- estimations: the refresh-property-estimations job and its DVF files -----------------
    Setting(
        "KONTOD_ESTIMATION_SCHEDULE",
        "estimations.schedule",
        _parse_cron,
        "cron expression of `refresh-property-estimations`",
        default="0 3 * * *",
    ),
    Setting(
        "KONTOD_DVF_URL",
        "estimations.dvf_url",
        _http_url(GEO_DVF_URL),
        "base URL of the geo-DVF CSV files: the listing of years, then"
        " `{year}/communes/{department}/{commune}.csv` under it",
        default=GEO_DVF_URL,
    ),
    Setting(
        "KONTOD_DVF_YEARS",
        "estimations.years",
        _parse_years,
        "years of DVF sales an estimate uses, `2024,2023,2022`",
        default_doc="unset: the three latest years the source's listing publishes, read each run",
    ),
    # --- audit: the prune-audit-log job --------------------------------------------------------
    Setting(
        "KONTOD_AUDIT_LOG_SCHEDULE",
        "audit.schedule",
        _parse_cron,
        "cron expression of `prune-audit-log`",
        default="30 4 * * *",
    ),
    Setting(
        "KONTOD_AUDIT_LOG_DAYS",
        "audit.days",
        _whole(1),
        "age in days after which `prune-audit-log` deletes an `audit_log` row (the web app's"
        " own retention is 90 days)",
        default="90",
    ),
    Setting(
        "KONTOD_AUDIT_LOG_BATCH",
        "audit.batch_size",
        _whole(1),
        "`audit_log` rows deleted per write transaction, so that the web app's writes never"
        " wait for more than one batch",
        default="2000",
    ),
    # --- providers: every third-party HTTP API (the bank, the rate sources, the DVF files) -----
    Setting(
        "KONTOD_PROVIDER_TIMEOUT",
        "providers.timeout",
        _seconds(0, inclusive=False),
        "seconds per provider request",
        default="30",
    ),
    Setting(
        "KONTOD_PROVIDER_ATTEMPTS",
        "providers.attempts",
        _whole(1),
        "attempts per provider request, retries included",
        default="4",
    ),
    Setting(
        "KONTOD_PROVIDER_RATE",
        "providers.rate",
        _parse_rate,
        "provider requests per second, across the whole process (retries included)",
        default="10",
    ),
    Setting(
        "KONTOD_PROVIDER_MAX_BODY",
        "providers.max_body",
        _parse_size,
        "largest answer body kontod reads from the bank, a rate source or the DVF files, `8M`,"
        " `512K` or bytes (K, M, G are powers of 1024; from 1K to 1G); when set it applies to"
        " all; a larger answer is that request's error (see Bounded answers under the refresh"
        " job)",
        default_doc="unset: 8 MiB for the bank, 2 MiB for the rate sources, 64 MiB for a DVF file",
    ),
    # --- rates: currency conversion of the snapshots -----------------------------------------
    Setting(
        "KONTOD_BASE_CURRENCY",
        "rates.base_currency",
        _parse_currency,
        "ISO 4217 code of the currency snapshots are written in",
        default="EUR",
    ),
    Setting(
        "KONTOD_RATE_MAX_AGE",
        "rates.max_age_days",
        _parse_days,
        "oldest rate a snapshot may use, in whole days (`7d` or `7`)",
        default="7d",
    ),
    Setting(
        "KONTOD_FIAT_RATES_URL",
        "rates.fiat_url",
        _http_url(),
        "the ECB daily reference rates file (eurofxref XML)",
        default=ECB_DAILY_URL,
    ),
    Setting(
        "KONTOD_CRYPTO_PRICES_URL",
        "rates.crypto_url",
        _http_url(),
        "a CoinGecko-style `/simple/price` endpoint",
        default=COINGECKO_SIMPLE_PRICE_URL,
    ),
    Setting(
        "KONTOD_CRYPTO_IDS",
        "rates.crypto_ids",
        _parse_crypto_ids,
        "`SYMBOL=id` pairs added to (or replacing in) the shipped map of crypto symbols to the"
        " price API's coin ids, `PEPE=pepe,XBT=bitcoin`",
        default="",
    ),
    Setting(
        "KONTOD_CRYPTO_API_KEY",
        "rates.crypto_api_key",
        _parse_token,
        "a CoinGecko API key, sent as `x-cg-demo-api-key` (or `x-cg-pro-api-key` to"
        " `pro-api.coingecko.com`); without one the keyless tier is used, rate limited per IP",
        secret=True,
        credential="crypto_api_key",
    ),
    Setting(
        "KONTOD_MANUAL_RATES",
        "rates.manual",
        _parse_manual_rates,
        "`CURRENCY=value` pairs, the value of one unit in the base currency (from 1e-12 to"
        " 1e12), for currencies no source quotes, `XAU=2210.50`",
        default="",
    ),
    # --- pings and suspicion: how each job is watched ----------------------------------------
    Setting(
        "KONTOD_PING_URL_",
        "pings.urls",
        _parse_ping_url,
        "ping URL of one job in the Healthchecks convention"
        " (`KONTOD_PING_URL_DAILY_SNAPSHOTS=https://hc-ping.com/<uuid>`); see"
        " [Pings](operations.md#pings-a-dead-mans-switch-outside-the-host)",
        default_doc="unset: no ping",
        # A ping URL is a credential of its own (whoever has it can ping).
        secret=True,
        per_job=True,
    ),
    Setting(
        "KONTOD_PING_BASE_URL",
        "pings.base_url",
        _parse_ping_url,
        "one ping URL for every job, each pinged at `<base>/<job name>` (a Healthchecks slug"
        " URL such as `https://hc-ping.com/<ping key>`); a job's own URL wins",
        secret=True,
    ),
    Setting(
        "KONTOD_SUSPICIOUS_",
        "suspicion.thresholds",
        _parse_thresholds,
        "thresholds of suspicious success for one job: `duration=F,items=F` (fractions of the"
        " usual, 0 turns a check off) or `off`",
        default_doc="`duration=0.2,items=0.5`",
        per_job=True,
    ),
)
BY_ENV = {s.env: s for s in SETTINGS}
# Secrets may also come from systemd credentials: variable -> $CREDENTIALS_DIRECTORY/<file>.
CREDENTIALS = {s.env: s.credential for s in SETTINGS if s.credential}


def _spec_field(env: str) -> Any:
    """The dataclass field of a setting: its parsed default, hidden from repr when secret."""
    spec = BY_ENV[env]
    if spec.per_job:
        return field(default_factory=dict, repr=not spec.secret)
    if spec.default is None and spec.computed is not None:
        computed = spec.computed
        return field(default_factory=lambda: computed({}, False), repr=not spec.secret)
    value = None if spec.default is None else spec.parse(spec.default)
    if isinstance(value, dict):
        return field(default_factory=lambda: dict(value), repr=not spec.secret)
    return field(default=value, repr=not spec.secret)


# Sections: each goes to the one part of kontod that uses it. Every field is a row of SETTINGS
# (tests/unit/test_config.py checks both ways), whose default it takes.


@dataclass(frozen=True)
class DatabaseSettings:
    """Which PostgreSQL kontod opens: a DSN, or the embedded one in ``state_dir``."""

    url: str | None = _spec_field("KONTOD_DATABASE_URL")
    # Whether `kontod run` may start (and create) the embedded PostgreSQL when no URL is set.
    embedded: bool = _spec_field("KONTOD_EMBEDDED")
    state_dir: Path = _spec_field("KONTOD_STATE_DIR")


@dataclass(frozen=True)
class KontoSettings:
    """Where Konto's own tables are, and how long a write waits for the web app's."""

    # None: in kontod's own PostgreSQL (the database section).
    location: KontoLocation | None = _spec_field("KONTOD_KONTO_URL")
    auth_token: str | None = _spec_field("KONTOD_KONTO_AUTH_TOKEN")
    busy_timeout: timedelta = _spec_field("KONTOD_KONTO_BUSY_TIMEOUT")


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP server: where it listens, its limits and the token of manual triggers."""

    listen: tuple[str, int] = _spec_field("KONTOD_LISTEN")
    # A client gets this long for each request's headers (and again for its body).
    header_timeout: timedelta = _spec_field("KONTOD_HTTP_HEADER_TIMEOUT")
    max_connections: int = _spec_field("KONTOD_HTTP_MAX_CONNECTIONS")
    admin_token: str | None = _spec_field("KONTOD_ADMIN_TOKEN")

    @property
    def host(self) -> str:
        return self.listen[0]

    @property
    def port(self) -> int:
        return self.listen[1]

    @property
    def address(self) -> str:
        """``host:port``, an IPv6 host in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class RunnerSettings:
    """The runner: the zone of the schedules, this replica's name, leases, retries, history."""

    timezone: str = _spec_field("KONTOD_TIMEZONE")
    shutdown_timeout: timedelta = _spec_field("KONTOD_SHUTDOWN_TIMEOUT")
    instance: str = _spec_field("KONTOD_INSTANCE")
    lease: timedelta = _spec_field("KONTOD_LEASE_SECONDS")
    retry_attempts: int = _spec_field("KONTOD_RETRY_ATTEMPTS")
    retry_delay: timedelta = _spec_field("KONTOD_RETRY_DELAY")
    history_days: int = _spec_field("KONTOD_HISTORY_DAYS")

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class LogSettings:
    """How log lines are written."""

    format: str = _spec_field("KONTOD_LOG_FORMAT")
    level: str = _spec_field("KONTOD_LOG_LEVEL")


@dataclass(frozen=True)
class SnapshotSettings:
    """The daily-snapshots job."""

    schedule: str = _spec_field("KONTOD_SNAPSHOT_SCHEDULE")
    batch_size: int = _spec_field("KONTOD_SNAPSHOT_BATCH_SIZE")
    workers: int = _spec_field("KONTOD_SNAPSHOT_WORKERS")


@dataclass(frozen=True)
class RefreshSettings:
    """The refresh-stale-connections job and the bank it asks."""

    schedule: str = _spec_field("KONTOD_REFRESH_SCHEDULE")
    powens_url: str | None = _spec_field("KONTOD_POWENS_URL")
    stale_after: timedelta = _spec_field("KONTOD_STALE_AFTER")
    concurrency: int = _spec_field("KONTOD_REFRESH_CONCURRENCY")
    # The web app's DB_ENCRYPTION_KEY (32 bytes), to read the bank tokens it stores encrypted.
    db_encryption_key: bytes | None = _spec_field("KONTOD_DB_ENCRYPTION_KEY")
    # Longest a connection whose token got a 401 is left alone before it is tried again.
    rejection_hold: timedelta = _spec_field("KONTOD_TOKEN_HOLD")
    # The web app's Powens client, to refresh a token Powens rejected (both or neither used).
    powens_client_id: str | None = _spec_field("KONTOD_POWENS_CLIENT_ID")
    powens_client_secret: str | None = _spec_field("KONTOD_POWENS_CLIENT_SECRET")


@dataclass(frozen=True)
class EstimationSettings:
    """The refresh-property-estimations job and the DVF files it reads."""

    schedule: str = _spec_field("KONTOD_ESTIMATION_SCHEDULE")
    dvf_url: str = _spec_field("KONTOD_DVF_URL")
    # None: the three latest years the source publishes.
    years: tuple[int, ...] | None = _spec_field("KONTOD_DVF_YEARS")


@dataclass(frozen=True)
class AuditSettings:
    """The prune-audit-log job."""

    schedule: str = _spec_field("KONTOD_AUDIT_LOG_SCHEDULE")
    days: int = _spec_field("KONTOD_AUDIT_LOG_DAYS")
    batch_size: int = _spec_field("KONTOD_AUDIT_LOG_BATCH")


@dataclass(frozen=True)
class ProviderSettings:
    """Every third-party HTTP API: the bank and the rate sources."""

    timeout: timedelta = _spec_field("KONTOD_PROVIDER_TIMEOUT")
    attempts: int = _spec_field("KONTOD_PROVIDER_ATTEMPTS")
    rate: float = _spec_field("KONTOD_PROVIDER_RATE")
    # bytes of one answer from the bank or a rate source; None: 8 MiB and 2 MiB (answers.py)
    max_body: int | None = _spec_field("KONTOD_PROVIDER_MAX_BODY")


@dataclass(frozen=True)
class RateSettings:
    """Currency conversion of the snapshots: the base, the sources and their limits."""

    base_currency: str = _spec_field("KONTOD_BASE_CURRENCY")
    max_age_days: int = _spec_field("KONTOD_RATE_MAX_AGE")
    fiat_url: str = _spec_field("KONTOD_FIAT_RATES_URL")
    crypto_url: str = _spec_field("KONTOD_CRYPTO_PRICES_URL")
    # symbol -> price API id, over the shipped map (kontod/providers/rates.py)
    crypto_ids: Mapping[str, str] = _spec_field("KONTOD_CRYPTO_IDS")
    # currency -> value of one unit in the base currency
    manual: Mapping[str, Decimal] = _spec_field("KONTOD_MANUAL_RATES")
    crypto_api_key: str | None = _spec_field("KONTOD_CRYPTO_API_KEY")


@dataclass(frozen=True)
class PingSettings:
    """Healthchecks-style ping URLs: per job name, and one base for every job."""

    urls: Mapping[str, str] = _spec_field("KONTOD_PING_URL_")
    base_url: str | None = _spec_field("KONTOD_PING_BASE_URL")


@dataclass(frozen=True)
class SuspicionSettings:
    """Per job name: the (duration, items) fractions of a suspicious success."""

    thresholds: Mapping[str, tuple[float | None, float | None]] = _spec_field("KONTOD_SUSPICIOUS_")


@dataclass(frozen=True)
class Settings:
    """Every knob of kontod, already checked, in one section per part that uses it."""

    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    konto: KontoSettings = field(default_factory=KontoSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    logging: LogSettings = field(default_factory=LogSettings)
    snapshots: SnapshotSettings = field(default_factory=SnapshotSettings)
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    estimations: EstimationSettings = field(default_factory=EstimationSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    providers: ProviderSettings = field(default_factory=ProviderSettings)
    rates: RateSettings = field(default_factory=RateSettings)
    pings: PingSettings = field(default_factory=PingSettings)
    suspicion: SuspicionSettings = field(default_factory=SuspicionSettings)

    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some fields of some sections changed:
        ``settings.replace(http={"admin_token": "t"})``."""
        changed = {
            name: dataclasses.replace(getattr(self, name), **fields)
            for name, fields in sections.items()
        }
        return dataclasses.replace(self, **changed)


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    isatty: bool | None = None,
    now: datetime | None = None,
) -> Settings:
    """Read and check every setting; raise ConfigError naming the first bad one.

    Schedules are checked in the configured zone for the year after ``now`` (default: the
    clock): one that does not fire in it, or that cannot be computed, is refused.
    """
    env = os.environ if env is None else env
    file_values = _read_toml(env)
    labels: dict[str, str] = {}

    def raw(var: str, credential: str | None) -> tuple[str, str] | None:
        """(label for errors, raw text) of a setting: environment, file, then credential."""
        if env.get(var, "") != "":
            return var, env[var]
        key = _toml_key(var)
        if key is not None and key in file_values:
            return f"{key} in {env['KONTOD_CONFIG']}", str(file_values[key])
        if credential and env.get("CREDENTIALS_DIRECTORY"):
            path = Path(env["CREDENTIALS_DIRECTORY"]) / credential
            if path.is_file():
                try:
                    return f"credential {credential}", path.read_text().strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(
                        f"credential {credential}", str(path), f"cannot be read as text ({exc})"
                    ) from None
        return None

    def checked(spec: Setting, parser: Parser, label: str, text: str) -> Any:
        try:
            return parser(text)
        except ValueError as exc:
            shown = text if spec.shown is None else spec.shown(text)
            if spec.secret:
                shown = "<hidden>"
            raise ConfigError(label, shown, str(exc)) from None

    values: dict[str, dict[str, Any]] = {}
    for spec in SETTINGS:
        if not spec.where:
            continue  # KONTOD_CONFIG, read first
        section = values.setdefault(spec.section, {})
        if spec.per_job:
            section[spec.attr] = {
                job: checked(spec, spec.parse, label, text)
                for job, (label, text) in _per_job(env, file_values, spec.env).items()
            }
            continue
        names = [(spec.env, spec.parse, spec.credential)]
        names += [(a.env, a.parse or spec.parse, None) for a in spec.aliases]
        for var, parser, credential in names:
            found = raw(var, credential)
            if found is not None:
                label, text = found
                labels[spec.env] = label
                section[spec.attr] = checked(spec, parser, label, text)
                break
        else:
            if spec.computed is not None:
                if isatty is None:
                    isatty = sys.stderr.isatty()
                section[spec.attr] = spec.computed(env, isatty)

    settings = Settings(
        **{
            name: section_type(**values.get(name, {}))
            for name, section_type in _SECTION_TYPES.items()
        }
    )
    _check_schedules(settings, labels, datetime.now(UTC) if now is None else now)
    return _kontod_tables_embedded(_konto_in_postgresql(settings, labels), labels)


def _kontod_tables_embedded(settings: Settings, labels: Mapping[str, str]) -> Settings:
    """With Konto's tables in a SQLite file or a libSQL server and no ``KONTOD_DATABASE_URL``,
    kontod's own tables (runs, leases, pauses, rates) go to the embedded PostgreSQL without
    ``KONTOD_EMBEDDED=1``. The refusal of an embedded database guards Konto's data (a daemon
    snapshotting an empty database every night); here Konto's data is the file or server,
    which must exist and have its tables, and only kontod's bookkeeping starts empty. An
    explicit ``KONTOD_EMBEDDED`` is kept as given."""
    konto = settings.konto.location
    if (
        konto is None
        or konto.kind == "postgresql"
        or settings.database.url is not None
        or "KONTOD_EMBEDDED" in labels
    ):
        return settings
    return settings.replace(database={"embedded": True})


def _konto_in_postgresql(settings: Settings, labels: Mapping[str, str]) -> Settings:
    """A ``postgresql://`` Konto URL is kontod's own database: Konto's tables and kontod's live
    in one database (the jobs join them). It stands for ``KONTOD_DATABASE_URL`` when that is
    unset, and must name the same database when both are set."""
    konto, own = settings.konto.location, settings.database.url
    if konto is None or konto.kind != "postgresql":
        return settings
    if own is not None and own != konto.target:
        raise ConfigError(
            labels["KONTOD_KONTO_URL"],
            redact_dsn(konto.target),
            "expected the same PostgreSQL database as KONTOD_DATABASE_URL (Konto's tables in"
            " PostgreSQL live beside kontod's own), or a SQLite path or a libSQL URL",
        )
    return settings.replace(database={"url": konto.target}, konto={"location": None})


# Section name -> its dataclass, as Settings declares them.
_SECTION_TYPES: dict[str, Any] = get_type_hints(Settings)


def _check_schedules(settings: Settings, labels: Mapping[str, str], now: datetime) -> None:
    """Refuse a configured schedule that has no tick in the next year of the configured zone,
    or whose ticks around that year's clock changes cannot be computed."""
    tz = settings.runner.tz
    for spec in SETTINGS:
        if spec.parse is not _parse_cron or spec.env not in labels:
            continue  # the defaults fire every day in every zone
        expr = getattr(getattr(settings, spec.section), spec.attr)
        try:
            schedule.check(expr, tz, now)
        except schedule.ScheduleError as exc:
            raise ConfigError(
                labels[spec.env],
                expr,
                f"expected a cron expression that fires at least once a year in {tz.key} ({exc})",
            ) from None


def _per_job(
    env: Mapping[str, str], file_values: Mapping[str, Any], prefix: str
) -> dict[str, tuple[str, str]]:
    """Settings named ``<prefix><JOB>``: job name (``DAILY_SNAPSHOTS`` -> ``daily-snapshots``)
    -> (label for errors, raw text); the environment wins over the file."""
    found: dict[str, tuple[str, str]] = {}
    key_prefix = prefix.removeprefix("KONTOD_").lower()
    for key, value in file_values.items():
        if key.startswith(key_prefix) and key != key_prefix:
            job = key.removeprefix(key_prefix).replace("_", "-")
            found[job] = (f"{key} in {env.get('KONTOD_CONFIG')}", str(value))
    for var, value in env.items():
        if var.startswith(prefix) and var != prefix and value != "":
            found[var.removeprefix(prefix).lower().replace("_", "-")] = (var, value)
    return found


def toml_keys() -> tuple[set[str], tuple[str, ...]]:
    """The keys the TOML file may hold, and the prefixes of its per-job keys."""
    keys: set[str] = set()
    prefixes: list[str] = []
    for spec in SETTINGS:
        if spec.toml_key is None:
            continue
        if spec.per_job:
            prefixes.append(spec.toml_key)
            continue
        keys.add(spec.toml_key)
        keys.update(k for a in spec.aliases if (k := _toml_key(a.env)) is not None)
    return keys, tuple(prefixes)


def _read_toml(env: Mapping[str, str]) -> dict[str, Any]:
    path = env.get("KONTOD_CONFIG")
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("KONTOD_CONFIG", path, "the file does not exist") from None
    except OSError as exc:
        raise ConfigError(
            "KONTOD_CONFIG", path, f"the file cannot be read ({exc.strerror})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("KONTOD_CONFIG", path, f"not valid TOML: {exc}") from None
    known, prefixes = toml_keys()
    for key in data:
        if key not in known and not key.startswith(prefixes):
            raise ConfigError(
                "KONTOD_CONFIG",
                path,
                f"unknown key {key!r}; known keys: {', '.join(sorted(known))}",
            )
    return data


# The settings table of docs/configuration.md, generated from SETTINGS (scripts/settings-table writes it).
TABLE_BEGIN = "<!-- settings table: generated from kontod/config.py by `make settings-table` -->"
TABLE_END = "<!-- end of the settings table -->"


def settings_table() -> str:
    """The settings table: one row per setting, in the order of SETTINGS."""
    rows = ["| variable | meaning | default |", "|---|---|---|"]
    for spec in SETTINGS:
        name = f"`{spec.env}<JOB>`" if spec.per_job else f"`{spec.env}`"
        also = []
        if spec.aliases:
            also.append("also read: " + ", ".join(f"`{a.env}`" for a in spec.aliases))
        if spec.credential:
            also.append(f"also the `{spec.credential}` credential")
        if also:
            name += f" ({'; '.join(also)})"
        if spec.default_doc is not None:
            default = spec.default_doc
        elif spec.default:
            default = f"`{spec.default}`"
        else:
            default = "unset"
        rows.append(f"| {name} | {spec.doc} | {default} |")
    return "\n".join(rows) + "\n"


def with_settings_table(readme: str) -> str:
    """The page's text with its settings table (between the two markers) made anew."""
    begin = readme.index(TABLE_BEGIN) + len(TABLE_BEGIN)
    end = readme.index(TABLE_END)
    return readme[:begin] + "\n" + settings_table() + readme[end:]
