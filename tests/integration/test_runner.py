"""The runner against a real PostgreSQL: overlap, timeout, catch-up, replicas, restarts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from kontod.scheduler import runlist, runs
from kontod.scheduler.contract import RunContext, SkipReason
from kontod.scheduler.retries import RetryPolicy
from kontod.scheduler.runner import Skipped, Started
from tests.helpers import close, runner_on, spec, wait_for
from tests.integration.test_schedule_runner import LEASE_S, Clock, Rounds

SUMMER_9AM = datetime(2026, 6, 10, 7, tzinfo=UTC)  # 09:00 in Paris; the 02:00 tick was 7 h ago
TICK = datetime(2026, 6, 10, 0, tzinfo=UTC)


async def statuses(dsn: str, job: str = "test-job") -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT trigger, status FROM kontod_runs WHERE job = $1 ORDER BY id", job
        )
    finally:
        await conn.close()
    return [(r["trigger"], r["status"]) for r in rows]


async def test_a_run_is_recorded_with_its_counts(dsn: str) -> None:
    runner, events = await runner_on(dsn, [spec()])
    try:
        outcome = await runner.trigger("test-job", "manual")
        assert isinstance(outcome, Started)
        assert await outcome.task == "success"
        [record] = await runlist.runs_of(runner.pool, "test-job", 5)
        assert (record.status, record.trigger, record.scheduled_for) == ("success", "manual", None)
        assert record.counts == {"items_done": 1}
        assert record.finished_at is not None
        assert events.finished == [("test-job", "success")]
    finally:
        await close(runner)


async def test_a_raising_job_is_recorded_as_error_and_the_runner_lives_on(dsn: str) -> None:
    async def boom(ctx: RunContext) -> None:
        raise ValueError("bank exploded")

    runner, _ = await runner_on(dsn, [spec(body=boom)])
    try:
        first = await runner.trigger("test-job", "manual")
        assert isinstance(first, Started)
        assert await first.task == "error"
        [record] = await runlist.runs_of(runner.pool, "test-job", 5)
        assert record.error == "ValueError: bank exploded"
        second = await runner.trigger("test-job", "manual")
        assert isinstance(second, Started)
        assert await second.task == "error"
    finally:
        await close(runner)


async def test_maximum_run_time_cancels_and_records_timeout(dsn: str) -> None:
    cancelled = asyncio.Event()

    async def slow(ctx: RunContext) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner, _ = await runner_on(dsn, [spec(body=slow, max_runtime=0.3)])
    try:
        outcome = await runner.trigger("test-job", "manual")
        assert isinstance(outcome, Started)
        assert await outcome.task == "timeout"
        assert cancelled.is_set()
        [record] = await runlist.runs_of(runner.pool, "test-job", 1)
        assert record.error == "exceeded its maximum run time of 0.3 s"
    finally:
        await close(runner)


async def test_a_tick_while_running_is_skipped_and_counted(dsn: str) -> None:
    release = asyncio.Event()

    async def held(ctx: RunContext) -> None:
        await release.wait()

    # Every second, a job that holds until released: the ticks meanwhile are skipped.
    job = spec(body=held, schedule="* * * * * *", catchup=0)
    runner, events = await runner_on(dsn, [job])
    try:
        await runner.start()
        await wait_for(lambda: _true(events.skipped[("test-job", "overlap")] >= 2), timeout=10)
        assert await statuses(dsn) == [("schedule", "running")]
        release.set()
        await wait_for(lambda: _true(len(events.finished) >= 2), timeout=10)
    finally:
        await close(runner)
    assert (await statuses(dsn))[:2] == [("schedule", "success"), ("schedule", "success")]


async def _true(value: bool) -> bool:
    return value


async def test_manual_run_while_running_is_refused(dsn: str) -> None:
    release = asyncio.Event()

    async def held(ctx: RunContext) -> None:
        await release.wait()

    runner, _ = await runner_on(dsn, [spec(body=held)])
    try:
        first = await runner.trigger("test-job", "manual")
        assert isinstance(first, Started)
        assert await runner.trigger("test-job", "manual") == Skipped(SkipReason.OVERLAP)
        release.set()
        assert await first.task == "success"
    finally:
        await close(runner)


async def test_two_runners_on_one_database_run_each_tick_once(dsn: str) -> None:
    async def quick(ctx: RunContext) -> None:
        await asyncio.sleep(0.05)

    jobs = [spec(body=quick, schedule="* * * * * *")]
    (a, ev_a), (b, ev_b) = await runner_on(dsn, jobs), await runner_on(dsn, jobs)
    try:
        await asyncio.gather(a.start(), b.start())
        await asyncio.sleep(4.5)
    finally:
        await asyncio.gather(close(a), close(b))
    conn = await asyncpg.connect(dsn)
    try:
        per_tick = await conn.fetch(
            "SELECT scheduled_for, count(*) AS n FROM kontod_runs GROUP BY scheduled_for"
        )
    finally:
        await conn.close()
    assert len(per_tick) >= 3
    assert all(r["n"] == 1 for r in per_tick)
    # Both saw every tick; the one that lost the insert counted a skip.
    lost = ev_a.skipped[("test-job", "claimed")] + ev_b.skipped[("test-job", "claimed")]
    lost += ev_a.skipped[("test-job", "overlap")] + ev_b.skipped[("test-job", "overlap")]
    assert lost >= len(per_tick) - 1


async def test_concurrent_claims_of_one_tick_start_one_run(dsn: str) -> None:
    jobs = [spec()]
    runners = [await runner_on(dsn, jobs) for _ in range(4)]
    try:
        outcomes = await asyncio.gather(
            *(r.trigger("test-job", "schedule", TICK) for r, _ in runners)
        )
        assert sum(isinstance(o, Started) for o in outcomes) == 1
        for o in outcomes:
            if isinstance(o, Started):
                await o.task
    finally:
        await asyncio.gather(*(close(r) for r, _ in runners))


async def test_catch_up_runs_a_missed_tick_within_the_window(dsn: str) -> None:
    runner, _ = await runner_on(dsn, [spec()], clock=lambda: SUMMER_9AM)
    try:
        await runner.start()
        await wait_for(lambda: _done(dsn))
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow("SELECT trigger, scheduled_for, status FROM kontod_runs")
        finally:
            await conn.close()
        assert row is not None
        assert (row["trigger"], row["scheduled_for"], row["status"]) == ("catchup", TICK, "success")
    finally:
        await close(runner)


async def test_first_pass_says_when_a_start_catch_up_is_claimed(dsn: str) -> None:
    """What the demo waits for before it starts its own runs: the catch-up already holds the
    job (no manual run to overlap it), and a job with none due is left to the caller."""
    release = asyncio.Event()

    async def held(ctx: RunContext) -> None:
        await release.wait()

    jobs = [spec("caught", held), spec("late", catchup=0)]
    runner, events = await runner_on(dsn, jobs, clock=lambda: SUMMER_9AM)
    try:
        await runner.start()
        async with asyncio.timeout(60):
            await runner.first_pass("caught")
            await runner.first_pass("late")
        caught = runner.active("caught")
        assert caught is not None
        assert runner.active("late") is None
        release.set()
        assert await asyncio.wait_for(caught, 60) == "success"
        assert await statuses(dsn, "caught") == [("catchup", "success")]
        assert not events.skipped
    finally:
        release.set()
        await close(runner)


async def _done(dsn: str) -> bool:
    return any(status == "success" for _, status in await statuses(dsn))


async def test_no_catch_up_outside_the_window_or_for_a_done_tick(dsn: str) -> None:
    late = datetime(2026, 6, 10, 22, 30, tzinfo=UTC)  # 22.5 h after the tick, window is 20 h
    runner, _ = await runner_on(dsn, [spec()], clock=lambda: late)
    try:
        await runner.start()
        await asyncio.sleep(0.3)
        assert await statuses(dsn) == []
    finally:
        await close(runner)
    runner, _ = await runner_on(dsn, [spec()], clock=lambda: SUMMER_9AM)
    try:
        run_id = await runs.claim(runner.pool, "test-job", "schedule", TICK, 1, runner.instance, 30)
        assert run_id is not None
        assert await runs.finish(runner.pool, run_id, runner.instance, "error", "failed", {})
        await runner.start()
        await asyncio.sleep(0.3)
        # A failed tick is not caught up: it waits for its retry (5 minutes by default).
        assert await statuses(dsn) == [("schedule", "error")]
    finally:
        await close(runner)


async def test_runs_whose_lease_expired_become_interrupted_and_are_taken_over(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO kontod_runs (job, trigger, scheduled_for, instance, lease_until,
                                        heartbeat_at)
               VALUES ('test-job', 'schedule', $1, 'gone:123', now() - interval '1 second',
                       now() - interval '31 seconds')""",
            TICK,
        )
    finally:
        await conn.close()
    runner, _ = await runner_on(dsn, [spec()], clock=lambda: SUMMER_9AM)
    try:
        await runner.start()
        await wait_for(lambda: _done(dsn))
        assert await statuses(dsn) == [("schedule", "interrupted"), ("takeover", "success")]
        [taken, reaped] = await runlist.runs_of(runner.pool, "test-job", 5)
        assert (taken.attempt, taken.scheduled_for, taken.instance) == (2, TICK, runner.instance)
        assert reaped.error is not None
        assert "instance gone:123 stopped renewing its lease" in reaped.error, reaped.error
    finally:
        await close(runner)


