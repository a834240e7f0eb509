"""Pings to an outside dead man's switch, against a real HTTP server speaking Healthchecks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import structlog
from aiohttp import web

from kontod.config import ConfigError, load_settings
from kontod.demo.sandbox import write_stream
from kontod.ops import pings
from kontod.scheduler.contract import JobSpec, RunContext
from tests.daemon_harness import running_daemon, settings_for
from tests.helpers import free_port, spec, wait_for
from tests.integration.test_http import AUTH, get, post, samples
from tests.ping_sandbox import PingService, serve


@pytest.fixture
async def service() -> AsyncIterator[tuple[PingService, str]]:
    svc = PingService()
    async with serve(svc) as base:
        yield svc, base


def _jobs(outcomes: list[str]) -> list[JobSpec]:
    """One job that counts 7 users, then succeeds or fails as ``outcomes`` says, run by run."""

    async def body(ctx: RunContext) -> None:
        ctx.counts["items_users"] += 7
        if outcomes.pop(0) == "error":
            raise RuntimeError("the bank said no")

    return [spec("pinged", body, catchup=0)]


async def test_start_then_success_or_fail_with_the_run_rid_and_summary(
    dsn: str, service: tuple[PingService, str]
) -> None:
    svc, base = service
    check = svc.new_check()
    outcomes = ["success", "error"]
    settings = settings_for(dsn, pings={"urls": {"pinged": f"{base}/{check}"}})
    async with running_daemon(settings, lambda *_: _jobs(outcomes)) as (_daemon, url):
        for expected in (2, 4):
            status, _ = await post(url + "/jobs/pinged/run", AUTH)
            assert status == 202
            await wait_for(lambda n=expected: _count(svc, check, n))  # type: ignore[misc]
        _, text = await get(url + "/metrics")
    got = svc.of(check)
    assert [p.kind for p in got] == ["start", "success", "start", "fail"]
    assert all(p.method == "POST" for p in got)
    first, second = {got[0].rid, got[1].rid}, {got[2].rid, got[3].rid}
    assert len(first) == 1 and len(second) == 1 and first != second
    rid = first.pop()
    assert rid is not None and str(uuid.UUID(rid)) == rid  # canonical form
    success, failure = got[1].body.decode(), got[3].body.decode()
    assert "pinged run" in success and ": success in" in success
    assert "items_users=7" in success
    assert ": error in" in failure and "error: RuntimeError: the bank said no" in failure
    values = samples(text)
    for kind in ("start", "success", "fail"):
        key = ("kontod_pings_total", (("job_name", "pinged"), ("kind", kind), ("outcome", "ok")))
        assert values[key] == (2.0 if kind == "start" else 1.0)


async def _count(svc: PingService, check: str, n: int) -> bool:
    return len(svc.of(check)) >= n


async def test_a_ping_service_that_is_down_fails_no_run_and_is_counted(dsn: str) -> None:
    down = f"http://127.0.0.1:{free_port()}/ping/{uuid.uuid4()}"
    outcomes = ["success"]
    settings = settings_for(dsn, pings={"urls": {"pinged": down}})
    async with running_daemon(settings, lambda *_: _jobs(outcomes)) as (daemon, url):
        assert daemon.pinger is not None
        daemon.pinger.backoff_s = 0.01
        status, _body = await post(url + "/jobs/pinged/run", AUTH)
        assert status == 202
        await wait_for(lambda: _failed_pings(url, 2))
        _, report = await get(url + "/health/cron")
    job = report["jobs"][0]
    assert (job["lastStatus"], job["healthy"]) == ("success", True)


async def _failed_pings(url: str, n: int) -> bool:
    _, text = await get(url + "/metrics")
    values = samples(text)
    failed = sum(
        v
        for (name, labels), v in values.items()
        if name == "kontod_pings_total" and ("outcome", "failed") in labels
    )
    return failed >= n


async def test_answers_5xx_and_429_are_retried_and_a_404_is_not(
    service: tuple[PingService, str],
) -> None:
    svc, base = service
    check = svc.new_check()
    outcomes: list[tuple[str, str, str]] = []
    async with aiohttp.ClientSession() as http:
        pinger = pings.Pinger(
            http, {}, observe=lambda *a: outcomes.append(a), backoff_s=0.01, attempts=4
        )
        rid = pings.run_uuid("job", 1)
        svc.fail_next(503, 429, 502)
        assert await pinger.send("job", "start", f"{base}/{check}/start", rid, b"")
        assert [p.kind for p in svc.of(check)] == ["start"]
        svc.fail_next(500, 500, 500, 500)
        assert not await pinger.send("job", "start", f"{base}/{check}/start", rid, b"")
        # An unknown check: retrying cannot help, one request only.
        before = len(svc.failures)
        assert not await pinger.send("job", "success", f"{base}/{uuid.uuid4()}", rid, b"x")
        assert len(svc.failures) == before
    assert outcomes == [
        ("job", "start", "ok"),
        ("job", "start", "failed"),
        ("job", "success", "failed"),
    ]


async def test_the_base_url_pings_each_job_by_its_slug(service: tuple[PingService, str]) -> None:
    svc, base = service
    check = svc.new_slug("pingkey123", "daily-snapshots")
    urls = pings.ping_urls(["daily-snapshots", "other"], {}, f"{base}/pingkey123")
    async with aiohttp.ClientSession() as http:
        pinger = pings.Pinger(http, urls)
        assert await pinger.send(
            "daily-snapshots", "success", urls["daily-snapshots"], pings.run_uuid("d", 1), b"ok"
        )
    assert [(p.kind, p.body) for p in svc.of(check)] == [("success", b"ok")]


def test_the_summary_is_cut_to_the_body_limit_on_a_character_boundary() -> None:
    summary = pings.Summary("j", 1, "manual", "error", 1.0, {}, "é" * 20_000)
    body = summary.body()
    assert len(body) <= pings.BODY_LIMIT
    body.decode()  # still valid UTF-8
    assert pings.truncate("abc", 10) == b"abc"


def test_ping_settings_per_job_and_their_errors() -> None:
    env = {
        "KONTOD_PING_URL_DAILY_SNAPSHOTS": "https://hc-ping.com/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278",
        "KONTOD_PING_BASE_URL": "https://hc.example.org/ping/key",
    }
    settings = load_settings(env, isatty=False)
    urls = pings.ping_urls(
        ["daily-snapshots", "refresh-stale-connections"],
        settings.pings.urls,
        settings.pings.base_url,
    )
    assert urls == {
        "daily-snapshots": "https://hc-ping.com/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278",
        "refresh-stale-connections": "https://hc.example.org/ping/key/refresh-stale-connections",
    }
    with pytest.raises(ConfigError) as bad:
        load_settings({"KONTOD_PING_URL_DAILY_SNAPSHOTS": "hc-ping.com/secret-uuid"}, isatty=False)
    assert "KONTOD_PING_URL_DAILY_SNAPSHOTS" in str(bad.value)
    assert "secret-uuid" not in str(bad.value)
    with pytest.raises(ConfigError, match=r"KONTOD_PING_URL_DAILY_SNAPSHOT\b.*names no job"):
        pings.ping_urls(["daily-snapshots"], {"daily-snapshot": "https://x/y"}, None)


async def test_a_failing_ping_never_logs_the_checks_secret_path() -> None:
    # A service that redirects in a loop: the HTTP library's error quotes the whole URL.
    secret = str(uuid.uuid4())

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(request.rel_url))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", loop)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            pinger = pings.Pinger(http, {}, backoff_s=0.01, attempts=2)
            with structlog.testing.capture_logs() as logs:
                sent = await pinger.send(
                    "job",
                    "success",
                    f"http://127.0.0.1:{port}/{secret}",
                    pings.run_uuid("j", 1),
                    b"",
                )
    finally:
        await runner.cleanup()
    assert not sent
    assert [e["event"] for e in logs] == ["ping.retrying", "ping.retrying", "ping.failed"]
    assert "TooManyRedirects" in logs[-1]["error"]
    assert secret not in repr(logs)


def test_a_ping_url_with_a_bad_port_is_refused_at_start() -> None:
    with pytest.raises(ConfigError) as bad:
        load_settings({"KONTOD_PING_URL_DAILY_SNAPSHOTS": "https://hc-ping.com:44x/abc"})
    assert bad.value.setting == "KONTOD_PING_URL_DAILY_SNAPSHOTS"
    assert "abc" not in str(bad.value)


async def test_an_endless_answer_is_not_read_on() -> None:
    # Only the start of an answer is shown in a log line; a 200 that never ends is a sent ping.
    streamed: list[int] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        return await write_stream(request, b"OK", b"", None, streamed, "text/plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", endless)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            pinger = pings.Pinger(http, {}, backoff_s=0.01, attempts=1, timeout_s=2.0)
            sent = await pinger.send(
                "job", "success", f"http://127.0.0.1:{port}/check", pings.run_uuid("j", 1), b""
            )
    finally:
        await runner.cleanup()
    assert sent


async def test_a_ping_urls_user_info_path_and_query_are_never_logged() -> None:
    # A service that answers 404 quoting what it was asked for, as many error pages do.
    async def echo(request: web.Request) -> web.Response:
        return web.Response(status=404, text=f"no check at {request.raw_path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    secrets = ["pinger", "pw-9f2c1e", "chk-0b7d44", "key-5a61e3"]
    url = f"http://pinger:pw-9f2c1e@127.0.0.1:{port}/ping/chk-0b7d44?api=key-5a61e3"
    nobody = free_port()
    closed = f"http://pinger:pw-9f2c1e@127.0.0.1:{nobody}/ping/chk-0b7d44?api=key-5a61e3"
    try:
        async with aiohttp.ClientSession() as http:
            pinger = pings.Pinger(http, {"job": url}, backoff_s=0.01, attempts=2)
            with structlog.testing.capture_logs() as logs:
                refused = await pinger.send("job", "success", closed, pings.run_uuid("j", 1), b"")
                sent = await pinger.send("job", "success", url, pings.run_uuid("j", 1), b"")
    finally:
        await runner.cleanup()
    assert not refused and not sent
    failed = [e for e in logs if e["event"] == "ping.failed"]
    assert [e["host"] for e in failed] == [f"127.0.0.1:{nobody}", f"127.0.0.1:{port}"]
    assert failed[1]["error"].startswith("HTTP 404: no check at /***"), failed[1]
    for secret in secrets:
        assert secret not in repr(logs), secret


async def test_a_ping_url_with_a_query_keeps_it_after_start_and_fail() -> None:
    assert pings._at("https://hc.example/ping/abc?k=1", "/start") == (
        "https://hc.example/ping/abc/start?k=1"
    )
    assert pings.ping_urls(["j"], {}, "https://hc.example/ping/key?x=1") == {
        "j": "https://hc.example/ping/key/j?x=1"
    }
