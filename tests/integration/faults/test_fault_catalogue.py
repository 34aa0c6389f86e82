"""The fault catalogue of design.md, one test per entry, each fault real.

Each test states what the caller sees (result or exception, within what time), how many
attempts were made, the breaker state afterwards and the metrics. Entries 12 and 13 (the
spool) live in the spool's tests; docs/reliability.md maps every entry to its test.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import structlog
from clickhouse_driver import Client
from clickhouse_driver import errors as driver_errors
from helpers import (
    in_thread,
    make_config,
    start_local_server,
    wait_for_recovery,
    wait_running,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from chresilient import (
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    ConnectFailedError,
    RetryConfig,
    StartupError,
)
from chresilient.errors import ErrorKind, classify, describe
from chresilient.observability.prometheus import exposition

pytestmark = pytest.mark.faults


def _patient(server: Any, **changes: Any) -> ClickHouseConnectionManager:
    """A manager that keeps retrying for a while, with a breaker that stays out of the way."""
    defaults: dict[str, Any] = dict(
        retry=RetryConfig(
            max_attempts=30,
            initial_delay=0.1,
            max_delay=0.3,
            timeout_per_attempt=3.0,
            total_timeout=20.0,
        ),
        breaker=CircuitBreakerConfig(failure_threshold=50, recovery_timeout=1.0),
    )
    defaults.update(changes)
    return ClickHouseConnectionManager(make_config(server, **defaults))


def test_f01_server_not_started_yet_startup_gate_waits(clickhouse_server: Any) -> None:
    clickhouse_server.stop()
    mgr = ClickHouseConnectionManager(make_config(clickhouse_server))
    try:
        with structlog.testing.capture_logs() as logs:
            thread, box = in_thread(lambda: mgr.start(wait=True, timeout=30))
            time.sleep(2.0)
            assert thread.is_alive(), "start() returned before the server was up"
            clickhouse_server.start()  # returns once the server answers SELECT 1
            ready = time.monotonic()
            thread.join(timeout=30)
            gate_lag = time.monotonic() - ready
        assert not thread.is_alive() and "error" not in box, box
        assert gate_lag < 1.5  # the backend comes up soon after ClickHouse is ready
        assert box["elapsed"] >= 2.0
        waits = [e for e in logs if e["event"] == "waiting_for_clickhouse"]
        assert waits and all("refused" in e["reason"] for e in waits)
        assert [e["attempt"] for e in waits] == sorted(e["attempt"] for e in waits)
        # Backoff is capped low but not hammering: at most ~2 attempts per second waited.
        assert len(waits) <= 2 * box["elapsed"] + 4
        assert mgr.execute("SELECT 1") == [(1,)]
        assert mgr.health()["status"] == "healthy"
    finally:
        mgr.close()


def test_f02_killed_while_idle(clickhouse_server: Any) -> None:
    cfg = make_config(
        clickhouse_server,
        retry=RetryConfig(
            max_attempts=3, initial_delay=0.05, max_delay=0.1, timeout_per_attempt=2.0
        ),
        breaker=CircuitBreakerConfig(failure_threshold=3, recovery_timeout=1.0),
    )
    mgr = ClickHouseConnectionManager(cfg)
    try:
        _warm(mgr, 3)
        clickhouse_server.kill()
        started = time.monotonic()
        with pytest.raises(ClickHouseUnavailableError) as info:
            mgr.execute("SELECT 1")
        assert time.monotonic() - started < 5.0
        assert info.value.attempts == 3
        assert classify(info.value.last_error) is ErrorKind.TRANSPORT  # type: ignore[arg-type]
        assert "refused" in describe(info.value.last_error).lower()  # type: ignore[arg-type]
        assert mgr.hosts[0].breaker.state is CircuitState.OPEN
        assert mgr.metrics()["circuit_breaker_opens"] == 1
        assert _breaker_gauge(mgr) == 2.0  # Prometheus: 2 open
        with pytest.raises(CircuitOpenError):
            mgr.execute("SELECT 1")
        clickhouse_server.start()
        time.sleep(1.1)  # recovery_timeout: the next call is a trial
        assert _breaker_gauge(mgr) == 1.0  # half-open
        for _ in range(3):  # half_open_max_calls (3) successful trials close it
            assert mgr.execute("SELECT 1") == [(1,)]
        assert _breaker_gauge(mgr) == 0.0  # closed
    finally:
        mgr.close()


def _breaker_gauge(mgr: ClickHouseConnectionManager) -> float:
    """``chresilient_circuit_breaker_state`` of the manager's one host, as scraped."""
    text = exposition(mgr)[0].decode()
    (family,) = [f for f in text_string_to_metric_families(text)
                 if f.name == "chresilient_circuit_breaker_state"]  # fmt: skip
    (sample,) = family.samples
    assert sample.labels == {"host": mgr.hosts[0].label}
    return float(sample.value)


