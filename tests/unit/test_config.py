"""Settings: defaults, sources, and a clear exit 2 for every bad value (never showing secrets)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from kontod.config import (
    CREDENTIALS,
    SETTINGS,
    TABLE_BEGIN,
    ConfigError,
    Settings,
    load_settings,
    redact_dsn,
    toml_keys,
    with_settings_table,
)


def kontod(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The real console program, with only the given KONTOD_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KONTOD_", "DATABASE_URL"))}
    return subprocess.run(
        [sys.executable, "-m", "kontod", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_defaults() -> None:
    s = load_settings({"HOME": "/home/ana"}, isatty=False)
    assert s.database.url is None
    assert s.database.state_dir == Path("/home/ana/.local/state/kontod")
    assert s.http.address == "127.0.0.1:8435"
    assert (s.snapshots.schedule, s.refresh.schedule) == ("0 2 * * *", "0 */6 * * *")
    assert (s.logging.format, s.logging.level, s.runner.shutdown_timeout) == (
        "json",
        "info",
        timedelta(seconds=25),
    )
    assert s.http.admin_token is None
    assert load_settings({"HOME": "/x"}, isatty=True).logging.format == "console"


def test_environment_wins_over_the_file_and_database_url_is_read(tmp_path: Path) -> None:
    config = tmp_path / "kontod.toml"
    config.write_text('timezone = "Asia/Tokyo"\nlisten = "127.0.0.1:9999"\nlog_level = "debug"\n')
    s = load_settings(
        {
            "KONTOD_CONFIG": str(config),
            "KONTOD_TIMEZONE": "Europe/Paris",
            "DATABASE_URL": "postgresql://u:p@db/konto",
            "STATE_DIRECTORY": "/var/lib/kontod",
        }
    )
    assert (s.runner.timezone, s.http.port, s.logging.level) == ("Europe/Paris", 9999, "debug")
    assert s.database.url == "postgresql://u:p@db/konto"
    assert s.database.state_dir == Path("/var/lib/kontod")


def test_secrets_from_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "admin_token").write_text("tok\n")
    (tmp_path / "database_url").write_text("postgresql://k:pw@db/konto\n")
    s = load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert (s.http.admin_token, s.database.url) == ("tok", "postgresql://k:pw@db/konto")
    assert "tok" not in repr(s)


def test_powens_client_from_the_web_apps_names_or_a_credential(tmp_path: Path) -> None:
    s = load_settings({"POWENS_CLIENT_ID": "web", "POWENS_CLIENT_SECRET": "shh-1"})
    assert (s.refresh.powens_client_id, s.refresh.powens_client_secret) == ("web", "shh-1")
    assert "shh-1" not in repr(s)
    (tmp_path / "powens_client_secret").write_text("shh-2\n")
    s = load_settings(
        {
            "KONTOD_POWENS_CLIENT_ID": "kontod",
            "POWENS_CLIENT_ID": "web",
            "CREDENTIALS_DIRECTORY": str(tmp_path),
        }
    )
    assert (s.refresh.powens_client_id, s.refresh.powens_client_secret) == ("kontod", "shh-2")


def test_durations_and_provider_url() -> None:
    s = load_settings({"KONTOD_STALE_AFTER": "12h", "KONTOD_POWENS_DOMAIN": "konto.biapi.pro"})
    assert s.refresh.stale_after == timedelta(hours=12)
    assert s.refresh.powens_url == "https://konto.biapi.pro/2.0"


BAD = [
    ("KONTOD_TIMEZONE", "Mars/Olympus", "IANA time zone"),
    ("KONTOD_SNAPSHOT_SCHEDULE", "0 25 * * *", "cron expression"),
    ("KONTOD_SNAPSHOT_SCHEDULE", "every day", "cron expression"),
    ("KONTOD_REFRESH_SCHEDULE", "* * *", "5 fields, or 6"),
    ("KONTOD_DATABASE_URL", "mysql://db/konto", "postgresql://"),
    ("KONTOD_DATABASE_URL", "postgresql://u:hunter2@db:port/konto", "postgresql://"),
    ("KONTOD_DATABASE_URL", "postgresql://u:hunter2/x@db:5432/konto", "percent-encoded"),
    ("KONTOD_LISTEN", "localhost", "host:port"),
    ("KONTOD_LISTEN", "127.0.0.1:99999", "between 0 and 65535"),
    ("KONTOD_LOG_FORMAT", "xml", "json, console"),
    ("KONTOD_LOG_LEVEL", "loud", "debug, info"),
    ("KONTOD_SHUTDOWN_TIMEOUT", "-1", "greater than 0"),
    ("KONTOD_SNAPSHOT_BATCH_SIZE", "0", "at least 1"),
    ("KONTOD_SNAPSHOT_WORKERS", "0", "at least 1"),
    ("KONTOD_SNAPSHOT_WORKERS", "17", "at most 16"),
    ("KONTOD_STALE_AFTER", "soon", "7d"),
    ("KONTOD_POWENS_URL", "ftp://bank", "http"),
    ("KONTOD_ADMIN_TOKEN", "   ", "non-empty"),
]


@pytest.mark.parametrize(("var", "value", "accepted"), BAD)
def test_bad_value_is_named_with_what_is_accepted(var: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({var: value})
    assert err.value.setting == var
    assert accepted in str(err.value)


@pytest.mark.parametrize(("var", "value", "accepted"), BAD)
def test_bad_value_exits_2_with_one_line(var: str, value: str, accepted: str) -> None:
    result = kontod("migrate", env={var: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert var in lines[0] and accepted in lines[0]
    assert "hunter2" not in result.stderr


def test_toml_syntax_error_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('timezone = "Europe/Paris"\nlisten = \n')
    result = kontod("run", env={"KONTOD_CONFIG": str(config)})
    assert result.returncode == 2
    assert result.stderr.startswith(f"kontod: invalid KONTOD_CONFIG='{config}': not valid TOML")
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_value_in_the_file_names_the_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "kontod.toml"
    config.write_text('timezone = "Nowhere/Land"\n')
    result = kontod("run", env={"KONTOD_CONFIG": str(config)})
    assert result.returncode == 2
    assert f"timezone in {config}" in result.stderr


def test_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "kontod.toml"
    config.write_text('time_zone = "Europe/Paris"\n')
    with pytest.raises(ConfigError, match="unknown key 'time_zone'"):
        load_settings({"KONTOD_CONFIG": str(config)})


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://kontod:hunter2@db:5432/konto", "postgresql://kontod:***@db:5432/konto"),
        ("postgresql://kontod:hun/ter#2@db/konto", "postgresql://kontod:***@db/konto"),
        ("postgresql://kontod:p@ss@db/konto", "postgresql://kontod:***@db/konto"),
        (
            "postgresql://kontod@db/konto?password=hunter2&sslmode=require",
            "postgresql://kontod@db/konto?password=***&sslmode=require",
        ),
        ("postgresql://kontod@db/konto", "postgresql://kontod@db/konto"),
        ("postgresql+asyncpg://u:hunter2@db/konto", "postgresql+asyncpg://u:***@db/konto"),
        (" postgresql://u:hunter2@db/konto", " postgresql://u:***@db/konto"),
        ("postgresql://me@corp:hunter2@db/konto", "postgresql://me@corp:***@db/konto"),
        ("host=db password = hunter2 dbname=konto", "host=db password = *** dbname=konto"),
        ("postgresql://my user:hunter2@db/konto", "postgresql://my user:***@db/konto"),
        ("postgresql://:hunter2@db/konto", "postgresql://:***@db/konto"),
        ("postgresql://u%20x:hun%40ter2@db/konto", "postgresql://u%20x:***@db/konto"),
        (
            "postgresql://u:hunter2@[2001:db8::1]:5432/konto",
            "postgresql://u:***@[2001:db8::1]:5432/konto",
        ),
        ("postgresql://u@[::1]:5432/konto", "postgresql://u@[::1]:5432/konto"),
        ("postgresql://[::1]/konto?password=hunter2", "postgresql://[::1]/konto?password=***"),
        ("host=db password='hun ter2' dbname=konto", "host=db password=*** dbname=konto"),
        ("host=db password='it\\'s hunter2' user=u", "host=db password=*** user=u"),
    ],
)
def test_redacted_dsn_never_shows_the_password(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown
    assert "hunter2" not in redact_dsn(dsn) and "ter2" not in redact_dsn(dsn)


def test_unreadable_credential_is_a_setting_error(tmp_path: Path) -> None:
    (tmp_path / "admin_token").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="credential admin_token"):
        load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_token_key_and_provider_rate() -> None:
    key = "ab" * 32
    s = load_settings({"HOME": "/x", "DB_ENCRYPTION_KEY": key.upper()}, isatty=False)
    assert s.refresh.db_encryption_key == bytes.fromhex(key)
    assert key not in repr(s) and "db_encryption_key" not in repr(s)
    # kontod's own name wins over the web app's.
    s = load_settings(
        {"HOME": "/x", "KONTOD_DB_ENCRYPTION_KEY": "cd" * 32, "DB_ENCRYPTION_KEY": key},
        isatty=False,
    )
    assert s.refresh.db_encryption_key == bytes.fromhex("cd" * 32)
    assert load_settings({"HOME": "/x"}, isatty=False).refresh.db_encryption_key is None
    assert load_settings({"HOME": "/x"}, isatty=False).providers.rate == 10.0
    assert load_settings({"HOME": "/x", "KONTOD_PROVIDER_RATE": "2.5"}).providers.rate == 2.5
    for bad in ("0", "-1", "fast", "inf"):
        with pytest.raises(ConfigError, match="requests per second"):
            load_settings({"HOME": "/x", "KONTOD_PROVIDER_RATE": bad})
    with pytest.raises(ConfigError) as caught:
        load_settings({"HOME": "/x", "KONTOD_DB_ENCRYPTION_KEY": key[:-1]})
    assert caught.value.setting == "KONTOD_DB_ENCRYPTION_KEY"
    assert key[:-1] not in str(caught.value)


FAULT_BAD = [
    ("KONTOD_LEASE_SECONDS", "4", "at least 5"),
    ("KONTOD_LEASE_SECONDS", "soon", "at least 5"),
    ("KONTOD_LEASE_SECONDS", "inf", "at least 5"),
    ("KONTOD_RETRY_ATTEMPTS", "-1", "whole number of 0 or more"),
    ("KONTOD_RETRY_ATTEMPTS", "three", "whole number of 0 or more"),
    ("KONTOD_RETRY_DELAY", "0", "duration such as"),
    ("KONTOD_RETRY_DELAY", "5 minutes", "duration such as"),
    ("KONTOD_HISTORY_DAYS", "0", "at least 1"),
    ("KONTOD_INSTANCE", "web 1", "letters, digits"),
    ("KONTOD_INSTANCE", "x" * 64, "1 to 63"),
]


@pytest.mark.parametrize(("var", "value", "accepted"), FAULT_BAD)
def test_bad_fault_setting_exits_2_naming_it(var: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({var: value})
    assert (err.value.setting, err.value.value) == (var, value)
    assert accepted in str(err.value)
    result = kontod("migrate", env={var: value})
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert var in line and accepted in line


def test_fault_settings_defaults_and_values() -> None:
    s = load_settings({"HOME": "/x"})
    run = s.runner
    assert (run.lease, run.retry_attempts, run.retry_delay, run.history_days) == (
        timedelta(seconds=30),
        3,
        timedelta(seconds=300),
        90,
    )
    host, pid = run.instance.rsplit(":", 1)
    assert host and pid == str(os.getpid())
    s = load_settings(
        {
            "KONTOD_INSTANCE": "web-1",
            "KONTOD_LEASE_SECONDS": "5",
            "KONTOD_RETRY_ATTEMPTS": "0",
            "KONTOD_RETRY_DELAY": "30s",
            "KONTOD_HISTORY_DAYS": "7",
        }
    )
    run = s.runner
    assert (run.instance, run.lease, run.retry_attempts, run.retry_delay, run.history_days) == (
        "web-1",
        timedelta(seconds=5),
        0,
        timedelta(seconds=30),
        7,
    )


# -- the spec table ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_every_section_field_is_one_setting_hidden_from_repr_when_secret() -> None:
    fields = {
        f"{section.name}.{f.name}": f
        for section in dataclasses.fields(Settings)
        for f in dataclasses.fields(getattr(Settings(), section.name))
    }
    wheres = [spec.where for spec in SETTINGS if spec.where]
    assert sorted(wheres) == sorted(fields), "a field without a setting, or the reverse"
    for spec in SETTINGS:
        if spec.where:
            assert fields[spec.where].repr is not spec.secret, spec.env
    names = [spec.env for spec in SETTINGS] + [a.env for s in SETTINGS for a in s.aliases]
    assert len(names) == len(set(names)), "a name read for two settings"


def test_a_bare_settings_holds_the_defaults_load_settings_gives() -> None:
    # Without the settings computed from the machine (zone, instance, folder, terminal).
    loaded = load_settings({"HOME": "/x", "KONTOD_TIMEZONE": "UTC"}, isatty=False)
    bare = Settings()
    for spec in SETTINGS:
        if (spec.where and spec.computed is None) or spec.env == "KONTOD_TIMEZONE":
            section, attr = spec.section, spec.attr
            assert getattr(getattr(bare, section), attr) == getattr(
                getattr(loaded, section), attr
            ), spec.env


def test_every_setting_is_read_from_the_toml_file_under_its_key(tmp_path: Path) -> None:
    keys, prefixes = toml_keys()
    assert prefixes == ("ping_url_", "suspicious_")
    config = tmp_path / "kontod.toml"
    config.write_text('stale_after = "36h"\nshutdown_timeout = 7\npowens_domain = "b.example"\n')
    s = load_settings({"KONTOD_CONFIG": str(config)})
    assert s.refresh.stale_after == timedelta(hours=36)
    assert s.runner.shutdown_timeout == timedelta(seconds=7)
    assert s.refresh.powens_url == "https://b.example/2.0"
    assert {"database_url", "db_encryption_key", "powens_domain", "listen"} <= keys
    assert "config" not in keys and "ping_url_" not in keys


def test_durations_are_timedeltas_and_one_too_long_is_refused_naming_it() -> None:
    s = load_settings({"KONTOD_SHUTDOWN_TIMEOUT": "1.5", "KONTOD_HTTP_HEADER_TIMEOUT": "1m"})
    assert s.runner.shutdown_timeout == timedelta(seconds=1.5)
    assert s.http.header_timeout == timedelta(minutes=1)
    # More days than a timedelta holds: refused at start, not when the job first runs.
    for var, value in (
        ("KONTOD_STALE_AFTER", "99999999999d"),
        ("KONTOD_SHUTDOWN_TIMEOUT", "1e18"),
    ):
        with pytest.raises(ConfigError) as err:
            load_settings({var: value})
        assert err.value.setting == var


def test_ping_urls_are_secrets_left_out_of_repr() -> None:
    s = load_settings(
        {
            "KONTOD_PING_URL_DAILY_SNAPSHOTS": "https://hc-ping.com/uuid-secret-1",
            "KONTOD_PING_BASE_URL": "https://hc-ping.com/key-secret-2",
        }
    )
    assert s.pings.urls == {"daily-snapshots": "https://hc-ping.com/uuid-secret-1"}
    assert "secret-1" not in repr(s) and "secret-2" not in repr(s)


def test_the_settings_table_of_the_docs_is_made_from_the_spec() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert with_settings_table(page) == page, "run `make settings-table`"
    intro = page[: page.index(TABLE_BEGIN)]
    for credential in CREDENTIALS.values():
        assert f"`$CREDENTIALS_DIRECTORY/{credential}`" in intro, credential


def test_every_setting_is_documented_once_in_the_docs() -> None:
    """One row per setting in the configuration page, and no other page with a table row of its
    own for it (another page may name a setting, not document it again)."""
    docs = ROOT / "docs"
    for spec in SETTINGS:
        # A per-job setting is shown with <JOB> after its prefix.
        row = f"| `{spec.env}<JOB>`" if spec.per_job else f"| `{spec.env}`"
        rows = {
            page.name: sum(line.startswith(row) for line in page.read_text().splitlines())
            for page in docs.glob("*.md")
        }
        assert {page: n for page, n in rows.items() if n} == {"configuration.md": 1}, spec.env
