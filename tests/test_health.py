"""Health verdicts as a pure function of schedule, history and now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kontod.health import assess
from kontod.runs import JobStats
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