async def test_a_running_lease_is_renewed_and_never_reaped(dsn: str) -> None:
    release = asyncio.Event()

    async def held(ctx: RunContext) -> None:
        await release.wait()

    runner, _ = await runner_on(dsn, [spec(body=held)], lease_s=1.5)
    try:
        started = await runner.trigger("test-job", "manual")
        assert isinstance(started, Started)
        first = await runner.pool.fetchval("SELECT lease_until FROM kontod_runs")
        await asyncio.sleep(2.5)  # past the first lease: only renewals keep it
        assert await runs.reap_expired(runner.pool) == []
        assert await runner.pool.fetchval("SELECT lease_until FROM kontod_runs") > first
        release.set()
        assert await started.task == "success"
    finally:
        await close(runner)


async def test_a_live_replicas_run_is_not_interrupted(dsn: str) -> None:
    release = asyncio.Event()

    async def held(ctx: RunContext) -> None:
        await release.wait()

    a, _ = await runner_on(dsn, [spec(body=held)])
    b, _ = await runner_on(dsn, [spec(body=held)])
    try:
        started = await a.trigger("test-job", "manual")
        assert isinstance(started, Started)
        await b.prepare()
        assert await b.trigger("test-job", "manual") == Skipped(SkipReason.OVERLAP)
        assert await statuses(dsn) == [("manual", "running")]
        release.set()
        await started.task
    finally:
        await asyncio.gather(close(a), close(b))


