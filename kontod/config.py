"""Settings: read once from the environment and an optional TOML file, checked before anything starts.

Every setting has an environment variable ``KONTOD_<NAME>``; the TOML file named by
``KONTOD_CONFIG`` may hold the same settings as lower-case keys without the prefix
(``timezone = "Europe/Paris"``). The environment wins. Of kontod this module imports only the
schedule maths (a pure module that imports nothing of kontod), to check schedules in the zone.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from kontod.scheduler import schedule

DEFAULT_LISTEN = "127.0.0.1:8435"
ECB_DAILY_URL = "https://www.ecb.europa.eu/stats/eurofxref/eurofxref-daily.xml"
COINGECKO_SIMPLE_PRICE_URL = "https://api.coingecko.com/api/v3/simple/price"
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
T = TypeVar("T")


class ConfigError(Exception):
    """A setting has a value kontod cannot use; the message names it and what is accepted."""

    def __init__(self, setting: str, value: str, accepted: str) -> None:
        self.setting = setting
        self.value = value
        self.accepted = accepted
        super().__init__(f"invalid {setting}={value!r}: {accepted}")


@dataclass(frozen=True)
class Settings:
    """Every knob of kontod, already checked."""

    database_url: str | None = None
    # Whether `kontod run` may start (and create) the embedded PostgreSQL when no URL is set.
    embedded: bool = False
    state_dir: Path = field(default_factory=lambda: default_state_dir({}))
    listen_host: str = "127.0.0.1"
    listen_port: int = 8435
    # A client gets this long for each request's headers (and again for its body).
    http_header_timeout: float = 10.0
    http_max_connections: int = 256
    timezone: str = "UTC"
    snapshot_schedule: str = "0 2 * * *"
    refresh_schedule: str = "0 */6 * * *"
    admin_token: str | None = field(default=None, repr=False)
    log_format: str = "json"
    log_level: str = "info"
    shutdown_timeout: float = 25.0
    snapshot_batch_size: int = 1000
    snapshot_workers: int = 2
    stale_after: float = 7 * 86400.0
    # Longest a connection whose token got a 401 is left alone before it is tried again.
    rejection_hold: float = 7 * 86400.0
    powens_url: str | None = None
    refresh_concurrency: int = 8
    provider_timeout: float = 30.0
    provider_attempts: int = 4
    provider_rate: float = 10.0
    # bytes of one answer from the bank or a rate source; None: 8 MiB and 2 MiB (answers.py)
    provider_max_body: int | None = None
    # The web app's DB_ENCRYPTION_KEY (32 bytes), to read the bank tokens it stores encrypted.
    db_encryption_key: bytes | None = field(default=None, repr=False)
    base_currency: str = "EUR"
    rate_max_age_days: int = 7
    fiat_rates_url: str = ECB_DAILY_URL
    crypto_prices_url: str = COINGECKO_SIMPLE_PRICE_URL
    # symbol -> price API id, over the shipped map (kontod/providers/rates.py)
    crypto_ids: Mapping[str, str] = field(default_factory=dict)
    # currency -> value of one unit in the base currency
    manual_rates: Mapping[str, Decimal] = field(default_factory=dict)
    crypto_api_key: str | None = field(default=None, repr=False)
    instance: str = field(default_factory=lambda: default_instance())
    lease_seconds: float = 30.0
    retry_attempts: int = 3
    retry_delay: float = 300.0
    history_days: int = 90
    # Per job name: a Healthchecks-style ping URL, and suspicious-success thresholds.
    ping_urls: Mapping[str, str] = field(default_factory=dict)
    ping_base_url: str | None = None
    suspicious: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


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


# Parsers: each takes the raw text and returns the value or raises ValueError with what is accepted.


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
        from datetime import UTC, datetime

        CronSim(expr, datetime(2026, 1, 1, tzinfo=UTC))
    except (CronSimError, ValueError) as exc:
        raise ValueError(
            f"expected a cron expression of 5 fields, or 6 with seconds first ({exc})"
        ) from None
    return expr


def _parse_choice(*choices: str) -> Callable[[str], str]:
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


def _parse_positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number of seconds greater than 0") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("expected a number of seconds greater than 0")
    return value


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


def _parse_positive_int(raw: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", raw) or int(raw) < 1:
        raise ValueError("expected a whole number of at least 1")
    return int(raw)


MAX_SNAPSHOT_WORKERS = 16


def _parse_workers(raw: str) -> int:
    value = _parse_positive_int(raw)
    if value > MAX_SNAPSHOT_WORKERS:
        raise ValueError(f"expected at most {MAX_SNAPSHOT_WORKERS} (one database core each)")
    return value


MIN_LEASE_S = 5.0


def _parse_lease(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not MIN_LEASE_S <= value < float("inf"):
        raise ValueError(f"expected a number of seconds of at least {MIN_LEASE_S:g}")
    return value


def _parse_count(raw: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", raw):
        raise ValueError("expected a whole number of 0 or more")
    return int(raw)


def _parse_instance(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._:@/-]{1,63}", raw):
        raise ValueError(
            "expected 1 to 63 letters, digits or . _ : @ / - (such as web-1 or host:1234)"
        )
    return raw


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration(raw: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", raw)
    if not m or float(m.group(1)) <= 0:
        raise ValueError("expected a duration such as 7d, 12h, 30m, 45s or a number of seconds")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _parse_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            "expected an http:// or https:// URL such as https://example.biapi.pro/2.0"
        )
    return raw.rstrip("/")


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


def _per_job(
    env: Mapping[str, str], file_values: Mapping[str, Any], prefix: str
) -> dict[str, tuple[str, str]]:
    """Settings named ``<prefix><JOB>``: job name (``NIGHTLY_EXPORT`` -> ``nightly-export``)
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


