"""Circuit breaker state machine: pure logic with a fake clock, no server."""

from __future__ import annotations

import json
import threading
import time

import pytest
from clickhouse_driver.errors import NetworkError, ServerException
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from structlog.testing import capture_logs

from chresilient.breaker import CircuitBreaker, CircuitState, Permit
from chresilient.config import CircuitBreakerConfig
from chresilient.errors import CircuitOpenError, ClickHouseUnavailableError

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(threshold=3, recovery=10.0, half_open=2, **kwargs):
    clock = FakeClock()
    transitions: list[tuple[str, CircuitState, CircuitState]] = []
    config = CircuitBreakerConfig(
        failure_threshold=threshold, recovery_timeout=recovery, half_open_max_calls=half_open
    )
    kwargs.setdefault("on_transition", lambda *t: transitions.append(t))
    breaker = CircuitBreaker(config, "ch-test", clock=clock, **kwargs)
    return breaker, clock, transitions


def fail(breaker: CircuitBreaker, n: int = 1, exc: BaseException | None = None) -> None:
    for _ in range(n):
        breaker.acquire().failure(exc or NetworkError("connection refused"))


def trip(breaker: CircuitBreaker, clock: FakeClock, *, half_open: bool = False) -> None:
    fail(breaker, breaker.config.failure_threshold)
    assert breaker.state is OPEN
    if half_open:
        clock.advance(10.0)
        assert breaker.state is HALF_OPEN


# -- closed state --------------------------------------------------------------------------


def test_state_enum_values():
    assert [s.value for s in CircuitState] == ["closed", "open", "half_open"]
    assert CircuitState("half_open") is HALF_OPEN and HALF_OPEN == "half_open"


def test_opens_after_threshold_consecutive_failures():
    breaker, _, transitions = make(threshold=3)
    fail(breaker, 2)
    assert breaker.state is CLOSED and breaker.consecutive_failures == 2
    fail(breaker)
    assert breaker.state is OPEN
    assert breaker.consecutive_failures == 3 and breaker.opens_total == 1
    assert transitions == [("ch-test", CLOSED, OPEN)]


def test_success_resets_the_failure_streak():
    breaker, _, _ = make(threshold=3)
    fail(breaker, 2)
    breaker.acquire().success()
    assert breaker.consecutive_failures == 0
    fail(breaker, 2)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_neutral_outcome_neither_counts_nor_resets_in_closed_state():
    breaker, _, _ = make(threshold=3)
    fail(breaker, 2)
    for _ in range(5):
        breaker.acquire().neutral()
    assert breaker.consecutive_failures == 2 and breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


# -- open state ----------------------------------------------------------------------------


def test_open_refuses_with_retry_after_and_last_error():
    breaker, clock, _ = make(recovery=10.0)
    last = NetworkError("boom")
    fail(breaker, 3, last)
    clock.advance(4.0)
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire()
    err = info.value
    assert isinstance(err, ClickHouseUnavailableError)
    assert err.breaker_name == "ch-test"
    assert err.retry_after == pytest.approx(6.0)
    assert err.last_error is last
    assert "ch-test" in str(err) and "6.0s" in str(err)
    assert breaker.retry_after == pytest.approx(6.0)
    assert breaker.last_error is last


def test_retry_after_is_zero_unless_open():
    breaker, clock, _ = make()
    assert breaker.retry_after == 0.0
    trip(breaker, clock, half_open=True)
    assert breaker.retry_after == 0.0


def test_lazy_half_open_on_state_read():
    breaker, clock, transitions = make(recovery=10.0)
    trip(breaker, clock)
    clock.advance(9.999)
    assert breaker.state is OPEN
    assert transitions == [("ch-test", CLOSED, OPEN)]
    clock.advance(0.001)
    # nothing happens until someone looks
    assert transitions == [("ch-test", CLOSED, OPEN)]
    assert breaker.state is HALF_OPEN
    assert transitions[-1] == ("ch-test", OPEN, HALF_OPEN)


