"""The status page at /, rendered by a real kontod and opened in a real headless Chromium.

Chromium is driven over its DevTools protocol (aiohttp's websocket client), at 1280 px and as
a 390 px phone: the page must load without a console error, a failed request or a blocked
asset, show both jobs, their bars and the error of a failed run, fit a phone's width, reload
itself, and lead from a bar, tapped, to its run's page. Screenshots are saved under
``artifacts/`` for a person to look at (a CI artefact).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from kontod.config import Settings
from kontod.demo.rates_sandbox import RateSandbox
from kontod.demo.rates_sandbox import urls as rate_urls
from kontod.jobs import declare_jobs
from kontod.ops import status_page
from kontod.ops.board import Board, JobView, Progress
from kontod.ops.health import Verdict
from kontod.ops.suspicion import Suspicion
from kontod.providers.powens import Observer
from kontod.scheduler import pauses
from kontod.scheduler.runner import Started
from kontod.scheduler.runs import JobStats
from tests.daemon_harness import running_daemon, settings_for
from tests.helpers import PARIS, add_user, spec, wait_for
from tests.integration.test_http import get
from tests.programs import require_program
from tests.sandbox_helpers import Bank

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
ERROR = "PowensError: 503 <html>Service Unavailable</html> & try later"
# After the manual runs: a fast failure of the paused job, the newest of its runs.
FAILED_SQL = """
INSERT INTO kontod_runs (job, trigger, started_at, finished_at, status, error, counts, instance,
                         lease_until, requested_by, request_reason)
VALUES ('refresh-stale-connections', 'manual', now(), now() + interval '0.3 seconds', 'error',
        $1, '{"users": 3, "items_failed": 2}', 'kontod-earlier', now(), 'cli:ops@host',
        'after the bank fix')
RETURNING id
"""

# 30 earlier runs of each job, a few of them failed, durations varying from run to run.
HISTORY_SQL = """
INSERT INTO kontod_runs (job, trigger, scheduled_for, started_at, finished_at, status, error,
                         counts, instance, lease_until)
SELECT j.name, 'schedule', t, t,
       t + make_interval(secs => 40 + 30 * sin(n) + (CASE WHEN n % 9 = 4 THEN 80 ELSE 0 END)),
       CASE WHEN n % 11 = 7 THEN 'error' WHEN n % 13 = 5 THEN 'timeout' ELSE 'success' END,
       CASE WHEN n % 11 = 7 THEN 'ConnectionError: the database went away' END,
       '{"users": 3, "items_users": 3}', 'kontod-earlier', t
  FROM unnest($1::text[]) AS j(name),
       generate_series(1, 30) AS n,
       LATERAL (SELECT now() - make_interval(days => 31 - n) AS t) tick
