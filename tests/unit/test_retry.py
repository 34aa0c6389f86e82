"""Retry policy, budget and loop: pure logic, no server."""

from __future__ import annotations

import socket

import pytest
from clickhouse_driver import errors as driver_errors

import chresilient
from chresilient import CircuitOpenError, ClickHouseUnavailableError
from chresilient.errors import ErrorKind, classify, trips_breaker
from chresilient.retry import CallStats, Deadline, RetryBudget, RetryPolicy, call_with_retry
from chresilient.statement import READ, Statement, is_write_query, query_verb


def test_backoff_full_jitter_bounds() -> None:
    policy = RetryPolicy(initial_delay=1.0, max_delay=30.0, exponential_base=2.0)
    for n, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (50, 30.0), (500, 30.0)]:
        assert policy.backoff(n, rng=lambda: 1.0) == pytest.approx(cap)
        assert policy.backoff(n, rng=lambda: 0.0) == 0.0
        assert 0.0 <= policy.backoff(n) <= cap


def test_backoff_without_jitter_and_slow_down() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=3.0, jitter=False)
    assert [policy.backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    jittered = RetryPolicy(initial_delay=0.5, max_delay=3.0)
    assert jittered.backoff(3, slow_down=True, rng=lambda: 0.0) == 2.0


def test_policy_is_immutable() -> None:
    with pytest.raises(AttributeError):
        RetryPolicy().max_attempts = 9  # type: ignore[misc]


def test_budget_caps_retries_to_share_of_calls() -> None:
    budget = RetryBudget(ratio=0.2, burst=3)
    assert [budget.withdraw() for _ in range(4)] == [True, True, True, False]
    for _ in range(10):
        budget.deposit()  # 10 calls -> 2 retries
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]
    assert budget.exhausted_total == 2
    for _ in range(100):
        budget.deposit()
    assert budget.tokens == 3  # never above the burst


def _no_sleep(delays: list[float]):
    def sleep(seconds: float) -> bool:
        delays.append(seconds)
        return True

    return sleep


def _flaky(failures: list[BaseException], result: str = "ok"):
    timeouts: list[float] = []

    def attempt(timeout: float) -> str:
        timeouts.append(timeout)
        if failures:
            raise failures.pop(0)
        return result

    return attempt, timeouts


def test_retries_transport_errors_then_succeeds() -> None:
    attempt, timeouts = _flaky([EOFError("eof"), driver_errors.NetworkError("refused")])
    delays: list[float] = []
    stats = CallStats()
    result = call_with_retry(
        attempt,
        policy=RetryPolicy(timeout_per_attempt=2.0),
        sleep=_no_sleep(delays),
        stats=stats,
    )
    assert result == "ok"
    assert (stats.attempts, stats.retries, len(delays)) == (3, 2, 2)
    assert all(0 < t <= 2.0 for t in timeouts)


def test_deterministic_error_is_raised_after_one_attempt() -> None:
    err = driver_errors.ServerException("syntax", code=62)
    attempt, timeouts = _flaky([err])
    stats = CallStats()
    with pytest.raises(driver_errors.ServerException) as info:
        call_with_retry(
            attempt,
            policy=RetryPolicy(),
            sleep=_no_sleep([]),
            stats=stats,
        )
    assert info.value is err
    assert stats.attempts == 1 and len(timeouts) == 1


def test_gives_up_after_max_attempts_with_last_error() -> None:
    attempt, timeouts = _flaky([socket.timeout("t")] * 10)
    with pytest.raises(ClickHouseUnavailableError) as info:
        call_with_retry(
            attempt,
            policy=RetryPolicy(max_attempts=3),
            sleep=_no_sleep([]),
        )
    assert info.value.attempts == 3 and len(timeouts) == 3
    assert isinstance(info.value.last_error, socket.timeout)
    assert "retries exhausted" in str(info.value)


def test_deadline_bounds_attempts_and_waits() -> None:
    attempt, timeouts = _flaky([socket.timeout("t")] * 100)
    delays: list[float] = []
    with pytest.raises(ClickHouseUnavailableError, match="deadline"):
        call_with_retry(
            attempt,
            policy=RetryPolicy(
                max_attempts=100, initial_delay=0.01, max_delay=0.02, timeout_per_attempt=5
            ),
            sleep=_no_sleep(delays),
            deadline=Deadline(0.0),
        )
    assert len(timeouts) == 1 and timeouts[0] == pytest.approx(0.001)
    assert not delays  # a spent deadline never waits before giving up
    # A deadline in the future cuts each attempt's bound down to what is left.
    attempt, timeouts = _flaky([])
    call_with_retry(
        attempt,
        policy=RetryPolicy(timeout_per_attempt=50),
        deadline=Deadline(3.0),
    )
    assert 2.5 < timeouts[0] <= 3.0


def test_budget_stops_retries() -> None:
    budget = RetryBudget(ratio=0.0, burst=1)
    attempt, _ = _flaky([EOFError()] * 10)
    with pytest.raises(ClickHouseUnavailableError, match="budget"):
        call_with_retry(
            attempt,
            policy=RetryPolicy(max_attempts=10),
            budget=budget,
            sleep=_no_sleep([]),
        )


def test_circuit_open_is_never_retried() -> None:
    attempt, timeouts = _flaky([CircuitOpenError("h", 1.0)] * 3)
    with pytest.raises(CircuitOpenError):
        call_with_retry(attempt, policy=RetryPolicy(), sleep=_no_sleep([]))
    assert len(timeouts) == 1