def test_lazy_half_open_on_acquire():
    breaker, clock, transitions = make(recovery=10.0)
    trip(breaker, clock)
    clock.advance(10.0)
    permit = breaker.acquire()
    assert permit.trial
    assert transitions[-1] == ("ch-test", OPEN, HALF_OPEN)


def test_refusal_is_fast():
    breaker, clock, _ = make()
    trip(breaker, clock)
    start = time.perf_counter()
    for _ in range(10_000):
        with pytest.raises(CircuitOpenError):
            breaker.acquire()
    assert time.perf_counter() - start < 5.0  # a hang guard; the speed is benchmarked


# -- half-open state -----------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3])
def test_half_open_admits_at_most_max_calls_concurrently(limit):
    breaker, clock, _ = make(half_open=limit)
    trip(breaker, clock, half_open=True)
    threads_n = 16
    barrier = threading.Barrier(threads_n)
    permits: list[Permit] = []
    refused: list[CircuitOpenError] = []
    lock = threading.Lock()

    def worker():
        barrier.wait()
        try:
            permit = breaker.acquire()
        except CircuitOpenError as exc:
            with lock:
                refused.append(exc)
        else:
            with lock:
                permits.append(permit)

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(permits) == limit and len(refused) == threads_n - limit
    assert all(p.trial for p in permits)
    assert breaker.snapshot()["half_open_in_flight"] == limit
    for p in permits:
        p.success()
    assert breaker.state is CLOSED


def test_closes_after_enough_trial_successes():
    breaker, clock, transitions = make(half_open=3)
    trip(breaker, clock, half_open=True)
    for i in range(3):
        assert breaker.state is HALF_OPEN, i
        breaker.acquire().success()
    assert breaker.state is CLOSED
    assert breaker.consecutive_failures == 0
    assert transitions[-1] == ("ch-test", HALF_OPEN, CLOSED)
    # fully closed again: the streak starts from zero
    fail(breaker, 2)
    assert breaker.state is CLOSED


def test_trial_failure_reopens_and_restarts_timer():
    breaker, clock, transitions = make(half_open=2, recovery=10.0)
    trip(breaker, clock, half_open=True)
    first, second = breaker.acquire(), breaker.acquire()
    first.success()
    clock.advance(1.0)
    second.failure(EOFError())
    assert breaker.state is OPEN
    assert breaker.opens_total == 2
    assert breaker.retry_after == pytest.approx(10.0)
    assert isinstance(breaker.last_error, EOFError)
    assert transitions[-1] == ("ch-test", HALF_OPEN, OPEN)


def test_trial_failure_reopens_even_without_a_failure_streak():
    breaker, clock, _ = make(threshold=5)
    breaker.force_open()
    clock.advance(10.0)
    breaker.acquire().failure(NetworkError("x"))
    assert breaker.state is OPEN and breaker.opens_total == 2


def test_neutral_releases_half_open_slot_without_counting():
    breaker, clock, _ = make(half_open=1)
    trip(breaker, clock, half_open=True)
    permit = breaker.acquire()
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire()
    assert info.value.retry_after == 0.0
    permit.neutral()
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["half_open_in_flight"] == 0
    breaker.acquire().success()
    assert breaker.state is CLOSED


def test_permit_release_is_idempotent():
    breaker, clock, _ = make(half_open=2)
    trip(breaker, clock, half_open=True)
    permit = breaker.acquire()
    permit.neutral()
    permit.neutral()
    permit.failure(NetworkError("late"))  # after release: ignored
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["half_open_in_flight"] == 0
    permit.success()
    assert breaker.state is HALF_OPEN  # the earlier neutral was the only outcome

    closed, _, _ = make(threshold=2)
    p = closed.acquire()
    p.failure(NetworkError("x"))
    p.failure(NetworkError("x"))
    assert closed.consecutive_failures == 1 and closed.state is CLOSED