def test_f03_killed_mid_query_read_is_retried(clickhouse_server: Any) -> None:
    mgr = _patient(clickhouse_server)
    try:
        assert mgr.execute("SELECT 1") == [(1,)]
        thread, box = in_thread(lambda: mgr.execute("SELECT sleep(2)"))
        wait_running(clickhouse_server, "SELECT sleep(2)")
        clickhouse_server.kill()
        time.sleep(0.3)
        clickhouse_server.start()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert box.get("result") == [(0,)], box
        metrics = mgr.metrics()
        assert metrics["retry_attempts"] >= 1
        assert metrics["query_errors_total"] == 0
    finally:
        mgr.close()


def _warm(mgr: ClickHouseConnectionManager, n: int) -> None:
    """Make the pool hold ``n`` open connections."""
    barrier = threading.Barrier(n)

    def hold() -> None:
        barrier.wait(timeout=10)
        mgr.execute("SELECT sleep(0.2)")

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert mgr.metrics()["idle"] == n


def test_f04_restart_between_queries_is_invisible_to_reads(clickhouse_server: Any) -> None:
    mgr = ClickHouseConnectionManager(make_config(clickhouse_server))
    try:
        _warm(mgr, 5)
        stats = mgr.hosts[0].pool.stats
        connects = stats.connects
        assert connects == 5
        clickhouse_server.restart()
        for i in range(20):
            assert mgr.execute("SELECT %(i)s", {"i": i}) == [(i,)]
        metrics = mgr.metrics()
        assert metrics["query_errors_total"] == 0
        assert metrics["circuit_breaker_state"] == "closed"
        # The stale sockets were found by the liveness check, not by failing queries.
        assert metrics["retry_attempts"] == 0
        # The first stale socket found recycled the whole pool at once (one invalidation,
        # not one per stale socket); the others were replaced without a peek each.
        assert metrics["pool_invalidations"] == 1
        assert 1 <= stats.connects - connects <= 5
    finally:
        mgr.close()


def test_f05_frozen_between_queries_is_bounded_then_fails_fast(clickhouse_server: Any) -> None:
    cfg = make_config(
        clickhouse_server,
        retry=RetryConfig(
            max_attempts=3,
            initial_delay=0.05,
            max_delay=0.2,
            timeout_per_attempt=1.0,
            total_timeout=30.0,
        ),
        breaker=CircuitBreakerConfig(failure_threshold=3, recovery_timeout=1.0),
    )
    mgr = ClickHouseConnectionManager(cfg)
    try:
        assert mgr.execute("SELECT 1") == [(1,)]
        clickhouse_server.freeze()
        started = time.monotonic()
        with pytest.raises(ClickHouseUnavailableError) as info:
            mgr.execute("SELECT 1")
        elapsed = time.monotonic() - started
        assert info.value.attempts == 3
        assert classify(info.value.last_error) is ErrorKind.TRANSPORT  # type: ignore[arg-type]
        assert elapsed < 20.0, elapsed  # never hangs: 3 attempts of 1 s, not the driver's 300 s
        assert mgr.hosts[0].breaker.state is CircuitState.OPEN

        attempts = mgr.metrics()["connection_attempts"]
        for _ in range(50):
            with pytest.raises(CircuitOpenError):
                mgr.execute("SELECT 1")
        assert mgr.metrics()["connection_attempts"] == attempts  # refused without the network

        clickhouse_server.thaw()
        time.sleep(1.2)  # recovery_timeout
        assert mgr.execute("SELECT 1") == [(1,)]
        for _ in range(3):
            mgr.execute("SELECT 1")
        assert mgr.hosts[0].breaker.state is CircuitState.CLOSED
    finally:
        clickhouse_server.thaw()
        mgr.close()


