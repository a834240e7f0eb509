"""One run in full over HTTP: ``/runs/{id}`` as JSON for programs and as a page for browsers,
and who asked for a run and why in ``/jobs/{name}/runs``, against a real daemon and database."""

from __future__ import annotations

from typing import Any

import aiohttp

from kontod.ops.status_page import CONTENT_SECURITY_POLICY
from kontod.scheduler.contract import RunContext
from tests.daemon_harness import running_daemon, settings_for
from tests.helpers import spec, wait_for
from tests.integration.test_http import AUTH

# What Chromium sends when it opens a page.
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


async def fetch(url: str, accept: str | None = None) -> tuple[int, str, dict[str, str], Any]:
    """(status, content type, headers, body: JSON decoded, or text)."""
    headers = {"Accept": accept} if accept is not None else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, resp.content_type, dict(resp.headers), body


async def start(base: str, job: str, reason: str) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base}/jobs/{job}/run", json={"reason": reason}, headers=AUTH) as resp,
    ):
        assert resp.status == 202, await resp.text()
        run_id: int = (await resp.json())["runId"]
        return run_id


async def test_one_run_in_full_as_json_and_as_a_page(dsn: str) -> None:
    async def works(ctx: RunContext) -> None:
        ctx.counts["users"] += 3
        ctx.counts["items_users"] += 3

    async def fails(ctx: RunContext) -> None:
        ctx.counts["items_failed"] += 2
        raise ValueError("the bank said <b>no</b> & hung up")

    jobs = [spec("daily-snapshots", works, catchup=0), spec("refresh-stale-connections", fails)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (daemon, base):
        runner = daemon.runner
        assert runner is not None
        ok_id = await start(base, "daily-snapshots", "after the upgrade")
        failed_id = await start(base, "refresh-stale-connections", "bank is back")

        async def done() -> bool:
            return all(runner.active(name) is None for name in runner.jobs)

        await wait_for(done)

        # The list says who asked and why, as the CLI and the page do.
        status, _, _, body = await fetch(base + "/jobs/daily-snapshots/runs")
        assert status == 200
        [listed] = body["runs"]
        assert (listed["id"], listed["requestedBy"], listed["reason"]) == (
            ok_id,
            "http 127.0.0.1",
            "after the upgrade",
        )

        # A client that asks for nothing in particular (curl, aiohttp: */*) gets JSON.
        status, kind, headers, run = await fetch(f"{base}/runs/{failed_id}")
        assert (status, kind) == (200, "application/json"), run
        assert headers["Vary"] == "Accept"
        assert run["id"] == failed_id and run["job"] == "refresh-stale-connections"
        assert (run["status"], run["trigger"], run["attempt"]) == ("error", "manual", 1)
        assert run["error"] == "ValueError: the bank said <b>no</b> & hung up"
        assert run["counts"] == {"items_failed": 2}
        assert (run["requestedBy"], run["reason"]) == ("http 127.0.0.1", "bank is back")
        assert run["instance"] == daemon.instance and run["scheduledFor"] is None
        assert run["startedAt"].endswith("Z") and run["finishedAt"].endswith("Z")
        assert run["heartbeatAt"].endswith("Z") and run["leaseUntil"].endswith("Z")
        assert isinstance(run["durationSeconds"], float) and run["durationSeconds"] >= 0
        # The list and the detail agree on what they both carry.
        status, _, _, listed_failed = await fetch(base + "/jobs/refresh-stale-connections/runs")
        assert listed_failed["runs"][0] == {
            k: v
            for k, v in run.items()
            if k not in ("durationSeconds", "heartbeatAt", "leaseUntil")
        }
        for accept in ("application/json", "text/html;q=0.5, application/json", ""):
            status, kind, _, _ = await fetch(f"{base}/runs/{failed_id}", accept)
            assert (status, kind) == (200, "application/json"), accept

        # A browser gets the run's page, under the status page's strict policy.
        for accept in (BROWSER, "text/html"):
            status, kind, headers, page = await fetch(f"{base}/runs/{failed_id}", accept)
            assert (status, kind) == (200, "text/html"), accept
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert headers["Vary"] == "Accept"
        assert "ValueError: the bank said &lt;b&gt;no&lt;/b&gt; &amp; hung up" in page
        assert "<b>no</b>" not in page
        assert "<td>items_failed</td>" in page and ">2</td>" in page
        assert "http 127.0.0.1" in page and "bank is back" in page
        assert f"run {failed_id} of refresh-stale-connections" in page
        assert '<span class="s-error">error</span>' in page
        assert 'http-equiv="refresh"' not in page  # a finished run does not change
        status, _, _, page = await fetch(f"{base}/runs/{ok_id}", BROWSER)
        assert status == 200 and "<td>users</td>" in page and "after the upgrade" in page
        assert '<pre class="error">' not in page


async def test_an_unknown_or_malformed_run_id_is_a_json_4xx(dsn: str) -> None:
    jobs = [spec(catchup=0)]
    async with running_daemon(settings_for(dsn), lambda *_: jobs) as (_, base):
        for path, expected in (
            ("/runs/987654321", 404),
            ("/runs/9223372036854775807", 404),  # the largest id the table can hold
            ("/runs/9223372036854775808", 400),
            ("/runs/" + "9" * 5000, 400),
            ("/runs/0", 400),
            ("/runs/-1", 400),
            ("/runs/12abc", 400),
            ("/runs/%C2%B2", 400),  # a superscript two: a digit to Python, not a number here
            ("/runs/%20", 400),
        ):
            for accept in (None, BROWSER):
                status, kind, _, body = await fetch(base + path, accept)
                assert (status, kind, body["field"]) == (expected, "application/json", "id"), (
                    path,
                    body,
                )
        status, _, _, body = await fetch(base + "/runs/987654321")
        assert body["error"] == "no run with id 987654321"
        status, _, _, body = await fetch(base + "/runs/12abc")
        assert body["error"].startswith("a run id is a whole number from 1 to ")
        assert body["error"].endswith(", not '12abc'")