def test_stale_permits_are_ignored_after_a_transition():
    breaker, clock, _ = make(threshold=2, recovery=10.0)
    slow = breaker.acquire()  # issued while closed, finishes after the breaker opened
    fail(breaker, 2)
    clock.advance(5.0)
    slow.failure(NetworkError("late"))
    assert breaker.retry_after == pytest.approx(5.0)  # timer not restarted
    assert breaker.consecutive_failures == 2
    clock.advance(5.0)
    trial = breaker.acquire()
    breaker.force_open()
    trial.success()  # from the previous half-open episode
    assert breaker.state is OPEN


# -- probes, reset, force_open -------------------------------------------------------------


def test_probe_does_nothing_while_closed():
    breaker, _, transitions = make(threshold=2)
    app_error = NetworkError("app")
    fail(breaker, 1, app_error)
    for _ in range(5):
        breaker.record_probe(False, NetworkError("probe"))
    breaker.record_probe(True)
    assert breaker.state is CLOSED and breaker.consecutive_failures == 1
    assert breaker.last_error is app_error
    assert transitions == []


def test_successful_probe_closes_open_breaker():
    breaker, clock, transitions = make()
    trip(breaker, clock)
    breaker.record_probe(True)
    assert breaker.state is CLOSED and breaker.consecutive_failures == 0
    assert transitions[-1] == ("ch-test", OPEN, CLOSED)
    breaker.acquire().success()


def test_successful_probe_closes_half_open_breaker():
    breaker, clock, transitions = make(half_open=2)
    trip(breaker, clock, half_open=True)
    trial = breaker.acquire()
    breaker.record_probe(True)
    assert breaker.state is CLOSED
    trial.failure(NetworkError("late"))  # stale trial: does not reopen
    assert breaker.state is CLOSED and breaker.consecutive_failures == 0
    assert transitions[-1] == ("ch-test", HALF_OPEN, CLOSED)


def test_failed_probe_restarts_recovery_timer_while_open():
    breaker, clock, _ = make(recovery=10.0)
    trip(breaker, clock)
    clock.advance(8.0)
    probe_error = NetworkError("probe failed")
    breaker.record_probe(False, probe_error)
    assert breaker.retry_after == pytest.approx(10.0)
    assert breaker.last_error is probe_error
    clock.advance(9.0)
    assert breaker.state is OPEN
    clock.advance(1.0)
    assert breaker.state is HALF_OPEN
    assert breaker.opens_total == 1


def test_reset_and_force_open():
    breaker, clock, transitions = make(recovery=10.0)
    err = NetworkError("down")
    breaker.force_open(err)
    assert breaker.state is OPEN and breaker.last_error is err and breaker.opens_total == 1
    clock.advance(6.0)
    breaker.force_open()  # already open: timer restarts, no new transition
    assert breaker.retry_after == pytest.approx(10.0) and breaker.opens_total == 1
    assert breaker.last_error is err
    breaker.reset()
    assert breaker.state is CLOSED
    assert breaker.last_error is None and breaker.consecutive_failures == 0
    assert breaker.opens_total == 1  # a cumulative metric
    fail(breaker, 2)
    breaker.reset()
    assert breaker.consecutive_failures == 0
    assert transitions == [("ch-test", CLOSED, OPEN), ("ch-test", OPEN, CLOSED)]


# -- callbacks, logging, snapshot ----------------------------------------------------------


def test_on_transition_order_over_a_full_cycle():
    breaker, clock, transitions = make(half_open=1)
    trip(breaker, clock, half_open=True)
    breaker.acquire().failure(NetworkError("still down"))
    clock.advance(10.0)
    breaker.acquire().success()
    assert [(old, new) for _, old, new in transitions] == [
        (CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)
    ]


def test_callback_runs_outside_the_lock_and_its_errors_are_swallowed():
    seen: list[dict] = []
    holder: list[CircuitBreaker] = []

    def callback(name, old, new):
        seen.append(holder[0].snapshot())  # would deadlock if called under the lock
        raise RuntimeError("callback bug")

    breaker, clock, _ = make(on_transition=callback)
    holder.append(breaker)
    worker = threading.Thread(target=lambda: trip(breaker, clock), daemon=True)
    with capture_logs() as logs:
        worker.start()
        worker.join(5)
    assert not worker.is_alive(), "on_transition was called with the lock held"
    assert seen and seen[0]["state"] == "open"
    assert any(e["event"] == "circuit_breaker_callback_failed" for e in logs)