def _parse_encryption_key(raw: str) -> bytes:
    text = raw.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ValueError("expected 64 hexadecimal characters (a 32-byte key)")
    return bytes.fromhex(text)


def _parse_token(raw: str) -> str:
    if not raw.strip():
        raise ValueError("expected a non-empty token")
    return raw.strip()


def _parse_currency(raw: str) -> str:
    code = raw.strip().upper()
    if code not in ISO_4217:
        raise ValueError("expected an ISO 4217 currency code such as EUR, USD or CHF")
    return code


def _parse_days(raw: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*d?\s*", raw)
    if not m:
        raise ValueError("expected a whole number of days such as 7d (rates are daily)")
    return int(m.group(1))


def _parse_source_url(raw: str) -> str:
    try:
        return _parse_url(raw)
    except ValueError:
        raise ValueError("expected an http:// or https:// URL") from None


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


# The settings kontod reads: (attribute, environment variable, parser, secret?).
# The README's settings table mirrors this list.
_SPEC: list[tuple[str, str, Callable[[str], Any], bool]] = [
    ("state_dir", "KONTOD_STATE_DIR", Path, False),
    ("embedded", "KONTOD_EMBEDDED", _parse_flag, False),
    ("timezone", "KONTOD_TIMEZONE", _parse_timezone, False),
    ("snapshot_schedule", "KONTOD_SNAPSHOT_SCHEDULE", _parse_cron, False),
    ("refresh_schedule", "KONTOD_REFRESH_SCHEDULE", _parse_cron, False),
    ("log_format", "KONTOD_LOG_FORMAT", _parse_choice("json", "console"), False),
    ("log_level", "KONTOD_LOG_LEVEL", _parse_choice(*LOG_LEVELS), False),
    ("shutdown_timeout", "KONTOD_SHUTDOWN_TIMEOUT", _parse_positive_float, False),
    ("snapshot_batch_size", "KONTOD_SNAPSHOT_BATCH_SIZE", _parse_positive_int, False),
    ("snapshot_workers", "KONTOD_SNAPSHOT_WORKERS", _parse_workers, False),
    ("stale_after", "KONTOD_STALE_AFTER", _parse_duration, False),
    ("rejection_hold", "KONTOD_TOKEN_HOLD", _parse_duration, False),
    ("refresh_concurrency", "KONTOD_REFRESH_CONCURRENCY", _parse_positive_int, False),
    ("provider_timeout", "KONTOD_PROVIDER_TIMEOUT", _parse_positive_float, False),
    ("provider_attempts", "KONTOD_PROVIDER_ATTEMPTS", _parse_positive_int, False),
    ("provider_rate", "KONTOD_PROVIDER_RATE", _parse_rate, False),
    ("provider_max_body", "KONTOD_PROVIDER_MAX_BODY", _parse_size, False),
    ("base_currency", "KONTOD_BASE_CURRENCY", _parse_currency, False),
    ("rate_max_age_days", "KONTOD_RATE_MAX_AGE", _parse_days, False),
    ("fiat_rates_url", "KONTOD_FIAT_RATES_URL", _parse_source_url, False),
    ("crypto_prices_url", "KONTOD_CRYPTO_PRICES_URL", _parse_source_url, False),
    ("crypto_ids", "KONTOD_CRYPTO_IDS", _parse_crypto_ids, False),
    ("manual_rates", "KONTOD_MANUAL_RATES", _parse_manual_rates, False),
    ("crypto_api_key", "KONTOD_CRYPTO_API_KEY", _parse_token, True),
    ("instance", "KONTOD_INSTANCE", _parse_instance, False),
    ("lease_seconds", "KONTOD_LEASE_SECONDS", _parse_lease, False),
    ("retry_attempts", "KONTOD_RETRY_ATTEMPTS", _parse_count, False),
    ("retry_delay", "KONTOD_RETRY_DELAY", _parse_duration, False),
    ("history_days", "KONTOD_HISTORY_DAYS", _parse_positive_int, False),
    ("http_header_timeout", "KONTOD_HTTP_HEADER_TIMEOUT", _parse_duration, False),
    ("http_max_connections", "KONTOD_HTTP_MAX_CONNECTIONS", _parse_positive_int, False),
]

# Secrets may also come from systemd credentials: $CREDENTIALS_DIRECTORY/<file>.
_CREDENTIALS = {
    "KONTOD_DATABASE_URL": "database_url",
    "KONTOD_ADMIN_TOKEN": "admin_token",
    "KONTOD_DB_ENCRYPTION_KEY": "db_encryption_key",
    "KONTOD_CRYPTO_API_KEY": "crypto_api_key",
}


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

    def raw(var: str) -> tuple[str, str] | None:
        """(label for errors, raw text) of a setting, environment first."""
        if env.get(var, "") != "":
            return var, env[var]
        key = var.removeprefix("KONTOD_").lower()
        if key in file_values:
            return f"{key} in {env['KONTOD_CONFIG']}", str(file_values[key])
        cred = _CREDENTIALS.get(var)
        if cred and env.get("CREDENTIALS_DIRECTORY"):
            path = Path(env["CREDENTIALS_DIRECTORY"]) / cred
            if path.is_file():
                try:
                    return f"credential {cred}", path.read_text().strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(
                        f"credential {cred}", str(path), f"cannot be read as text ({exc})"
                    ) from None
        return None

    def parse(var: str, parser: Callable[[str], T], secret: bool = False) -> T | None:
        found = raw(var)
        if found is None:
            return None
        label, text = found
        labels[var] = label
        try:
            return parser(text)
        except ValueError as exc:
            shown = "<hidden>" if secret else (redact_dsn(text) if "DATABASE" in var else text)
            raise ConfigError(label, shown, str(exc)) from None

    values: dict[str, Any] = {}
    for attr, var, parser, secret in _SPEC:
        value = parse(var, parser, secret)
        if value is not None:
            values[attr] = value

    dsn = parse("KONTOD_DATABASE_URL", _parse_dsn)
    if dsn is None and env.get("DATABASE_URL"):
        dsn = parse("DATABASE_URL", _parse_dsn)
    values["database_url"] = dsn
    values["admin_token"] = parse("KONTOD_ADMIN_TOKEN", _parse_token, secret=True)
    key = parse("KONTOD_DB_ENCRYPTION_KEY", _parse_encryption_key, secret=True)
    if key is None and env.get("DB_ENCRYPTION_KEY"):
        key = parse("DB_ENCRYPTION_KEY", _parse_encryption_key, secret=True)
    values["db_encryption_key"] = key

    listen = parse("KONTOD_LISTEN", _parse_listen)
    if listen is not None:
        values["listen_host"], values["listen_port"] = listen

    powens = parse("KONTOD_POWENS_URL", _parse_url)
    if powens is None:
        powens = parse("KONTOD_POWENS_DOMAIN", _parse_domain)
    values["powens_url"] = powens

    # A ping URL is a credential of its own (whoever has it can ping): never shown.
    ping_base = parse("KONTOD_PING_BASE_URL", _parse_ping_url, secret=True)
    if ping_base is not None:
        values["ping_base_url"] = ping_base
    for attr, prefix, per_job_parser in (
        ("ping_urls", "KONTOD_PING_URL_", _parse_ping_url),
        ("suspicious", "KONTOD_SUSPICIOUS_", _parse_thresholds),
    ):
        parsed: dict[str, Any] = {}
        for job, (label, text) in _per_job(env, file_values, prefix).items():
            try:
                parsed[job] = per_job_parser(text)
            except ValueError as exc:
                shown = "<hidden>" if attr == "ping_urls" else text
                raise ConfigError(label, shown, str(exc)) from None
        values[attr] = parsed

    values.setdefault("state_dir", default_state_dir(env))
    values.setdefault("timezone", system_timezone())
    _check_schedules(values, labels, datetime.now(UTC) if now is None else now)
    if "log_format" not in values:
        tty = sys.stderr.isatty() if isatty is None else isatty
        values["log_format"] = "console" if tty else "json"
    return Settings(**values)


def _check_schedules(values: Mapping[str, Any], labels: Mapping[str, str], now: datetime) -> None:
    """Refuse a configured schedule that has no tick in the next year of the configured zone,
    or whose ticks around that year's clock changes cannot be computed."""
    tz = ZoneInfo(values["timezone"])
    for attr, var in (
        ("snapshot_schedule", "KONTOD_SNAPSHOT_SCHEDULE"),
        ("refresh_schedule", "KONTOD_REFRESH_SCHEDULE"),
    ):
        if attr not in values:
            continue  # the defaults fire every day in every zone
        try:
            schedule.check(values[attr], tz, now)
        except schedule.ScheduleError as exc:
            raise ConfigError(
                labels.get(var, var),
                values[attr],
                f"expected a cron expression that fires at least once a year in {tz.key} ({exc})",
            ) from None


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
    known = {var.removeprefix("KONTOD_").lower() for _, var, _, _ in _SPEC} | {
        "database_url",
        "admin_token",
        "db_encryption_key",
        "listen",
        "powens_url",
        "powens_domain",
        "ping_base_url",
    }
    for key in data:
        if key not in known and not key.startswith(("ping_url_", "suspicious_")):
            raise ConfigError(
                "KONTOD_CONFIG",
                path,
                f"unknown key {key!r}; known keys: {', '.join(sorted(known))}",
            )
    return data
