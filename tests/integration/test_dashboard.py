"""The Grafana dashboard: provisionable as a file, and every query asks for kontod's metrics.

``check_queries`` sends every panel query to a Prometheus; the end-to-end test calls it with a
Prometheus that scrapes a running kontod, where every query must return a series.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import prom

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "kontod-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Every series kontod exports (the metric contract), the process collector's, and Prometheus'
# own `up`. A panel may use no other.
_HISTOGRAMS = ("kontod_job_duration_seconds", "kontod_provider_request_duration_seconds")
KNOWN_METRICS = frozenset(
    {
        "kontod_job_runs_total",
        "kontod_job_errors_total",
        "kontod_job_last_success_timestamp_seconds",
        "kontod_job_last_run_finished_timestamp_seconds",
        "kontod_job_last_run_success",
        "kontod_job_running",
        "kontod_job_running_since_timestamp_seconds",
        "kontod_job_last_scheduled_timestamp_seconds",
        "kontod_job_next_scheduled_timestamp_seconds",
        "kontod_job_grace_seconds",
        "kontod_job_max_runtime_seconds",
        "kontod_job_registered_timestamp_seconds",
        "kontod_job_configured",
        "kontod_job_healthy",
        "kontod_job_items_total",
        "kontod_job_last_run_counts",
        "kontod_job_ticks_skipped_total",
        "kontod_snapshot_latest_date_timestamp_seconds",
        "kontod_provider_requests_total",
        "kontod_provider_connections",
        "kontod_refresh_stale_accounts",
        "kontod_estimation_failed_assets",
        "kontod_estimation_sales_used",
        "kontod_estimation_low_price_m2",
        "kontod_estimation_high_price_m2",
        "kontod_estimation_latest_timestamp_seconds",
        "kontod_build_info",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        "up",
    }
    | {f"{h}_{suffix}" for h in _HISTOGRAMS for suffix in ("bucket", "sum", "count")}
)

# What the issue asks the dashboard to show, as the metric each topic needs.
REQUIRED_METRICS = frozenset(
    {
        "kontod_job_last_run_success",  # last status
        "kontod_job_last_success_timestamp_seconds",  # time since last success
        "kontod_job_next_scheduled_timestamp_seconds",  # next run
        "kontod_job_runs_total",
        "kontod_job_errors_total",
        "kontod_job_duration_seconds_bucket",
        "kontod_job_items_total",
        "kontod_job_last_run_counts",  # stale accounts
        "kontod_provider_requests_total",
        "kontod_provider_request_duration_seconds_bucket",
        "kontod_provider_connections",  # connections by state
        "kontod_refresh_stale_accounts",  # stale accounts by reason
        "kontod_estimation_failed_assets",  # property estimations
        "kontod_estimation_sales_used",
        "kontod_estimation_latest_timestamp_seconds",
        "up",
        "process_resident_memory_bytes",
    }
)

# What Grafana puts in place of its variables, for sending a query to Prometheus directly.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}

_PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "by", "without"}
)
_MODIFIER = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panels(panel)


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, target) for every query target, where = "panel title / refId"."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"{panel.get('title')!r} / {target.get('refId')}", target


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _MODIFIER.sub(" ", text)  # by (...), on (...), group_left (...)
    names = set()
    for m in _IDENT.finditer(text):
        if m.start() > 0 and text[m.start() - 1] in "$0123456789.":
            continue  # a Grafana variable, or a number such as 1e3
        follows = text[m.end() :].lstrip()
        if follows.startswith("(") or m.group() in _PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group())
    return names


def as_prometheus_query(expr: str) -> str:
    """The expression with Grafana's interval variables replaced by fixed durations."""

    def value(m: re.Match[str]) -> str:
        return GRAFANA_VARIABLES[m.group(1) or m.group(2)]

    names = "|".join(sorted(GRAFANA_VARIABLES, key=len, reverse=True))
    return re.sub(rf"\$\{{({names})\}}|\$({names})\b", value, expr)


async def check_queries(
    base_url: str,
    dashboard: dict[str, Any] | None = None,
    *,
    require_series: bool = True,
) -> list[str]:
    """Send every panel query to the Prometheus at ``base_url``; return what went wrong.

    A query fails when Prometheus rejects it or, with ``require_series``, when it returns no
    series. An empty list means every query is fine.
    """
    dashboard = load_dashboard() if dashboard is None else dashboard
    failures: list[str] = []
    async with aiohttp.ClientSession() as session:
        for where, target in queries(dashboard):
            query = as_prometheus_query(target["expr"])
            async with session.get(
                f"{base_url.rstrip('/')}/api/v1/query", params={"query": query}
            ) as resp:
                body = await resp.json()
            if body.get("status") != "success":
                failures.append(f"{where}: {query}: {body.get('error', body)}")
            elif require_series and not body["data"]["result"]:
                failures.append(f"{where}: {query}: no series")
    return failures


# Static checks.


def test_dashboard_is_provisionable_as_a_file() -> None:
    text = DASHBOARD.read_text()
    dashboard = load_dashboard()
    assert dashboard["uid"] == "kontod-overview"
    assert dashboard["id"] is None
    assert "__inputs" not in dashboard
    assert "${DS_" not in text, "import-only data source inputs break file provisioning"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    dashboard = load_dashboard()
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    for panel in panels(dashboard):
        title = panel.get("title")
        assert panel.get("datasource") == DATASOURCE, title
        assert panel.get("targets"), f"{title!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{title!r} repeats a refId: {refs}"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, (title, target["refId"])
            assert target.get("expr", "").strip(), (title, target["refId"])


def test_queries_use_only_metrics_kontod_exports() -> None:
    used: set[str] = set()
    for where, target in queries(load_dashboard()):
        names = metric_names(target["expr"])
        assert names, f"{where}: no metric found in {target['expr']!r}"
        unknown = names - KNOWN_METRICS
        assert not unknown, f"{where}: {sorted(unknown)} are not metrics kontod exports"
        used |= names
    missing = REQUIRED_METRICS - used
    assert not missing, f"no panel shows {sorted(missing)}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('up{job="kontod"} == 0', {"up"}),
        (
            "max by (job_name) (increase(kontod_job_runs_total[$__interval]))",
            {"kontod_job_runs_total"},
        ),
        (
            "histogram_quantile(0.9, sum by (le) (rate(a_bucket[${__rate_interval}])))",
            {"a_bucket"},
        ),
        ("time() - max without (instance) (a) > 1e3", {"a"}),
        ("a - on (job) group_left () b offset 1h unless c", {"a", "b", "c"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_grafana_variables_become_durations() -> None:
    assert (
        as_prometheus_query("rate(a[$__rate_interval]) + increase(b[${__range}]) + c[$__interval]")
        == "rate(a[1m]) + increase(b[1h]) + c[1m]"
    )


# Against a real Prometheus.


async def test_every_query_parses_in_prometheus() -> None:
    async with prom.prometheus() as p:
        assert await check_queries(p.url, require_series=False) == []


async def test_check_queries_reports_bad_and_empty_queries() -> None:
    dashboard = {
        "panels": [
            {
                "title": "t",
                "targets": [
                    {"refId": "A", "expr": "sum by (job) (up"},
                    {"refId": "B", "expr": "kontod_nothing_like_this"},
                    {"refId": "C", "expr": "vector(1)"},
                ],
            }
        ]
    }
    async with prom.prometheus() as p:
        failures = await check_queries(p.url, dashboard)
    assert len(failures) == 2, failures
    assert failures[0].startswith("'t' / A: sum by (job) (up: ")
    assert failures[1] == "'t' / B: kontod_nothing_like_this: no series"