def test_interrupted_sleep_abandons_the_call() -> None:
    attempt, timeouts = _flaky([EOFError()] * 3)
    with pytest.raises(ClickHouseUnavailableError, match="closing"):
        call_with_retry(attempt, policy=RetryPolicy(), sleep=lambda s: False)
    assert len(timeouts) == 1


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (driver_errors.ServerException("x", code=62), ErrorKind.DETERMINISTIC),
        (driver_errors.ServerException("x", code=60), ErrorKind.DETERMINISTIC),
        (driver_errors.ServerException("x", code=159), ErrorKind.DETERMINISTIC),
        (driver_errors.ServerException("x", code=202), ErrorKind.TRANSIENT),
        (driver_errors.ServerException("x", code=252), ErrorKind.TRANSIENT),
        (driver_errors.ServerException("x", code=193), ErrorKind.AUTH),
        (driver_errors.ServerException("x", code=516), ErrorKind.AUTH),
        (driver_errors.NetworkError("x"), ErrorKind.TRANSPORT),
        (driver_errors.SocketTimeoutError("x"), ErrorKind.TRANSPORT),
        (ConnectionResetError(), ErrorKind.TRANSPORT),
        (EOFError(), ErrorKind.TRANSPORT),
        (socket.timeout(), ErrorKind.TRANSPORT),
        (CircuitOpenError("h", 1), ErrorKind.LOCAL),
        (ValueError("bad data"), ErrorKind.DETERMINISTIC),
    ],
)
def test_classify_table(exc: BaseException, kind: ErrorKind) -> None:
    assert classify(exc) is kind


def test_insert_retry_needs_dedup() -> None:
    policy, reset = RetryPolicy(), ConnectionResetError("reset")
    assert policy.is_retry(reset, READ)
    assert not policy.is_retry(reset, Statement(is_write=True))
    assert policy.is_retry(reset, Statement(is_write=True, deduplicated=True))
    assert not policy.is_retry(reset, Statement(is_write=False, replayable=False))
    assert not policy.is_retry(driver_errors.ServerException("syntax", code=62), READ)
    assert not policy.is_retry(driver_errors.ServerException("auth", code=516), READ)


def test_statement_of_a_call() -> None:
    assert Statement.of("SELECT 1") == READ
    assert Statement.of("INSERT INTO t VALUES", [(1,)]).is_write
    token = {"insert_deduplication_token": "b1"}
    asked: list[bool] = []

    def supported() -> bool:
        asked.append(True)
        return True

    assert Statement.of("INSERT INTO t VALUES", [(1,)], token, supported).deduplicated
    assert not Statement.of("INSERT INTO t VALUES", [(1,)], token).deduplicated
    assert not Statement.of("SELECT 1", None, token, supported).deduplicated
    assert len(asked) == 1  # only a write with a token asks the server's features
    assert not Statement.of("INSERT INTO t VALUES", iter([(1,)])).replayable


@pytest.mark.parametrize(
    ("query", "verb", "write"),
    [
        ("SELECT 1", "select", False),
        ("  (SELECT 1)", "select", False),
        ("WITH 1 AS x SELECT x", "with", False),
        ("/* tag */ SELECT 1", "select", False),
        ("-- note\nshow tables", "show", False),
        ("DESCRIBE t", "describe", False),
        ("INSERT INTO t VALUES", "insert", True),
        ("/* tag */ INSERT INTO t SELECT 1", "insert", True),
        ("-- c\nINSERT INTO t SELECT 1", "insert", True),
        ("ALTER TABLE t UPDATE n = n + 1 WHERE 1", "alter", True),
        ("CREATE TABLE t (x UInt8) ENGINE = Memory", "create", True),
        ("OPTIMIZE TABLE t FINAL", "optimize", True),
        ("", "", True),
    ],
)
def test_only_known_reads_are_repeatable(query: str, verb: str, write: bool) -> None:
    assert query_verb(query) == verb
    assert is_write_query(query, None) is write
    assert is_write_query("SELECT 1", [(1,)]) is True  # list params are INSERT data


@pytest.mark.parametrize(
    ("code", "repeat"),
    # 252/242/225 may come from a view's target after the source table took the rows.
    [
        (202, True),
        (203, True),
        (252, False),
        (242, False),
        (225, False),
        (244, False),
        (999, False),
        (241, False),
        (319, False),
    ],
)
def test_writes_repeat_only_what_the_server_refused_up_front(code: int, repeat: bool) -> None:
    exc = driver_errors.ServerException("x", code=code)
    policy = RetryPolicy()
    assert policy.is_retry(exc, Statement(is_write=True)) is repeat
    assert policy.is_retry(exc, Statement(is_write=True, deduplicated=True))


@pytest.mark.parametrize("code", [225, 242, 244, 999])
def test_zookeeper_refusals_are_transient_and_never_trip_the_breaker(code: int) -> None:
    """docs/cluster.md: writes refused while ZooKeeper is away are spooled (transient), not
    repeated live, and do not open the breaker, so reads keep working."""
    exc = driver_errors.ServerException("x", code=code)
    assert classify(exc) is ErrorKind.TRANSIENT
    assert trips_breaker(exc) is False
    assert RetryPolicy().is_retry(exc, Statement(is_write=True)) is False
    assert trips_breaker(driver_errors.ServerException("x", code=202)) is True  # the contrast


def test_every_exported_exception_is_a_driver_error() -> None:
    """README: existing `except clickhouse_driver.errors.Error` clauses keep working."""
    exported = [
        obj
        for obj in (getattr(chresilient, name) for name in chresilient.__all__)
        if isinstance(obj, type) and issubclass(obj, BaseException)
    ]
    assert len(exported) >= 15
    for cls in exported:
        assert issubclass(cls, driver_errors.Error), cls
