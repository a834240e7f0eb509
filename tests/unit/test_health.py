"""Health verdicts as a pure function of schedule, history and now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kontod.ops.health import assess
from kontod.scheduler.runs import JobStats
from tests.helpers import PARIS

DAILY = "0 2 * * *"  # 00:00 UTC in June
GRACE = timedelta(hours=1)
INSTALLED = datetime(2026, 6, 9, 15, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 6, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("stats", "now", "healthy"),
    [
        # Never run, installed in the afternoon: healthy until the next tick plus grace.
        (JobStats(registered_at=INSTALLED), at(9, 18), True),
        (JobStats(registered_at=INSTALLED), at(10, 0, 59), True),
        (JobStats(registered_at=INSTALLED), at(10, 1, 1), False),
        # Ran at the tick: healthy through the day and until the next tick plus grace.
        (
            JobStats(INSTALLED, 1, 0, at(10, 0), "success", last_finished_at=at(10, 0, 1)),
            at(11, 0, 59),
            True,
        ),
        (
            JobStats(INSTALLED, 1, 0, at(10, 0), "success", last_finished_at=at(10, 0, 1)),
            at(11, 1, 1),
            False,
        ),
        # The last run failed: unhealthy at once.
        (JobStats(INSTALLED, 1, 1, at(10, 0), "error"), at(10, 0, 5), False),
        (JobStats(INSTALLED, 1, 1, at(10, 0), "timeout"), at(10, 0, 5), False),
        (JobStats(INSTALLED, 1, 1, at(10, 0), "interrupted"), at(10, 0, 5), False),
        # Running now: not late.
        (JobStats(INSTALLED, 0, 0, at(10, 0), "running"), at(10, 3), True),
        # A manual run after the tick counts as having run.
        (JobStats(INSTALLED, 1, 0, at(10, 0, 30), "success"), at(10, 5), True),
    ],
)
def test_daily_job_health(stats: JobStats, now: datetime, healthy: bool) -> None:
    assert assess(DAILY, PARIS, GRACE, stats, now).healthy is healthy


def test_six_hourly_job_uses_its_own_period() -> None:
    # The old monitor waited 25 hours for every job; a 6-hourly job is late after 6 h + grace.
    stats = JobStats(INSTALLED, 1, 0, at(10, 4), "success")  # the 06:00 Paris tick
    assert assess("0 */6 * * *", PARIS, timedelta(minutes=30), stats, at(10, 10, 29)).healthy
    assert not assess("0 */6 * * *", PARIS, timedelta(minutes=30), stats, at(10, 10, 31)).healthy


def test_not_configured_job_is_healthy_with_a_reason() -> None:
    verdict = assess(DAILY, PARIS, GRACE, JobStats(INSTALLED), at(20, 0), not_configured="no url")
    assert verdict.healthy
    assert verdict.reason == "not configured: no url"


def test_reason_names_the_missed_tick() -> None:
    verdict = assess(DAILY, PARIS, GRACE, JobStats(INSTALLED), at(10, 2))
    assert verdict.reason is not None
    assert "2026-06-10T00:00:00+00:00" in verdict.reason


def test_a_run_of_the_tick_counts_even_if_the_database_clock_is_behind() -> None:
    # The run of the 00:00 tick started, by the database's clock, 5 ms before kontod's tick.
    stats = JobStats(
        INSTALLED, 1, 0, at(10, 0) - timedelta(milliseconds=5), "success", last_tick_run=at(10, 0)
    )
    assert assess(DAILY, PARIS, GRACE, stats, at(10, 5)).healthy


def test_a_run_going_past_its_maximum_run_time_is_unhealthy() -> None:
    stats = JobStats(INSTALLED, 0, 0, at(10, 0), "running", running_since=at(10, 0))
    limit = timedelta(hours=2)
    assert assess(DAILY, PARIS, GRACE, stats, at(10, 1), max_runtime=limit).healthy
    verdict = assess(DAILY, PARIS, GRACE, stats, at(10, 3), max_runtime=limit)
    assert not verdict.healthy
    assert "past its maximum run time" in (verdict.reason or "")
