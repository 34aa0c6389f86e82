"""An attempt's clock: the ping and a reconnect get only what the call's deadline has left.

Pure logic on a fake monotonic clock, no server and no stopwatch.
"""

from __future__ import annotations

import time

import pytest

from chresilient.retry import AttemptClock, Deadline


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    return clock


def test_the_clock_starts_after_the_wait_and_is_cut_to_the_deadline(now: list[float]) -> None:
    deadline = Deadline(3.0)
    clock = AttemptClock(3.0, deadline)
    now[0] += 1.0  # waited 1 s for a free connection
    assert clock.remaining() == pytest.approx(2.0)  # not 3 s: the deadline has 2 s left
    now[0] += 2.0  # a ping of an idle connection used all of it
    assert clock.remaining() == pytest.approx(0.001)  # the reconnect after it: nothing left


def test_without_a_deadline_the_attempt_bound_applies(now: list[float]) -> None:
    clock = AttemptClock(3.0, None)
    now[0] += 5.0  # a long wait before the attempt's network work
    assert clock.remaining() == pytest.approx(3.0)
    now[0] += 1.0
    assert clock.remaining() == pytest.approx(2.0)