async def test_history_survives_a_restart(dsn: str) -> None:
    outcomes = iter([None, RuntimeError("down"), None])

    async def flaky(ctx: RunContext) -> None:
        error = next(outcomes)
        if error:
            raise error

    runner, _ = await runner_on(dsn, [spec(body=flaky)])
    try:
        await runner.prepare()
        for _ in range(3):
            started = await runner.trigger("test-job", "manual")
            assert isinstance(started, Started)
            await started.task
        before = (await runner.refresh_stats())["test-job"]
    finally:
        await close(runner)
    fresh, _ = await runner_on(dsn, [spec(body=flaky)])
    try:
        await fresh.prepare()
        after = fresh.stats["test-job"]
    finally:
        await close(fresh)
    assert (after.runs, after.errors, after.last_status) == (3, 1, "success")
    assert after.last_success_at == before.last_success_at
    assert after.last_success_at is not None


async def test_stop_waits_for_a_run_then_interrupts_it(dsn: str) -> None:
    async def slow(ctx: RunContext) -> None:
        await asyncio.sleep(30)

    runner, _ = await runner_on(dsn, [spec(body=slow)])
    started = await runner.trigger("test-job", "manual")
    assert isinstance(started, Started)
    await close(runner, grace_s=0.2)
    assert await statuses(dsn) == [("manual", "interrupted")]


