"""alerts.yml: valid for promtool, its unit tests pass, and every alert is complete and tested."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

from tests import prom
from tests.programs import require_program

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "alerts.yml"
RULE_TESTS = sorted((ROOT / "tests" / "rules").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "docs/runbook.md#"
SEVERITIES = {"critical", "warning"}
# The deploy config scrapes every 30 s; a rule built on absent() must wait for two scrapes.
SCRAPE_INTERVAL_S = 30


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)\s*$", ALERTS.read_text(), re.MULTILINE)


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


async def test_promtool_checks_the_rules() -> None:
    promtool = require_program("promtool", "prometheus")
    code, out = await _run(promtool, "check", "rules", str(ALERTS))
    assert code == 0, out
    assert f"SUCCESS: {len(alert_names())} rules found" in out, out


async def test_rule_unit_tests_pass() -> None:
    promtool = require_program("promtool", "prometheus")
    assert RULE_TESTS, "no promtool test file in tests/rules"
    # One promtool per file, side by side: each one replays days of samples.
    results = await asyncio.gather(
        *(_run(promtool, "test", "rules", str(path)) for path in RULE_TESTS)
    )
    failed = [out for code, out in results if code != 0]
    assert not failed, "\n".join(failed)


def alert_test_cases(text: str) -> Iterator[tuple[str, str]]:
    """(alertname, body) of every alert test case in a promtool test file.

    A case starts at a "- alertname:" line and holds the lines indented deeper than it.
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)- alertname:\s*(\S+)", line)
        if not m:
            continue
        indent = len(m.group(1))
        body = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        yield m.group(2), "\n".join(body)


def test_every_alert_fires_and_stays_silent_in_a_unit_test() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for name, body in alert_test_cases(path.read_text()):
            # A case expects the alert to fire when it lists exp_alerts, silence otherwise.
            (fires if "exp_alerts:" in body else silent).add(name)
    names = set(alert_names())
    assert names - fires == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent"


async def test_deploy_configs_are_valid() -> None:
    promtool = require_program("promtool", "prometheus")
    amtool = require_program("amtool", "prometheus-alertmanager")
    code, out = await _run(promtool, "check", "config", "deploy/prometheus/prometheus.yml")
    assert code == 0, out
    assert "1 rule files found" in out, out
    code, out = await _run(amtool, "check-config", "deploy/alertmanager/alertmanager.yml")
    assert code == 0, out


async def test_every_alert_is_complete_once_loaded_in_prometheus() -> None:
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    async with prom.prometheus(rule_files=[ALERTS]) as p:
        rules = await p.rules()

        async def evaluated() -> bool:
            nonlocal rules
            rules = await p.rules()
            return all(r["health"] != "unknown" for r in rules)

        await prom.wait_until(evaluated, timeout=20, what="every rule evaluated once")

    alerts = [r for r in rules if r["type"] == "alerting"]
    assert sorted(r["name"] for r in alerts) == sorted(alert_names())
    for rule in alerts:
        name = rule["name"]
        assert rule["group"] == "kontod", name
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["duration"] >= 60, f"{name} has no `for` of at least a minute"
        if "absent(" in rule["query"]:
            assert rule["duration"] >= 2 * SCRAPE_INTERVAL_S, name
        severity = rule["labels"].get("severity", "")
        # A templated severity must end in one of the known values whatever it is given.
        outcomes = set(re.findall(r"\}\}(\w+)\{\{", severity)) or {severity}
        assert outcomes <= SEVERITIES, (name, severity)
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        url = annotations.get("runbook_url", "")
        assert url.startswith(RUNBOOK_URL), (name, url)
        anchor = url.removeprefix(RUNBOOK_URL)
        assert anchor == name.lower(), (name, url)
        assert anchor in anchors, f"docs/runbook.md has no section for {name}"
