"""The Dockerfile and compose.yaml, checked without a container runtime.

No container can run on the machines these tests were written on (the sandbox refuses the
runtime's rlimit calls), so the image is never built here. What is checked instead: hadolint
finds nothing in the Dockerfile; compose.yaml is valid against the Compose Specification's
schema (the copy check-jsonschema ships); every file compose mounts exists; the image runs the
unit's command line; the monitoring services point at each other; and the image's healthcheck
command, run here, tells a live kontod from a stopped one.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.helpers import quiet_schedule
from tests.integration.test_lifecycle import free_port, health
from tests.programs import kontod_script, require_program

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
UNIT = REPO / "deploy" / "systemd" / "kontod.service"


def dev_tool(name: str) -> str:
    """A program of the dev extra, beside this Python; fails with how to install it."""
    program = Path(sys.executable).parent / name
    if not program.is_file():
        pytest.fail(
            f"{name} is missing from {program.parent}; install the dev extra: "
            f"`{sys.executable} -m pip install -e '.[dev]'`",
            pytrace=False,
        )
    return str(program)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """A Dockerfile's instructions, continuation lines joined, comments left out."""
    found: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        found.append(Instruction(keyword.upper(), " ".join(args.split())))
        pending = ""
    return found


def final_stage() -> list[Instruction]:
    """The instructions of the image's last stage, its FROM first."""
    steps = instructions(DOCKERFILE.read_text())
    last = max(i for i, step in enumerate(steps) if step.keyword == "FROM")
    return steps[last:]


def only(stage: list[Instruction], keyword: str) -> str:
    """The arguments of the one ``keyword`` instruction of ``stage``."""
    matching = [step.args for step in stage if step.keyword == keyword]
    assert len(matching) == 1, f"{keyword}: {matching}"
    return matching[0]


def exec_start() -> list[str]:
    lines = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].removeprefix("ExecStart="))