async def test_a_run_whose_lease_was_taken_stops_and_records_nothing(dsn: str) -> None:
    wrote: list[int] = []

    async def writer(ctx: RunContext) -> None:
        # Waits for the reaper, then tries one fenced write as a snapshot batch would.
        await wait_for(lambda: _status_is(dsn, "interrupted"), timeout=10)
        async with runner.pool.acquire() as conn, conn.transaction():
            await ctx.check_claim(conn)
            wrote.append(1)

    runner, _ = await runner_on(dsn, [spec(body=writer)])
    try:
        started = await runner.trigger("test-job", "manual")
        assert isinstance(started, Started)
        # As if this process had frozen for longer than its lease: another replica reaps (this
        # test, or the runner's own housekeeping when it comes first). The run's own renewal
        # may land between the two statements on a busy machine: then expire it again.
        for _ in range(50):
            await runner.pool.execute("UPDATE kontod_runs SET lease_until = now() - interval '1 s'")
            await runs.reap_expired(runner.pool)
            if await _status_is(dsn, "interrupted"):
                break
            await asyncio.sleep(0.1)
        assert await _status_is(dsn, "interrupted")
        assert await started.task == "lost"
        assert wrote == []
        [record] = await runlist.runs_of(runner.pool, "test-job", 5)
        assert record.status == "interrupted"  # the reaper's word stands
        assert not await runs.finish(
            runner.pool, started.run_id, runner.instance, "success", None, {}
        )
    finally:
        await close(runner)


async def test_the_lease_loop_stops_a_run_that_lost_its_lease(dsn: str) -> None:
    cancelled = asyncio.Event()

    async def held(ctx: RunContext) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner, _ = await runner_on(dsn, [spec(body=held)], lease_s=1.5)
    try:
        started = await runner.trigger("test-job", "manual")
        assert isinstance(started, Started)
        await runner.pool.execute(
            "UPDATE kontod_runs SET status = 'interrupted', finished_at = now()"
        )
        assert await asyncio.wait_for(started.task, timeout=5) == "lost"
        assert cancelled.is_set()
        assert await statuses(dsn) == [("manual", "interrupted")]
    finally:
        await close(runner)


async def _status_is(dsn: str, status: str) -> bool:
    return any(s == status for _, s in await statuses(dsn))


async def test_no_run_starts_once_stopping(dsn: str) -> None:
    release = asyncio.Event()

    async def held(ctx: RunContext) -> None:
        await release.wait()

    runner, _ = await runner_on(dsn, [spec(body=held), spec("other")])
    try:
        first = await runner.trigger("test-job", "manual")
        assert isinstance(first, Started)
        stopping = asyncio.create_task(runner.stop(5))
        await asyncio.sleep(0.1)
        assert await runner.trigger("other", "manual") == Skipped(SkipReason.STOPPING)
        release.set()
        await stopping
    finally:
        await close(runner)
    assert await statuses(dsn) == [("manual", "success")]