def test_f09_wrong_password_fails_fast_without_leaking(clickhouse_server: Any) -> None:
    secret = clickhouse_server.password + "-wrong"
    cfg = make_config(clickhouse_server, user=clickhouse_server.tester_user, password=secret)
    mgr = ClickHouseConnectionManager(cfg)
    messages: list[str] = []
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(5):
                with pytest.raises(driver_errors.ServerException) as info:
                    mgr.execute("SELECT 1")
                assert info.value.code in (193, 516)
                assert classify(info.value) is ErrorKind.AUTH
                messages += [str(info.value), repr(info.value)]
            started = time.monotonic()
            with pytest.raises(StartupError, match="authentication") as startup:
                mgr.start(wait=True, timeout=30)
            assert time.monotonic() - started < 10  # at once, not after the 30 s wait
            messages += [str(startup.value), repr(startup.value)]
        metrics = mgr.metrics()
        assert metrics["connection_attempts"] == 6  # one per call, no retry storm
        assert metrics["retry_attempts"] == 0
        assert metrics["circuit_breaker_state"] == "closed"
        messages += [repr(mgr.config), str(mgr.config), repr(metrics), repr(mgr.health())]
        messages += [repr(entry) for entry in logs]
        for text in messages:
            assert secret not in text
            assert clickhouse_server.password not in text
    finally:
        mgr.close()

    good = ClickHouseConnectionManager(
        make_config(
            clickhouse_server,
            user=clickhouse_server.tester_user,
            password=clickhouse_server.password,
        )
    )
    try:
        assert good.execute("SELECT 7") == [(7,)]
    finally:
        good.close()


def test_f07_insert_cut_mid_way_is_not_repeated_without_dedup(
    clickhouse: Any, fault_proxy: Any
) -> None:
    table = f"ins_{uuid.uuid4().hex[:8]}"
    direct = ClickHouseConnectionManager(make_config(clickhouse))
    direct.execute(f"CREATE TABLE {table} (x UInt32) ENGINE = MergeTree ORDER BY x")
    proxied = ClickHouseConnectionManager(
        make_config(
            fault_proxy,
            auth=clickhouse,
            retry=RetryConfig(
                max_attempts=4, initial_delay=0.01, max_delay=0.05, timeout_per_attempt=2.0
            ),
        )
    )
    try:
        assert proxied.execute(f"INSERT INTO {table} VALUES", [(1,), (2,)]) == 2
        # Cut after the handshake, while the rows are on the wire: the outcome is unknown.
        fault_proxy.reset(after_bytes=4096)
        with pytest.raises(ClickHouseUnavailableError) as info:
            proxied.execute(f"INSERT INTO {table} VALUES", [(n,) for n in range(3, 20_003)])
        assert info.value.attempts == 1  # outcome unknown: not repeated
        assert not isinstance(info.value.last_error, ConnectFailedError)
        fault_proxy.reset()  # now every connect is cut: nothing is sent
        with pytest.raises(ClickHouseUnavailableError) as info:
            proxied.execute("SELECT 1")
        assert info.value.attempts == 4  # reads are repeated
        assert classify(info.value.last_error) is ErrorKind.TRANSPORT  # type: ignore[arg-type]
        fault_proxy.pass_through()
        wait_for_recovery(proxied)
        assert proxied.execute("SELECT 5") == [(5,)]
        assert direct.execute(f"SELECT count() FROM {table}") == [(2,)]
        # The same cut under insert(): one attempt, then the batch goes to the spool.
        fault_proxy.reset(after_bytes=4096)
        retries = proxied.metrics()["retry_attempts"]
        result = proxied.insert(table, [(n,) for n in range(30_000, 50_000)], ["x"])
        assert result.spooled and not result.delivered
        assert proxied.metrics()["retry_attempts"] == retries  # not repeated
        assert direct.execute(f"SELECT count() FROM {table}") == [(2,)]
        fault_proxy.pass_through()
        wait_for_recovery(proxied)
        assert proxied.spool is not None and proxied.spool.replay().batches == 1
        assert direct.execute(f"SELECT count() FROM {table}") == [(20_002,)]
    finally:
        direct.execute(f"DROP TABLE {table}")
        direct.close()
        proxied.close()