def test_transitions_are_logged_with_described_errors_only():
    breaker, clock, _ = make(half_open=1)
    secret = ServerException("DB::Exception: timeout\nstack trace with password=hunter2", code=209)
    with capture_logs() as logs:
        fail(breaker, 3, secret)
        clock.advance(10.0)
        breaker.acquire().success()
    events = [e["event"] for e in logs]
    assert events == ["circuit_breaker_opened", "circuit_breaker_half_open",
                      "circuit_breaker_closed"]
    opened = logs[0]
    assert opened["breaker"] == "ch-test" and opened["consecutive_failures"] == 3
    assert opened["last_error"] == "ServerException 209: timeout"
    for entry in logs:
        assert "hunter2" not in repr(entry)
        assert all(isinstance(v, (str, int, float, type(None))) for v in entry.values())


def test_snapshot_is_json_safe():
    breaker, clock, _ = make(half_open=2, recovery=10.0)
    snap = breaker.snapshot()
    assert snap["state"] == "closed" and snap["last_error"] is None
    fail(breaker, 3, ServerException("DB::Exception: too many\nmore", code=202))
    clock.advance(2.5)
    snap = breaker.snapshot()
    json.dumps(snap)
    assert snap == {
        "state": "open",
        "consecutive_failures": 3,
        "opens_total": 1,
        "half_open_in_flight": 0,
        "retry_after": 7.5,
        "last_error": "ServerException 202: too many",
        "last_state_change": 2.5,
    }
    clock.advance(7.5)
    breaker.acquire()
    snap = breaker.snapshot()
    assert snap["state"] == "half_open" and snap["half_open_in_flight"] == 1
    assert snap["last_state_change"] == 0.0
    json.dumps(snap)


# -- guard / record / decorator ------------------------------------------------------------


def test_guard_classifies_and_reraises():
    breaker, _, _ = make(threshold=2)
    with pytest.raises(ServerException), breaker.guard():
        raise ServerException("DB::Exception: Syntax error", code=62)
    assert breaker.consecutive_failures == 0
    with pytest.raises(NetworkError), breaker.guard():
        raise NetworkError("x")
    assert breaker.consecutive_failures == 1
    with breaker.guard() as permit:
        assert isinstance(permit, Permit)
    assert breaker.consecutive_failures == 0
    with pytest.raises(NetworkError), breaker.guard():
        raise NetworkError("x")
    with pytest.raises(EOFError), breaker.guard():
        raise EOFError()
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpenError), breaker.guard():
        pytest.fail("the block must not run while open")


def test_guard_auth_error_is_neutral_in_half_open():
    breaker, clock, _ = make(half_open=1)
    trip(breaker, clock, half_open=True)
    with pytest.raises(ServerException), breaker.guard():
        raise ServerException("DB::Exception: Authentication failed", code=516)
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["half_open_in_flight"] == 0


def test_record_helper():
    breaker, _, _ = make(threshold=2)
    breaker.record(breaker.acquire(), EOFError())
    breaker.record(breaker.acquire(), ServerException("x", code=62))
    assert breaker.consecutive_failures == 1
    breaker.record(breaker.acquire(), None)
    assert breaker.consecutive_failures == 0


def test_decorator():
    breaker, _, _ = make(threshold=2)
    calls: list[str] = []

    @breaker
    def query(kind: str) -> str:
        """Docstring kept."""
        calls.append(kind)
        if kind == "syntax":
            raise ServerException("x", code=62)
        if kind == "network":
            raise NetworkError("x")
        if kind == "eof":
            raise EOFError()
        return "ok"

    assert query.__name__ == "query" and query.__doc__ == "Docstring kept."
    assert query("fine") == "ok"
    for _ in range(3):
        with pytest.raises(ServerException):
            query("syntax")
    assert breaker.state is CLOSED
    with pytest.raises(NetworkError):
        query("network")
    with pytest.raises(EOFError):
        query("eof")
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpenError):
        query("fine")
    assert calls == ["fine", "syntax", "syntax", "syntax", "network", "eof"]