async def test_a_takeover_waits_for_another_run_of_the_job_to_end(dsn: str) -> None:
    release = asyncio.Event()

    async def held(ctx: RunContext) -> None:
        if ctx.trigger == "manual":
            await release.wait()

    runner, events = await runner_on(dsn, [spec(body=held)], clock=lambda: SUMMER_9AM)
    try:
        manual = await runner.trigger("test-job", "manual")
        assert isinstance(manual, Started)
        await runner.pool.execute(
            """INSERT INTO kontod_runs (job, trigger, scheduled_for, instance, lease_until,
                                        status, finished_at, error)
               VALUES ('test-job', 'schedule', $1, 'gone:1', now(), 'interrupted', now(),
                       'abandoned')""",
            TICK,
        )
        await runner.start()
        await asyncio.sleep(0.3)
        assert await statuses(dsn) == [("manual", "running"), ("schedule", "interrupted")]
        release.set()
        await wait_for(lambda: _status_count(dsn, "success", 2))
        assert await statuses(dsn) == [
            ("manual", "success"),
            ("schedule", "interrupted"),
            ("takeover", "success"),
        ]
        assert sum(events.skipped.values()) == 0  # it waited; it was not skipped
    finally:
        await close(runner)


async def _status_count(dsn: str, status: str, n: int) -> bool:
    return sum(s == status for _, s in await statuses(dsn)) >= n


async def test_a_tick_that_came_while_another_run_went_on_is_made_up_after_it(dsn: str) -> None:
    release = asyncio.Event()

    async def held(ctx: RunContext) -> None:
        if ctx.trigger == "manual":
            await release.wait()

    # 01:59:59 in Paris, the 02:00 tick one second away; yesterday's is outside the window.
    clock = Clock(datetime(2026, 6, 9, 23, 59, 59, tzinfo=UTC))
    runner, events = await runner_on(dsn, [spec(body=held)], clock=clock, lease_s=LEASE_S)
    rounds = Rounds(runner)
    try:
        manual = await runner.trigger("test-job", "manual")
        assert isinstance(manual, Started)
        await runner.start()
        await rounds.wait(2)  # the schedule loop now waits for the tick
        clock.now = TICK + timedelta(seconds=1)
        await wait_for(lambda: _true(events.skipped[("test-job", "overlap")] == 1))
        # The tick waits for the manual run's end: no claim, no skip at every wake meanwhile.
        await rounds.wait(4)
        assert events.skipped[("test-job", "overlap")] == 1
        assert sum(events.skipped.values()) == 1
        assert await statuses(dsn) == [("manual", "running")]
        release.set()
        await wait_for(lambda: _status_count(dsn, "success", 2))
        [made_up, _] = await runlist.runs_of(runner.pool, "test-job", 5)
        assert (made_up.trigger, made_up.scheduled_for) == ("catchup", TICK)
        await rounds.wait()
        assert await statuses(dsn) == [("manual", "success"), ("catchup", "success")]
    finally:
        await close(runner)


async def test_a_failed_manual_run_is_not_retried_nor_makes_anything_retried(dsn: str) -> None:
    async def fails_by_hand(ctx: RunContext) -> None:
        if ctx.trigger == "manual":
            raise RuntimeError("bank exploded")

    # Retries due at once and plenty of them: only the rules keep them from happening.
    policy = RetryPolicy(retries=5, delay=timedelta(0))
    clock = Clock(SUMMER_9AM)
    runner, _ = await runner_on(
        dsn, [spec(body=fails_by_hand)], clock=clock, lease_s=LEASE_S, retry=policy
    )
    rounds = Rounds(runner)
    try:
        # The day's tick already ran, and succeeded.
        run_id = await runs.claim(runner.pool, "test-job", "schedule", TICK, 1, "gone:1", 30)
        assert run_id is not None
        assert await runs.finish(runner.pool, run_id, "gone:1", "success", None, {})
        await runner.start()
        manual = await runner.trigger("test-job", "manual")
        assert isinstance(manual, Started)
        assert await manual.task == "error"
        await rounds.wait(4)
        assert await statuses(dsn) == [("schedule", "success"), ("manual", "error")]
        stats = runner.stats["test-job"]
        assert runner.next_retry("test-job", stats, clock()) is None
    finally:
        await close(runner)