def test_f05_frozen_mid_query_is_bounded(clickhouse_server: Any) -> None:
    cfg = make_config(
        clickhouse_server,
        retry=RetryConfig(
            max_attempts=2, initial_delay=0.05, max_delay=0.1, timeout_per_attempt=1.0
        ),
    )
    mgr = ClickHouseConnectionManager(cfg)
    try:
        assert mgr.execute("SELECT 1") == [(1,)]
        thread, box = in_thread(lambda: mgr.execute("SELECT sleep(2)"))
        wait_running(clickhouse_server, "SELECT sleep(2)")
        clickhouse_server.freeze()
        thread.join(timeout=15)
        assert not thread.is_alive(), "a call on a frozen server hung"
        assert isinstance(box.get("error"), ClickHouseUnavailableError), box
        assert box["error"].attempts == 2
        assert box["elapsed"] < 10.0  # two 1 s attempts, not the driver's 300 s
    finally:
        clickhouse_server.thaw()
        mgr.close()


def test_f06_port_refuses(clickhouse: Any, fault_proxy: Any) -> None:
    cfg = make_config(
        fault_proxy,
        auth=clickhouse,
        retry=RetryConfig(
            max_attempts=3, initial_delay=0.02, max_delay=0.05, timeout_per_attempt=2.0
        ),
        breaker=CircuitBreakerConfig(failure_threshold=5, recovery_timeout=0.5),
    )
    mgr = ClickHouseConnectionManager(cfg)
    try:
        assert mgr.execute("SELECT 1") == [(1,)]
        fault_proxy.refuse()
        fault_proxy.reset_active()
        started = time.monotonic()
        with pytest.raises(ClickHouseUnavailableError) as info:
            mgr.execute("SELECT 1")
        assert time.monotonic() - started < 5.0  # refusals are immediate (3 x 2 s timeouts)
        assert info.value.attempts == 3
        assert "refused" in describe(info.value.last_error).lower()  # type: ignore[arg-type]
        assert mgr.hosts[0].breaker.consecutive_failures == 3
        with pytest.raises(ClickHouseUnavailableError):
            mgr.execute("SELECT 1")
        assert mgr.hosts[0].breaker.state is CircuitState.OPEN
        fault_proxy.pass_through()
        time.sleep(0.6)
        assert mgr.execute("SELECT 1") == [(1,)]
    finally:
        mgr.close()


def test_f07_reset_mid_result_read_is_retried(clickhouse: Any, fault_proxy: Any) -> None:
    mgr = _patient(fault_proxy, auth=clickhouse)
    try:
        assert mgr.execute("SELECT 1") == [(1,)]
        fault_proxy.reset(after_bytes=200_000, times=1)  # one connection cut mid-result
        rows = mgr.execute("SELECT number FROM system.numbers LIMIT 1000000")
        assert len(rows) == 1_000_000 and rows[-1] == (999_999,)
        metrics = mgr.metrics()
        assert metrics["retry_attempts"] >= 1
        assert metrics["query_errors_total"] == 0
    finally:
        mgr.close()


