"""What a tick needs next, as a pure function of its newest attempt and now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kontod.scheduler.contract import Trigger
from kontod.scheduler.retries import Planned, RetryPolicy, next_attempt, next_retry
from kontod.scheduler.runs import TickState

TICK = datetime(2026, 6, 10, 0, tzinfo=UTC)
WINDOW = timedelta(hours=20)
POLICY = RetryPolicy(retries=3, delay=timedelta(minutes=5))


def at(minutes: float) -> datetime:
    return TICK + timedelta(minutes=minutes)


def state(attempt: int, status: str, ended: float | None) -> TickState:
    return TickState(TICK, attempt, status, None if ended is None else at(ended))


@pytest.mark.parametrize(
    ("newest", "now", "on_time", "expected"),
    [
        # No run yet: on time it is the schedule's, later a catch-up; too late, nothing.
        (None, at(0), True, Planned(TICK, 1, Trigger.SCHEDULE, TICK)),
        (None, at(60), False, Planned(TICK, 1, Trigger.CATCHUP, TICK)),
        (None, at(21 * 60), False, None),
        # Running or done: nothing.
        (state(1, "running", None), at(1), False, None),
        (state(2, "success", 7), at(8), False, None),
        # Interrupted (its owner stopped or lost its lease): taken over now.
        (state(1, "interrupted", 3), at(4), False, Planned(TICK, 2, Trigger.TAKEOVER, at(4))),
        # Failed: retried after 5, 10, 20 minutes, then no more (3 retries).
        (state(1, "error", 1), at(2), False, Planned(TICK, 2, Trigger.RETRY, at(6))),
        (state(2, "timeout", 7), at(8), False, Planned(TICK, 3, Trigger.RETRY, at(17))),
        (state(3, "error", 18), at(19), False, Planned(TICK, 4, Trigger.RETRY, at(38))),
        (state(4, "error", 39), at(40), False, None),
        (state(4, "interrupted", 39), at(40), False, None),
        # A retry that would fall outside the catch-up window is not planned.
        (state(1, "error", 20 * 60 - 1), at(20 * 60), False, None),
    ],
)
def test_next_attempt(
    newest: TickState | None, now: datetime, on_time: bool, expected: Planned | None
) -> None:
    assert next_attempt(newest, TICK, now, WINDOW, POLICY, on_time=on_time) == expected


def test_next_retry_is_when_a_failed_tick_is_due() -> None:
    assert next_retry(state(1, "error", 1), at(2), WINDOW, POLICY) == at(6)
    assert next_retry(state(1, "success", 1), at(2), WINDOW, POLICY) is None
    assert next_retry(None, at(2), WINDOW, POLICY) is None
    assert next_retry(state(1, "error", 1), at(2), WINDOW, RetryPolicy(retries=0)) is None