# -- property-based: random outcomes and clock advances --------------------------------------


class BreakerMachine(RuleBasedStateMachine):
    THRESHOLD, RECOVERY, HALF_OPEN_MAX = 3, 5.0, 2

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.epoch = 0  # bumped on every reported transition
        self.closed_failures = 0  # failures released by permits of the current closed epoch
        self.trial_successes = 0
        self.opened_at = self.clock.now
        self.last_action = ""
        self.outstanding: list[tuple[Permit, int]] = []
        config = CircuitBreakerConfig(self.THRESHOLD, self.RECOVERY, self.HALF_OPEN_MAX)
        self.breaker = CircuitBreaker(config, clock=self.clock, on_transition=self.on_transition)

    def on_transition(self, name: str, old: CircuitState, new: CircuitState) -> None:
        if (old, new) == (CLOSED, OPEN):
            assert self.closed_failures >= self.THRESHOLD
            assert self.breaker.consecutive_failures >= self.THRESHOLD
        if (old, new) == (HALF_OPEN, OPEN):
            assert self.last_action == "trial_failure"
        if (old, new) == (OPEN, HALF_OPEN):
            assert self.clock.now - self.opened_at >= self.RECOVERY
        if new is CLOSED:
            assert self.last_action == "probe_success" or (
                old is HALF_OPEN and self.trial_successes == self.HALF_OPEN_MAX
            )
            self.closed_failures = 0
        if new is OPEN:
            self.opened_at = self.clock.now
        self.trial_successes = 0
        self.epoch += 1

    @rule()
    def acquire(self) -> None:
        try:
            permit = self.breaker.acquire()
        except CircuitOpenError as exc:
            assert exc.retry_after >= 0
            assert self.breaker.state is OPEN or (
                self.breaker.snapshot()["half_open_in_flight"] == self.HALF_OPEN_MAX
            )
            return
        assert permit.trial == (self.breaker.state is HALF_OPEN)
        self.outstanding.append((permit, self.epoch))

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "failure", "neutral"]))
    def release(self, data: st.DataObject, outcome: str) -> None:
        index = data.draw(st.integers(0, len(self.outstanding) - 1))
        permit, epoch = self.outstanding.pop(index)
        current = epoch == self.epoch
        self.last_action = f"{'trial' if permit.trial else 'closed'}_{outcome}"
        if current and outcome == "failure" and not permit.trial:
            self.closed_failures += 1
        if current and outcome == "success" and permit.trial:
            self.trial_successes += 1
        if outcome == "failure":
            permit.failure(NetworkError("x"))
        else:
            getattr(permit, outcome)()
        if data.draw(st.booleans()):
            permit.success()  # a second release must change nothing

    @rule(seconds=st.floats(0, 8, allow_nan=False))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(success=st.booleans())
    def probe(self, success: bool) -> None:
        self.last_action = f"probe_{'success' if success else 'failure'}"
        was_open = self.breaker.retry_after > 0  # open, its recovery timer running
        self.breaker.record_probe(success, None if success else NetworkError("probe"))
        if was_open and not success:
            self.opened_at = self.clock.now

    @invariant()
    def trials_bounded(self) -> None:
        snap = self.breaker.snapshot()
        in_flight = snap["half_open_in_flight"]
        assert 0 <= in_flight <= self.HALF_OPEN_MAX
        # A trial counts against the cap until it ends, whatever period it began in.
        assert in_flight == sum(1 for p, _ in self.outstanding if p.trial)
        assert snap["retry_after"] >= 0
        json.dumps(snap)


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
TestBreakerMachine = BreakerMachine.TestCase
