"""The pages as pure functions: which clients get HTML, how high a bar is, what a job's status
cell and a run's page say."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from kontod.ops import run_page, status_page
from kontod.ops.board import JobView
from kontod.ops.health import Verdict
from kontod.ops.http import prefers_html
from kontod.ops.suspicion import Suspicion
from kontod.scheduler.contract import JobSpec, RunContext
from kontod.scheduler.pauses import Pause
from kontod.scheduler.runlist import Run, RunDetail
from kontod.scheduler.runs import JobStats

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        # Chromium and Firefox opening a page.
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8".upper(), True),
        ("text/html", True),
        ("text/*, application/json;q=0.5", True),
        # curl, aiohttp, requests, no header at all: JSON.
        ("*/*", False),
        ("", False),
        ("application/json", False),
        ("application/json, text/html", False),  # a tie goes to JSON
        ("text/html;q=0.5, application/json", False),
        ("text/html;q=zero, */*", False),
        ("text/plain", False),
    ],
)
def test_only_a_client_that_ranks_html_first_gets_the_page(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


def run(
    run_id: int,
    status: str,
    seconds: float,
    error: str | None = None,
    requested_by: str | None = None,
    reason: str | None = None,
) -> Run:
    started = NOW - timedelta(minutes=run_id)
    return Run(
        id=run_id,
        job="refresh-stale-connections",
        trigger="schedule",
        scheduled_for=started,
        attempt=1,
        started_at=started,
        finished_at=None if status == "running" else started + timedelta(seconds=seconds),
        status=status,
        error=error,
        counts={"users": 3},
        instance="kontod-a",
        requested_by=requested_by,
        reason=reason,
    )


@pytest.mark.parametrize(
    ("status", "seconds", "height"),
    [
        ("success", 100, status_page.CHART_H),
        ("success", 50, status_page.CHART_H / 2),
        ("success", 0.01, 2.0),
        # A failure is never a sliver, however fast it failed.
        ("error", 0.01, status_page.FAILED_MIN_H),
        ("timeout", 0.5, status_page.FAILED_MIN_H),
        ("interrupted", 90, status_page.CHART_H * 0.9),
    ],
)
def test_a_failed_run_is_never_a_sliver(status: str, seconds: float, height: float) -> None:
    assert status_page.bar_height(run(1, status, seconds), 100.0, NOW) == pytest.approx(height)


def view(
    runs: list[Run],
    *,
    healthy: bool = True,
    reason: str | None = None,
    pause: Pause | None = None,
    suspicion: Suspicion | None = None,
) -> JobView:
    async def body(_: RunContext) -> None:
        return None

    spec = JobSpec(
        name="refresh-stale-connections",
        schedule="0 2 * * *",
        body=body,
        grace=timedelta(hours=1),
        max_runtime=timedelta(minutes=5),
        catchup_window=timedelta(hours=20),
    )
    return JobView(
        spec=spec,
        stats=JobStats(last_status=runs[0].status if runs else None),
        verdict=Verdict(healthy, reason, NOW, NOW + timedelta(days=1)),
        pause=pause,
        suspicion=suspicion or Suspicion(),
        progress=None,
        runs=runs,
    )


def test_a_paused_job_says_paused_and_how_its_last_run_ended() -> None:
    pause = Pause("refresh-stale-connections", "bank maintenance", "cli:ops@host", NOW, None)
    failed = run(7, "error", 0.2, "PowensError: 503 <html>down</html>")
    cell = status_page._status(view([failed, run(8, "success", 40)], pause=pause))
    assert cell.startswith('<span class="paused">paused</span>')
    assert 'last run: <span class="s-error">error</span>' in cell
    assert "PowensError: 503 &lt;html&gt;down&lt;/html&gt;" in cell
    assert '<a class="muted" href="/runs/7">run 7: error</a>' in cell
    assert "healthy" not in cell


def test_an_unhealthy_job_shows_the_error_of_its_last_finished_run() -> None:
    long_error = "ConnectionError: " + "x" * 1000
    # A retry runs after the failure: the failure is still what the verdict is about.
    runs = [run(9, "running", 0), run(8, "timeout", 60, long_error), run(7, "error", 1, "older")]
    cell = status_page._status(view(runs, healthy=False, reason="attempt 2 is running"))
    assert '<span class="bad">unhealthy</span>' in cell and "attempt 2 is running" in cell
    shown = "ConnectionError: " + "x" * (status_page.ERROR_SHOWN - 17) + "…"
    assert f'<pre class="error">{shown}</pre>' in cell
    assert 'href="/runs/8"' in cell and "older" not in cell


def test_a_healthy_job_shows_no_old_error_and_a_suspicious_run_links_to_it() -> None:
    runs = [run(9, "success", 3), run(8, "error", 1, "old news")]
    cell = status_page._status(view(runs))
    assert cell.startswith('<span class="ok">healthy</span>') and "old news" not in cell
    suspicious = Suspicion(True, "took 3.0 s, under 0.2 of the usual 40.0 s", run_id=9)
    cell = status_page._status(view(runs, suspicion=suspicious))
    assert "suspicious: took 3.0 s, under 0.2 of the usual 40.0 s" in cell
    assert '<a class="muted" href="/runs/9">run 9</a>' in cell


def test_the_page_reloads_itself_and_every_bar_links_to_its_run() -> None:
    runs = [run(i, "error" if i == 3 else "success", 10 * i) for i in range(5, 0, -1)]
    page = status_page.render([view(runs)], PARIS, NOW)
    assert f'<meta http-equiv="refresh" content="{status_page.REFRESH_S}">' in page
    assert [f'<a href="/runs/{i}">' in page for i in range(1, 6)] == [True] * 5
    assert page.count('<rect class="bar"') == 5
    assert '<a class="muted" href="/runs/5">last run</a>' in page


def detail(status: str, error: str | None = None) -> RunDetail:
    base = run(4, status, 12.5, error, requested_by="cli:ops@host", reason="after <b>it</b>")
    return RunDetail(
        **{k: getattr(base, k) for k in base.__dataclass_fields__},
        heartbeat_at=NOW - timedelta(seconds=5),
        lease_until=NOW + timedelta(seconds=25),
    )


def test_a_run_page_shows_everything_and_a_running_one_reloads() -> None:
    page = run_page.render(detail("error", "ValueError: <oops>"), None, PARIS, NOW)
    assert "<dt>requested by</dt><dd>cli:ops@host</dd>" in page
    assert "<dt>reason</dt><dd>after &lt;b&gt;it&lt;/b&gt;</dd>" in page
    assert "<dt>attempt</dt><dd>1</dd>" in page and "<dt>trigger</dt><dd>schedule</dd>" in page
    assert "<dt>instance</dt><dd>kontod-a</dd>" in page
    assert "<dt>duration</dt><dd>12.5 s</dd>" in page
    assert "<dt>started</dt><dd>2026-03-02 09:56:00 CET</dd>" in page
    assert '<pre class="error">ValueError: &lt;oops&gt;</pre>' in page
    assert '<td>users</td><td class="n">3</td>' in page
    assert 'http-equiv="refresh"' not in page and "lease until" not in page
    page = run_page.render(detail("running"), None, PARIS, NOW)
    assert '<meta http-equiv="refresh"' in page and "<dt>lease until</dt>" in page
    assert "<dt>duration</dt><dd>240.0 s so far</dd>" in page
    verdict = Suspicion(True, "found 0 users", run_id=4)
    page = run_page.render(detail("success"), verdict, PARIS, NOW)
    assert '<h2>suspicious</h2>\n<p class="warn">found 0 users</p>' in page
