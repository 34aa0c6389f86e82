"""Every wait is bounded by the call's deadline, and one caller never affects another.

Against real servers. A time bound here asserts a deadline the library promises; the slack
over the promised bound covers scheduling on a busy 2-core machine, and the old behaviour
(a multiple of the bound) stays far outside it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from helpers import make_config, tcp_connections, wait_until

from chresilient import (
    CircuitBreakerConfig,
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    ConnectionPoolConfig,
    PoolTimeoutError,
    RetryConfig,
    SessionStateError,
)
from chresilient.breaker import CircuitBreaker, CircuitState


def test_pool_wait_is_bounded_by_the_deadline(clickhouse: Any) -> None:
    cfg = make_config(
        clickhouse,
        retry=RetryConfig(timeout_per_attempt=3.0, total_timeout=1.0),
        pool=ConnectionPoolConfig(pool_size=1, max_connections=1, connection_timeout=8.0),
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        held = mgr.execute_iter("SELECT number FROM system.numbers LIMIT 2")
        assert next(held) == (0,)
        started = time.monotonic()
        with pytest.raises(PoolTimeoutError) as info:
            mgr.execute("SELECT 1")
        took = time.monotonic() - started
        assert "within 1.0s" in str(info.value)  # min(pool_timeout 8 s, 1 s left)
        assert took < 5.0  # a hang guard (5x the 1 s wait); the message shows the bound used
        assert list(held) == [(1,)]


def test_idle_ping_and_reconnect_fit_inside_the_deadline(clickhouse_server: Any) -> None:
    cfg = make_config(
        clickhouse_server,
        retry=RetryConfig(
            max_attempts=1, timeout_per_attempt=3.0, total_timeout=3.0, initial_delay=0.01
        ),
        # Every checkout pings (the connection counts as idle at once).
        pool=ConnectionPoolConfig(ping_after_idle=0.0),
        spool_enabled=False,
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        assert mgr.execute("SELECT 1") == [(1,)]
        clickhouse_server.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(ClickHouseUnavailableError):
                mgr.execute("SELECT 1")
            took = time.monotonic() - started
        finally:
            clickhouse_server.thaw()
        # A hang guard (5x); the bound itself is shown by the attempt clock's unit test.
        assert took < 15.0, f"a 3 s deadline took {took:.1f} s"


def test_reconnect_closes_connections_that_were_checked_out(
    clickhouse: Any, client: Any
) -> None:
    before = tcp_connections(client)
    with ClickHouseConnectionManager(make_config(clickhouse, spool_enabled=False)) as mgr:
        held = mgr.execute_iter("SELECT number FROM system.numbers LIMIT 2")
        assert next(held) == (0,)
        assert tcp_connections(client) - before == 1
        replaced = mgr.hosts[0].pool.queue_pool  # kept alive: the GC must not be what closes
        assert mgr.reconnect()["reconnected"] is True  # its probe opens a new connection
        assert tcp_connections(client) - before == 2
        assert list(held) == [(1,)]  # the stream's connection comes back: closed, not kept
        wait_until(
            lambda: tcp_connections(client) - before == 1, timeout=10, what="the old socket"
        )
        assert mgr.metrics()["idle"] == 1
        del replaced


def test_an_old_half_open_trial_still_counts_against_the_cap() -> None:
    now = [0.0]
    cfg = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=1.0, half_open_max_calls=1)
    breaker = CircuitBreaker(cfg, clock=lambda: now[0])
    breaker.acquire().failure(ConnectionError("down"))
    now[0] += 1.5
    slow_trial = breaker.acquire()  # half-open: the one trial allowed
    assert slow_trial.trial
    other = breaker.acquire
    with pytest.raises(ClickHouseUnavailableError):
        other()
    breaker.force_open(ConnectionError("a probe saw it down"))  # a new period begins
    now[0] += 1.5  # half-open again while the slow trial is still in flight
    with pytest.raises(ClickHouseUnavailableError):
        breaker.acquire()  # still capped: the old trial is in flight
    slow_trial.failure(TimeoutError("slow"))  # stale: it does not reopen the new period
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.acquire().success()
    assert breaker.state is CircuitState.CLOSED


def test_session_state_statements_are_refused_with_advice(clickhouse: Any) -> None:
    with ClickHouseConnectionManager(make_config(clickhouse, spool_enabled=False)) as mgr:
        for statement in (
            "USE system",
            "  use system",
            "/* x */ SET max_result_rows = 5",
            "SET max_block_size=1, result_overflow_mode='break'",
            "CREATE TEMPORARY TABLE leak (x String)",
            "create  temporary table if not exists leak (x String)",
            "DROP TEMPORARY TABLE leak",
        ):
            with pytest.raises(SessionStateError) as info:
                mgr.execute(statement)
            assert any(w in str(info.value) for w in ("settings=", "database", "external_tables"))
        assert mgr.metrics()["queries_total"] == 0  # refused before any connection
        assert mgr.metrics()["connection_attempts"] == 0
        # What only looks like it: a setting per query, names that are words.
        assert mgr.execute("SELECT 1 SETTINGS max_threads = 1") == [(1,)]
        assert mgr.execute("SELECT 1 AS use, 2 AS set") == [(1, 2)]


def test_no_session_state_leaks_between_32_threads(clickhouse: Any) -> None:
    pool = ConnectionPoolConfig(pool_size=2, max_connections=4)
    cfg = make_config(clickhouse, pool=pool, spool_enabled=False)
    limited = {"max_result_rows": 5, "result_overflow_mode": "break", "max_block_size": 1}
    wrong: list[Any] = []
    with ClickHouseConnectionManager(cfg) as mgr:

        def worker(n: int) -> None:
            for _ in range(20):
                if n % 2:
                    rows = mgr.execute("SELECT number FROM system.numbers LIMIT 100",
                                       settings=limited)
                    if not 5 <= len(rows) < 100:
                        wrong.append(("limited", len(rows)))
                    with pytest.raises(SessionStateError):
                        mgr.execute("USE system")
                else:
                    rows = mgr.execute("SELECT number FROM system.numbers LIMIT 100")
                    if len(rows) != 100:
                        wrong.append(("plain", len(rows)))
                    database = mgr.execute("SELECT currentDatabase()")[0][0]
                    if database != cfg.database:
                        wrong.append(("database", database))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(t.is_alive() for t in threads)
    assert not wrong, wrong[:5]


def test_a_restarted_server_is_seen_within_seconds_with_default_timings(
    clickhouse_server: Any,
) -> None:
    # Defaults: health_check_interval 60 s, recovery_timeout 30 s. Before, an open breaker
    # was probed every recovery_timeout / 2 = 15 s, so the backend answered 503 that long.
    cfg = make_config(
        clickhouse_server,
        retry=RetryConfig(max_attempts=1, timeout_per_attempt=2.0, total_timeout=2.0),
        breaker=CircuitBreakerConfig(failure_threshold=2),
        pool=ConnectionPoolConfig(),
        spool_enabled=False,
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        mgr.start(wait=True, timeout=10)
        clickhouse_server.kill()
        for _ in range(2):
            with pytest.raises(ClickHouseUnavailableError):
                mgr.execute("SELECT 1")
        assert mgr.health()["status"] == "unhealthy"
        # The monitor keeps probing the open breaker's host every 0.5-2 s (before: one
        # probe when the breaker opened, the next 15 s later). A count, not a stopwatch.
        wait_until(
            lambda: mgr.monitor.probe_failures_total >= 3, timeout=15, what="repeated probes"
        )
        clickhouse_server.start()
        wait_until(lambda: mgr.health()["status"] == "healthy", timeout=30, what="recovery")
        assert mgr.metrics()["queries_total"] == 2  # the monitor found it, not a call


def test_an_empty_stream_gives_its_connection_back(clickhouse: Any) -> None:
    with ClickHouseConnectionManager(make_config(clickhouse, spool_enabled=False)) as mgr:
        assert mgr.execute("SELECT 1") == [(1,)]
        before = mgr.metrics()
        for _ in range(5):
            assert list(mgr.execute_iter("SELECT 1 WHERE 0")) == []
        after = mgr.metrics()
        assert after["connection_attempts"] == before["connection_attempts"]
        assert after["pool_invalidations"] == before["pool_invalidations"] == 0
        assert after["pool_hits"] - before["pool_hits"] == 5


def test_close_ends_a_dependency_check_stuck_on_a_frozen_server(clickhouse_server: Any) -> None:
    cfg = make_config(clickhouse_server, health_probe_timeout=20.0, spool_enabled=False)
    mgr = ClickHouseConnectionManager(cfg)
    mgr.start(wait=True, timeout=10)
    clickhouse_server.freeze()
    try:
        with pytest.raises(TimeoutError):
            mgr.validate_service_dependencies(timeout=1.0)  # goes on in its own thread
        assert any(t.name == "chresilient-dependencies" for t in threading.enumerate())
        mgr.close()
        wait_until(
            lambda: not any(t.name.startswith("chresilient") for t in threading.enumerate()),
            timeout=5.0,  # the check's own timeout is 20 s
            what="the check to end with close()",
        )
    finally:
        clickhouse_server.thaw()
        mgr.close()


def test_reconnect_is_bounded_by_the_deadline_across_hosts(clickhouse_server: Any) -> None:
    # Two host entries for one frozen server: each check would wait its full 2 s bound.
    cfg = make_config(
        clickhouse_server,
        host="127.0.0.1",
        alt_hosts=(("localhost", clickhouse_server.port),),
        retry=RetryConfig(timeout_per_attempt=2.0, total_timeout=2.0),
        spool_enabled=False,
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        clickhouse_server.freeze()
        try:
            started = time.monotonic()
            report = mgr.reconnect()
            took = time.monotonic() - started
        finally:
            clickhouse_server.thaw()
        assert report["reconnected"] is False
        assert took < 10.0, f"reconnect took {took:.1f} s for a 2 s deadline"  # hang guard


def test_a_failed_probe_is_retried_soon_even_with_closed_breakers(clickhouse_server: Any) -> None:
    # Default interval (60 s): the app starts before ClickHouse; no call opens a breaker.
    clickhouse_server.stop()
    cfg = make_config(clickhouse_server, pool=ConnectionPoolConfig(), spool_enabled=False)
    with ClickHouseConnectionManager(cfg) as mgr:
        mgr.start(wait=True, timeout=0.5, required=False)
        assert mgr.health()["status"] == "unhealthy"
        # Probes repeat every 0.5-2 s while nothing answers (before: every 60 s).
        wait_until(
            lambda: mgr.monitor.probe_failures_total >= 3, timeout=15, what="repeated probes"
        )
        clickhouse_server.start()
        wait_until(lambda: mgr.health()["status"] == "healthy", timeout=30, what="recovery")
        assert mgr.metrics()["queries_total"] == 0