def healthcheck_command() -> list[str]:
    """The exec form the image's HEALTHCHECK runs."""
    args = only(final_stage(), "HEALTHCHECK")
    _, cmd, form = args.partition(" CMD ")
    assert cmd, f"HEALTHCHECK without CMD: {args}"
    command: list[str] = json.loads(form)
    return command


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = YAML(typ="safe").load(COMPOSE.read_text())
    return loaded


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    done = subprocess.run(
        [dev_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_hadolint_speaks_up_on_a_careless_dockerfile(tmp_path: Path) -> None:
    """The clean result above comes from hadolint reading the file, not from a silent tool."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install kontod\n")
    done = subprocess.run(
        [dev_tool("hadolint"), str(careless)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "DL3007" in done.stdout and "DL3013" in done.stdout, done.stdout


def test_the_image_runs_the_units_command_line() -> None:
    stage = final_stage()
    entrypoint: list[str] = json.loads(only(stage, "ENTRYPOINT"))
    cmd: list[str] = json.loads(only(stage, "CMD"))
    assert entrypoint + cmd == exec_start() == ["/opt/kontod/bin/kontod", "run"]


def test_the_image_stops_with_sigterm_as_a_user_without_rights() -> None:
    stage = final_stage()
    assert only(stage, "FROM").split()[0].endswith("-slim")
    assert only(stage, "STOPSIGNAL") == "SIGTERM"
    user = only(stage, "USER").split(":")[0]
    assert user not in ("root", "0"), user
    assert "/health" in " ".join(healthcheck_command())
    # Nothing of the dev extra, and no build tools, in the image kontod runs from.
    installed = " ".join(step.args for step in stage if step.keyword == "RUN")
    for tool in ("[dev]", "pytest", "ruff", "mypy", "gcc", "build-essential"):
        assert tool not in installed, tool


def test_the_healthcheck_command_tells_a_live_kontod_from_a_stopped_one(
    dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KONTOD_", "NOTIFY_", "WATCHDOG_"))
        and key not in ("DATABASE_URL", "CREDENTIALS_DIRECTORY")
    }
    env |= {
        "KONTOD_DATABASE_URL": dsn,
        "KONTOD_LISTEN": f"127.0.0.1:{port}",
        "KONTOD_STATE_DIR": str(tmp_path / "state"),
        "KONTOD_TIMEZONE": "UTC",
        "KONTOD_SNAPSHOT_SCHEDULE": quiet_schedule(),
        "KONTOD_REFRESH_SCHEDULE": quiet_schedule(),
    }
    # The image's Python is this one here; the address is the image's, with this test's port.
    check = [sys.executable, *healthcheck_command()[1:]]
    check_env = env | {"KONTOD_LISTEN": f"0.0.0.0:{port}"}
    log = tmp_path / "kontod.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [kontod_script(), "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while health(port) != 200:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        live = subprocess.run(check, env=check_env, capture_output=True, text=True, timeout=30)
        assert live.returncode == 0, live.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
    stopped = subprocess.run(check, env=check_env, capture_output=True, text=True, timeout=30)
    assert stopped.returncode != 0


def test_compose_follows_the_compose_specification(tmp_path: Path) -> None:
    checker = dev_tool("check-jsonschema")
    schema = ["--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run(
        [checker, *schema, str(COMPOSE)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The same file with one key misspelt is refused: the schema is really applied.
    misspelt = tmp_path / "compose.yaml"
    misspelt.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_perod:"))
    done = subprocess.run(
        [checker, *schema, str(misspelt)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 and "stop_grace_perod" in done.stdout, done.stdout


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target -> host path of a service's bind mounts (short syntax, as compose.yaml writes
    them; a bare name is a named volume)."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"long volume syntax is not checked here: {volume}"
        source, target = volume.split(":")[:2]
        if source.startswith(("./", "/")):
            mounts[target] = source
    return mounts


def test_every_file_compose_mounts_is_in_the_repository() -> None:
    services = compose()["services"]
    checked = 0
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert (REPO / source).is_file(), f"{name}: {source} (for {target}) is missing"
            checked += 1
        if "build" in service:
            assert (REPO / service["build"] / "Dockerfile").is_file(), name
    assert checked >= 6, checked  # prometheus 2, alertmanager 1, grafana 3


def test_the_monitoring_services_point_at_each_other(tmp_path: Path) -> None:
    services = compose()["services"]
    yaml = YAML(typ="safe")
    # Prometheus scrapes kontod on the port the image listens on and loads the rules mounted
    # beside its configuration; promtool reads both laid out as the container sees them.
    prom_mounts = bind_mounts(services["prometheus"])
    config_target = PurePosixPath("/etc/prometheus/prometheus.yml")
    config = yaml.load((REPO / prom_mounts[str(config_target)]).read_text())
    image_port = only(final_stage(), "ENV").split("KONTOD_LISTEN=")[1].split()[0].split(":")[1]
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == [f"kontod:{image_port}"]
    alertmanager = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanager == ["alertmanager:9093"]
    assert "alertmanager" in services
    laid_out = tmp_path / "etc-prometheus"
    laid_out.mkdir()
    for target, source in prom_mounts.items():
        assert PurePosixPath(target).parent == config_target.parent, target
        shutil.copy(REPO / source, laid_out / PurePosixPath(target).name)
    promtool = require_program("promtool", "prometheus")
    done = subprocess.run(
        [promtool, "check", "config", str(laid_out / config_target.name)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "rules found" in done.stdout, done.stdout

    # Grafana: its data source is the Prometheus service, and the dashboard file is mounted in
    # the folder its dashboard provider reads.
    grafana = bind_mounts(services["grafana"])
    by_folder = {str(PurePosixPath(t).parent): s for t, s in grafana.items()}
    datasources = yaml.load((REPO / by_folder["/etc/grafana/provisioning/datasources"]).read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.load((REPO / by_folder["/etc/grafana/provisioning/dashboards"]).read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert by_folder[folder] == "./deploy/grafana/kontod-dashboard.json"