"""


class DevTools:
    """A minimal client of Chromium's DevTools protocol over one page's websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.loaded = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = msg.json()
            if "id" in data:
                future = self.waiting.pop(data["id"])
                if "error" in data:
                    future.set_exception(RuntimeError(f"DevTools: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
            else:
                self.events.append(data)
                if data.get("method") == "Page.loadEventFired":
                    self.loaded.set()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[call_id] = future
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        return await asyncio.wait_for(future, timeout=30)

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, failed or blocked loads, as text."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(str(params.get("exceptionDetails")))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(str(params.get("args")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(str(params["entry"].get("text")))
            elif method == "Network.loadingFailed":
                out.append(f"load failed: {params.get('errorText')} {params.get('blockedReason')}")
        return out


@contextlib.asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[DevTools]:
    program = require_program("chromium", "chromium")
    profile = tmp / "chromium-profile"
    proc = await asyncio.create_subprocess_exec(
        program,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        async with asyncio.timeout(60):
            while not (active.exists() and len(active.read_text().splitlines()) >= 2):
                assert proc.returncode is None, "chromium exited at start"
                await asyncio.sleep(0.1)
        port = int(active.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await tools.call(f"{domain}.enable")
                try:
                    yield tools
                finally:
                    tools.reader.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_the_status_page_in_a_real_browser(
    dsn: str, bank: Bank, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(3):
            await add_user(conn, accounts=[("checking", "1200.50", False)])
        await conn.execute(HISTORY_SQL, ["daily-snapshots", "refresh-stale-connections"])
        await pauses.pause(
            conn,
            "refresh-stale-connections",
            "Powens maintenance until 08:00",
            "cli:ops@host",
            datetime.now(UTC),
        )
    finally:
        await conn.close()
    async with RateSandbox().serve() as rates_root:
        fiat, crypto = rate_urls(rates_root)
        settings = settings_for(
            dsn,
            refresh={"powens_url": bank.url},
            rates={"fiat_url": fiat, "crypto_url": crypto},
        )
        shots, problems, seen = await _open_status_page(settings, tmp_path)
    ARTIFACTS.mkdir(exist_ok=True)
    for name, shot in shots.items():
        (ARTIFACTS / name).write_bytes(base64.b64decode(shot["data"]))
        assert (ARTIFACTS / name).stat().st_size > 10_000, name
    with capsys.disabled():
        print(f"\nstatus page screenshots: {', '.join(str(ARTIFACTS / n) for n in shots)}")
    assert problems == []
    wide, narrow, run = seen["wide"], seen["narrow"], seen["run"]
    assert wide["jobs"] == [
        "job-daily-snapshots",
        "job-refresh-stale-connections",
        "job-refresh-property-estimations",
        "job-prune-audit-log",
    ]
    # The last 30 of 31 (32) runs each; the two jobs not configured here ran once, doing nothing.
    assert wide["bars"] == [30, 30, 1, 1]
    assert wide["links"] == [30, 30, 1, 1] and wide["linksOk"]
    assert wide["statuses"] == ["error", "success", "timeout"]
    # Paused, with how its last run ended and that run's error, not a green "healthy".
    assert wide["paused"] == "paused"
    assert wide["status"].startswith("paused") and "last run: error" in wide["status"]
    assert "healthy" not in wide["status"]
    assert wide["error"] == ERROR
    # The newest bar is a failure of 0.3 s among runs of about a minute: still half the chart.
    assert wide["newest"] == "error" and wide["newestHeight"] >= status_page.CHART_H / 2
    assert wide["svgHeight"] > 0
    assert wide["refresh"] == str(status_page.REFRESH_S)
    # A phone: nothing wider than the screen, the table as cards, the error and bars on it.
    assert narrow["innerWidth"] == 390
    assert narrow["scrollWidth"] <= narrow["innerWidth"], narrow
    assert narrow["rowDisplay"] == "block" and narrow["headVisible"] is False
    assert narrow["error"] == ERROR and narrow["errorRight"] <= 390
    assert narrow["barsRight"] <= 390
    assert narrow["reloaded"] is True
    # The tapped bar opened its run's page: everything about that run.
    assert run["path"] == f"/runs/{seen['failedId']}"
    assert run["error"] == ERROR
    assert run["counts"] == [["items_failed", "2"], ["users", "3"]]
    assert "cli:ops@host" in run["facts"] and "after the bank fix" in run["facts"]
    assert run["scrollWidth"] <= 390


async def _evaluate(tools: DevTools, expression: str) -> Any:
    found = await tools.call("Runtime.evaluate", returnByValue=True, expression=expression)
    assert "exceptionDetails" not in found, found
    return found["result"]["value"]


async def _screenshot(tools: DevTools) -> dict[str, Any]:
    size = (await tools.call("Page.getLayoutMetrics"))["cssContentSize"]
    return await tools.call(
        "Page.captureScreenshot",
        format="png",
        captureBeyondViewport=True,
        clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
    )


async def _load(tools: DevTools, url: str | None = None) -> None:
    """Open ``url`` (None: wait for the page to load by itself) and wait for its load event."""
    tools.loaded.clear()
    if url is not None:
        await tools.call("Page.navigate", url=url)
    await asyncio.wait_for(tools.loaded.wait(), timeout=status_page.REFRESH_S + 30)


WIDE_JS = """({
    jobs: [...document.querySelectorAll('tbody tr')].map(r => r.id),
    bars: [...document.querySelectorAll('tbody tr')].map(
        r => r.querySelectorAll('svg rect.bar').length),
    links: [...document.querySelectorAll('tbody tr')].map(
        r => r.querySelectorAll('svg a').length),
    linksOk: [...document.querySelectorAll('svg a')].every(
        a => /^\\/runs\\/[0-9]+$/.test(a.getAttribute('href'))),
    statuses: [...new Set([...document.querySelectorAll('rect.bar')].map(
        b => b.dataset.status))].sort(),
    paused: document.querySelector('#job-refresh-stale-connections .paused')?.textContent,
    status: document.querySelector('#job-refresh-stale-connections td.status').innerText,
    error: document.querySelector('#job-refresh-stale-connections pre.error')?.textContent,
    newest: [...document.querySelectorAll('#job-refresh-stale-connections rect.bar')]
        .at(-1).dataset.status,
    newestHeight: [...document.querySelectorAll('#job-refresh-stale-connections rect.bar')]
        .at(-1).getBoundingClientRect().height,
    svgHeight: document.querySelector('svg').getBoundingClientRect().height,
    refresh: document.querySelector('meta[http-equiv=refresh]')?.content,
})"""

NARROW_JS = """({
    innerWidth: window.innerWidth,
    scrollWidth: document.documentElement.scrollWidth,
    rowDisplay: getComputedStyle(document.querySelector('tbody tr')).display,
    headVisible: document.querySelector('thead').getClientRects().length > 0,
    error: document.querySelector('#job-refresh-stale-connections pre.error')?.textContent,
    errorRight: document.querySelector('#job-refresh-stale-connections pre.error')
        .getBoundingClientRect().right,
    barsRight: Math.max(...[...document.querySelectorAll('svg.runs')].map(
        s => s.getBoundingClientRect().right)),
})"""

RUN_JS = """({
    path: location.pathname,
    error: document.querySelector('pre.error')?.textContent,
    counts: [...document.querySelectorAll('table.counts tr')].map(
        r => [...r.cells].map(c => c.textContent)),
    facts: document.querySelector('dl.run')?.innerText,
    scrollWidth: document.documentElement.scrollWidth,
})"""


async def _tap(tools: DevTools, selector: str) -> None:
    """A real click (press and release of the mouse) at the middle of ``selector``."""
    box = await _evaluate(
        tools,
        f"""(() => {{
            const el = document.querySelector({selector!r});
            el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect();
            return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
        }})()""",
    )
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        await tools.call(
            "Input.dispatchMouseEvent",
            type=kind,
            x=box["x"],
            y=box["y"],
            button="left",
            clickCount=1,
        )


async def _open_status_page(
    settings: Settings, tmp_path: Path
) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, Any]]:
    """Run both jobs once in a daemon, add a failure, open its status page in Chromium at 1280
    and 390 px, tap the failure's bar: (screenshots by file name, problems seen by the
    browser, what the pages show)."""

    def jobs(pool: asyncpg.Pool, http: aiohttp.ClientSession, _: Observer) -> Any:
        return declare_jobs(settings, pool, http)

    seen: dict[str, Any] = {}
    shots: dict[str, dict[str, Any]] = {}
    async with running_daemon(settings, jobs) as (daemon, base):
        assert daemon.runner is not None and daemon.history is not None
        assert daemon.board is not None
        for name in daemon.runner.jobs:
            # The quiet schedule: no run of the day's tick holds the job, so each manual run
            # starts and succeeds.
            outcome = await daemon.runner.trigger(
                name, "manual", requested_by="cli:ops@host", reason="after the upgrade"
            )
            assert isinstance(outcome, Started), (name, outcome)
            assert await outcome.task == "success"
        seen["failedId"] = await daemon.runner.pool.fetchval(FAILED_SQL, ERROR)
        await daemon.history.refresh()
        await daemon.board.refresh()
        status, html = await get(base + "/")
        assert status == 200 and "<script" not in html
        async with chromium(tmp_path) as tools:
            await tools.call(
                "Emulation.setDeviceMetricsOverride",
                width=1280,
                height=720,
                deviceScaleFactor=1,
                mobile=False,
            )
            await _load(tools, base + "/")
            seen["wide"] = await _evaluate(tools, WIDE_JS)
            shots["status-page.png"] = await _screenshot(tools)
            await tools.call(
                "Emulation.setDeviceMetricsOverride",
                width=390,
                height=844,
                deviceScaleFactor=1,
                mobile=True,
            )
            await _load(tools, base + "/")
            seen["narrow"] = await _evaluate(tools, NARROW_JS)
            shots["status-page-390.png"] = await _screenshot(tools)
            # The page reloads by itself (its meta refresh), with no navigation asked.
            await _load(tools)
            seen["narrow"]["reloaded"] = True
            tools.loaded.clear()
            await _tap(tools, "#job-refresh-stale-connections svg a:last-of-type rect.bar")
            await asyncio.wait_for(tools.loaded.wait(), timeout=30)
            seen["run"] = await _evaluate(tools, RUN_JS)
            shots["run-page-390.png"] = await _screenshot(tools)
            problems = tools.problems()
    return shots, problems, seen


def test_the_page_escapes_what_it_shows_and_loads_nothing_from_outside() -> None:
    now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    job = spec("<b>job</b>")
    view = JobView(
        spec=job,
        stats=JobStats(last_status="running"),
        verdict=Verdict(True, None, now, now),
        pause=pauses.Pause("<b>job</b>", "<script>alert(1)</script>", "cli:a@b", now, None),
        suspicion=Suspicion(True, "took 1 s & less"),
        progress=Progress(5, 10, now, 0.5, 1.0, now),
        runs=[],
    )
    html = status_page.render([view], PARIS, now)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "&lt;b&gt;job&lt;/b&gt;" in html and "took 1 s &amp; less" in html
    assert 'progress max="10" value="5"' in html
    assert "http://" not in html and "https://" not in html


async def test_the_page_renders_any_stored_pause_and_run(dsn: str) -> None:
    """Pauses and runs written straight into the tables, at instants that leave Python's range
    once shown in Paris (ahead of UTC): the page shows them, clamped, instead of a 500."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO kontod_pauses (job, reason, paused_by, paused_at, until, resumed_at)
               VALUES ('daily-snapshots', 'retired', 'sql', now(), '9999-12-31 23:30+00', NULL),
                      ('refresh-stale-connections', 'for good', 'sql', now(), 'infinity', NULL),
                      ('refresh-stale-connections', 'long ago', 'sql', '-infinity',
                       '0001-01-01 00:10+00', '-infinity')"""
        )
        await conn.execute(
            """INSERT INTO kontod_runs (job, trigger, scheduled_for, started_at, finished_at,
                                        status, instance, lease_until)
               VALUES ('daily-snapshots', 'schedule', '9999-12-31 23:30+00',
                       '9999-12-31 23:30+00', '9999-12-31 23:45+00', 'success', 'sql',
                       '9999-12-31 23:45+00')"""
        )
    finally:
        await conn.close()
    jobs = [spec("daily-snapshots", catchup=0), spec("refresh-stale-connections", catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (daemon, base):
        assert daemon.board is not None
        await daemon.board.refresh()
        status, html = await get(base + "/")
        assert status == 200, html
        assert html.count('<span class="paused">paused</span> by sql') == 2
        assert "until 9999-12-30 01:00 CET" in html  # clamped: a day short of the end of time
        assert 'data-status="success"' in html
        status, report = await get(base + "/health/cron")
        assert status in (200, 503), report
        assert [job["pausedUntil"] for job in report["jobs"]] == ["9999-12-30T00:00:00.000Z"] * 2


async def test_the_board_stops_when_cancelled_as_it_is_woken(pool: asyncpg.Pool) -> None:
    # A run that ends as kontod stops wakes the board in the same moment its task is cancelled.
    board = Board(pool, [spec()], PARIS)
    task = board.start()

    async def refreshed() -> bool:
        return board.version >= 1

    await wait_for(refreshed)  # the first refresh is done: the board waits
    await asyncio.sleep(0.05)
    board.wake()
    await asyncio.sleep(0)  # the wait inside has ended; the loop has not resumed yet
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done == {task} and task.cancelled()