def test_f08_added_latency(clickhouse: Any, fault_proxy: Any) -> None:
    mgr = _patient(
        fault_proxy,
        auth=clickhouse,
        retry=RetryConfig(
            max_attempts=2, initial_delay=0.05, max_delay=0.1, timeout_per_attempt=1.0
        ),
    )
    try:
        assert mgr.execute("SELECT 1") == [(1,)]
        fault_proxy.delay(0.2)
        started = time.monotonic()
        assert mgr.execute("SELECT 2") == [(2,)]
        assert time.monotonic() - started >= 0.2
        assert mgr.metrics()["retry_attempts"] == 0  # slower, but inside the attempt bound
        fault_proxy.delay(1.5)  # beyond timeout_per_attempt
        started = time.monotonic()
        with pytest.raises(ClickHouseUnavailableError) as info:
            mgr.execute("SELECT 3")
        assert info.value.attempts == 2
        # Each attempt was cut by its 1 s bound (a socket timeout), not waited out.
        cause = info.value.last_error
        if isinstance(cause, ConnectFailedError):  # the second attempt's connect timed out
            cause = cause.last_error
        assert isinstance(cause, (driver_errors.SocketTimeoutError, OSError))
        assert time.monotonic() - started < 10  # hang guard
    finally:
        mgr.close()


def test_f10_syntax_error_and_unknown_table_make_one_attempt(clickhouse: Any) -> None:
    manager = ClickHouseConnectionManager(make_config(clickhouse))
    try:
        _one_attempt_each(manager)
    finally:
        manager.close()


def _one_attempt_each(manager: ClickHouseConnectionManager) -> None:
    manager.execute("SELECT 1")
    before = manager.metrics()
    for query, code in (("SELEC 1", 62), ("SELECT * FROM no_such_table_xyz", 60)):
        with pytest.raises(driver_errors.ServerException) as info:
            manager.execute(query)
        assert info.value.code == code
        assert classify(info.value) is ErrorKind.DETERMINISTIC
    after = manager.metrics()
    checkouts = lambda m: m["pool_hits"] + m["pool_misses"]  # noqa: E731
    assert checkouts(after) - checkouts(before) == 2  # one attempt each
    assert after["retry_attempts"] == before["retry_attempts"]
    assert after["circuit_breaker_state"] == "closed"
    assert after["consecutive_failures"] == 0
    assert manager.execute("SELECT 2") == [(2,)]


def test_f11_too_many_simultaneous_queries_is_retried() -> None:
    # The limit is the query's own setting (max_concurrent_queries_for_user), so a watcher
    # without it can see on the server that both blockers run before the call is made.
    server = start_local_server()
    patient = RetryConfig(
        max_attempts=60,
        initial_delay=0.1,
        max_delay=0.3,
        timeout_per_attempt=3.0,
        total_timeout=30.0,
        budget_burst=100.0,
    )
    mgr = _patient(server, retry=patient)
    blockers = [Client(server.host, port=server.port) for _ in range(2)]
    watcher = Client(server.host, port=server.port)
    running = "SELECT count() FROM system.processes WHERE query LIKE 'SELECT sleep(1.5)%'"
    try:
        assert mgr.execute("SELECT 1") == [(1,)]  # connected before the slots are taken
        threads = [
            threading.Thread(target=c.execute, args=("SELECT sleep(1.5)",), daemon=True)
            for c in blockers
        ]
        for t in threads:
            t.start()
        wait_until(lambda: watcher.execute(running)[0][0] == 2, timeout=10, what="blockers")
        limit = {"max_concurrent_queries_for_user": 2, "queue_max_wait_ms": 0}
        with structlog.testing.capture_logs() as logs:
            assert mgr.execute("SELECT 1", settings=limit) == [(1,)]
        retried = [e for e in logs if e["event"] == "retrying"]
        assert retried and all(e["error"].startswith("ServerException 202") for e in retried)
        assert mgr.metrics()["retry_attempts"] == len(retried)
        for t in threads:
            t.join(timeout=10)
    finally:
        mgr.close()
        for c in [*blockers, watcher]:
            c.disconnect()
        server.cleanup(graceful=False)
