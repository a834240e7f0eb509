"""The shipped systemd unit: accepted by systemd-analyze, hardened to an exposure of at most 2.0,
and in step with kontod's own settings."""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from kontod.config import Settings
from tests.programs import kontod_script, require_program

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "kontod.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "kontod.env.example"
MAX_EXPOSURE = 2.0


def directives(unit_text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, keeping repeated keys (systemd allows them)."""
    found: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for line in unit_text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found[section][key.strip()].append(value.strip())
    return found


def seconds(span: str) -> float:
    """A systemd time span made of the units this unit uses (45s, 3min, 1min 30s)."""
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit or "s"]
    return total


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return directives(UNIT.read_text())


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_program("systemd-analyze", "systemd")
    # verify insists that ExecStart= exists: point it at this environment's kontod instead
    # of /opt/kontod, keeping the rest of the unit as shipped.
    original = "ExecStart=/opt/kontod/bin/kontod run"
    text = UNIT.read_text()
    assert text.count(original) == 1, f"{UNIT} should contain exactly one {original!r}"
    copy = tmp_path / "kontod.service"
    copy.write_text(text.replace(original, f"ExecStart={kontod_script()} run"))

    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # verify also reports on units of the host that ours pulls in; only ours must be clean.
    assert "kontod.service" not in output, output


def test_exposure_is_at_most_2(tmp_path: Path) -> None:
    analyze = require_program("systemd-analyze", "systemd")

    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    m = re.search(r"Overall exposure level for kontod\.service: (\d+\.\d+)", output)
    assert m, f"no exposure score in the output of systemd-analyze security:\n{output}"
    assert float(m.group(1)) <= MAX_EXPOSURE, output


def test_notify_watchdog_and_restart(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["on-failure"]
    assert seconds(service["WatchdogSec"][0]) > 0


def test_stop_timeout_outlasts_kontods_own(unit: dict[str, dict[str, list[str]]]) -> None:
    stop_after = seconds(unit["Service"]["TimeoutStopSec"][0])
    # kontod must get to stop its embedded PostgreSQL after waiting for the running job.
    assert stop_after >= Settings().runner.shutdown_timeout.total_seconds() + 10


def test_credentials_are_the_ones_kontod_reads(unit: dict[str, dict[str, list[str]]]) -> None:
    from kontod.config import CREDENTIALS  # the names config.py looks for

    loaded = {value.split(":", 1)[0] for value in unit["Service"]["LoadCredential"]}
    assert loaded == set(CREDENTIALS.values())
    for value in unit["Service"]["LoadCredential"]:
        source = value.split(":", 1)[1]
        # An absolute path would make a missing secret fail the start; the embedded database
        # mode needs none.
        assert not source.startswith("/"), value


def test_env_example_lists_every_setting() -> None:
    config_source = (ROOT / "kontod" / "config.py").read_text()
    settings = set(re.findall(r'"(KONTOD_[A-Z_]+)"', config_source))
    example = ENV_EXAMPLE.read_text()
    listed = set(re.findall(r"^#?\s*(KONTOD_[A-Z_]+)=", example, flags=re.MULTILINE))

    # A name ending in "_" is the prefix of per-job settings (KONTOD_PING_URL_<JOB>): the
    # example shows it with a job's name.
    prefixes = {name for name in settings if name.endswith("_")}
    settings -= prefixes
    for prefix in prefixes:
        shown = {name for name in listed if name.startswith(prefix)}
        assert shown, f"{prefix}<JOB> missing from {ENV_EXAMPLE.name}"
        listed -= shown

    assert settings, "no KONTOD_* names found in kontod/config.py"
    assert settings - listed == set(), f"missing from {ENV_EXAMPLE.name}"
    assert listed - settings == set(), f"{ENV_EXAMPLE.name} lists settings kontod does not read"


def size(text: str) -> int:
    """A systemd byte size (512M, 1G) in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def test_files_memory_and_tasks_are_bounded(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    # kontod keeps its HTTP connections to half the file limit: the default cap must fit.
    [nofile] = service["LimitNOFILE"]
    assert int(nofile) >= 2 * Settings().http.max_connections
    [high], [hard] = service["MemoryHigh"], service["MemoryMax"]
    assert 150 << 20 < size(high) < size(hard)
    [tasks] = service["TasksMax"]
    assert int(tasks) > 100 + 32  # PostgreSQL's sessions and kontod's thread pool


def test_env_example_shows_each_default_and_only_values_kontod_accepts() -> None:
    from kontod.config import SETTINGS

    shown = re.findall(r"^#?\s*(KONTOD_[A-Z_]+)=(.*)$", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    for spec in SETTINGS:
        names = [(spec.env, spec.parse)] + [(a.env, a.parse or spec.parse) for a in spec.aliases]
        for name, parse in names:
            if not name.startswith("KONTOD_"):
                continue  # the web app's own names (DATABASE_URL) are not shown
            # A per-job setting is shown with a job's name after its prefix.
            values = [
                v.strip('"') for k, v in shown if k == name or (spec.per_job and k.startswith(name))
            ]
            assert values, f"{name} missing from {ENV_EXAMPLE.name}"
            for value in filter(None, values):
                parse(value)  # ValueError: the example shows a value kontod refuses
            if spec.default and name == spec.env:
                assert [parse(v) for v in values] == [parse(spec.default)], name


CLI = ROOT / "deploy" / "systemd" / "kontod-cli"


def _kontod_cli_arguments(tmp_path: Path, *command: str) -> list[str]:
    """What deploy/systemd/kontod-cli hands to systemd-run, with a stand-in systemd-run on PATH
    that writes its arguments, one per line, instead of starting anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "arguments"
    fake = bin_dir / "systemd-run"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {seen}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "KONTOD_UNIT_FILE": str(UNIT)}
    subprocess.run([str(CLI), *command], env=env, check=True, timeout=30)
    return seen.read_text().splitlines()


def test_kontod_cli_runs_a_command_as_the_service_with_its_settings_and_credentials(
    tmp_path: Path, unit: dict[str, dict[str, list[str]]]
) -> None:
    args = _kontod_cli_arguments(tmp_path, "runs", "show", "42")
    service = unit["Service"]
    properties = [a.removeprefix("--property=") for a in args if a.startswith("--property=")]
    # The service's own user (DynamicUser, named like the unit: the same UID), state, settings
    # and every credential it loads, in its order.
    assert "DynamicUser=yes" in properties and "User=kontod" in properties
    assert f"StateDirectory={service['StateDirectory'][0]}" in properties
    assert f"EnvironmentFile={service['EnvironmentFile'][0]}" in properties
    loaded = [
        p.removeprefix("LoadCredential=") for p in properties if p.startswith("LoadCredential")
    ]
    assert loaded == service["LoadCredential"]
    # The running service keeps its runtime directory when the command ends.
    assert "RuntimeDirectoryPreserve=yes" in properties
    runtime = next(e for e in service["Environment"] if e.startswith("XDG_RUNTIME_DIR="))
    assert runtime.replace("%t", "/run") in [a.removeprefix("--setenv=") for a in args]
    assert {"--pty", "--wait", "--collect"} <= set(args)
    assert args[-4:] == [service["ExecStart"][0].split()[0], "runs", "show", "42"]


def test_kontod_cli_properties_are_ones_systemd_accepts(tmp_path: Path) -> None:
    """The transient service's properties, written as a unit, pass systemd-analyze verify."""
    analyze = require_program("systemd-analyze", "systemd")
    args = _kontod_cli_arguments(tmp_path, "status")
    lines = [a.removeprefix("--property=") for a in args if a.startswith("--property=")]
    lines += [
        "Environment=" + a.removeprefix("--setenv=") for a in args if a.startswith("--setenv=")
    ]
    unit_file = tmp_path / "kontod-cli-check.service"
    unit_file.write_text(
        "[Service]\nType=exec\nExecStart=" + f"{kontod_script()} status\n" + "\n".join(lines) + "\n"
    )
    done = subprocess.run(
        [analyze, "verify", str(unit_file)], capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "kontod-cli-check.service" not in output, output
