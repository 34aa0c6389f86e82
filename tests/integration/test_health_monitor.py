"""The health monitor against real servers: state, breaker recovery, pruning, shutdown."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from helpers import make_config, tcp_connections, wait_until

from chresilient import (
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    ConnectionPoolConfig,
    RetryConfig,
    health_wsgi_app,
)
from chresilient.testing.http import request as call
from chresilient.testing.http import serve_wsgi as serve

INTERVAL = 0.3


def monitored(server: Any, **changes: Any) -> ClickHouseConnectionManager:
    """A manager whose monitor probes every INTERVAL seconds with a 1 s probe timeout."""
    changes.setdefault("pool", ConnectionPoolConfig(health_check_interval=INTERVAL))
    changes.setdefault("health_probe_timeout", 1.0)
    return ClickHouseConnectionManager(make_config(server, **changes))


def test_required_false_starts_degraded_and_the_monitor_recovers(clickhouse_server: Any) -> None:
    clickhouse_server.stop()
    mgr = monitored(clickhouse_server)
    try:
        started = time.monotonic()
        mgr.start(wait=True, timeout=1.0, required=False)
        assert time.monotonic() - started < 5.0  # gave up after its 1 s; hang guard
        assert mgr.monitor.running
        assert mgr.health()["status"] == "unhealthy"
        assert mgr.connection_state == "unhealthy"
        time.sleep(2.0)  # the server comes up ~3 s after the manager started
        clickhouse_server.start()
        wait_until(
            lambda: mgr.connection_state == "healthy",
            timeout=10.0,
            what="the monitor to see the server back",
        )
        health = mgr.health()
        assert health["status"] == "healthy", health["reasons"]
        assert mgr.metrics()["queries_total"] == 0  # no application call was needed
    finally:
        mgr.close()


def test_killed_server_is_seen_without_application_calls(clickhouse_server: Any) -> None:
    mgr = monitored(clickhouse_server)

    def http_status() -> int:
        return call(url + "/health/clickhouse").status

    try:
        mgr.start(wait=True, timeout=10)
        wait_until(lambda: mgr.monitor.probes_total >= 1, timeout=15, what="a first probe")
        with serve(health_wsgi_app(mgr)) as url:
            assert http_status() == 200
            clickhouse_server.kill()
            wait_until(
                lambda: mgr.health()["status"] == "unhealthy",
                timeout=10.0,  # a hang guard; expected within two intervals
                interval=0.02,
                what="unhealthy after the kill",
            )
            assert http_status() == 503
            health = mgr.health()
            assert health["connection_state"] == "unhealthy"
            (probe,) = health["probe"]["hosts"].values()
            assert probe["ok"] is False and probe["error"]
            assert any("probe failed" in reason for reason in health["reasons"])
            # Kubernetes readiness: out of rotation, with the reasons.
            ready = call(url + "/health/clickhouse/ready")
            body = ready.json()
            assert ready.status == 503
            assert (body["ready"], body["status"]) == (False, "unhealthy")
            assert any("probe failed" in reason for reason in body["reasons"])
            connection = call(url + "/health/clickhouse/connection")
            assert connection.status == 503
            (host,) = connection.json()["hosts"].values()
            assert host["probe"]["ok"] is False and host["probe"]["error"]
            clickhouse_server.start()
            wait_until(
                lambda: mgr.health()["status"] == "healthy",
                timeout=10.0,
                interval=0.02,
                what="healthy after the restart",
            )
            assert http_status() == 200
            ready = call(url + "/health/clickhouse/ready")
            assert (ready.status, ready.json()) == (200, {"ready": True, "status": "healthy"})
            assert call(url + "/health/clickhouse/connection").status == 200
        assert mgr.metrics()["queries_total"] == 0  # the monitor alone noticed both changes
    finally:
        mgr.close()


def test_open_breaker_is_closed_by_the_monitor_not_by_traffic(clickhouse_server: Any) -> None:
    recovery = 0.6
    mgr = monitored(
        clickhouse_server,
        # A long interval: the breaker opening wakes the monitor, which then probes more
        # often than recovery_timeout / 2, so the breaker never lets application calls in
        # as trials.
        pool=ConnectionPoolConfig(health_check_interval=60.0),
        retry=RetryConfig(max_attempts=1, timeout_per_attempt=1.0, total_timeout=2.0),
        breaker=CircuitBreakerConfig(failure_threshold=2, recovery_timeout=recovery),
    )
    breaker = mgr.hosts[0].breaker
    try:
        mgr.start(wait=True, timeout=10)
        clickhouse_server.kill()
        for _ in range(2):
            with pytest.raises(ClickHouseUnavailableError):
                mgr.execute("SELECT 1")
        assert breaker.state is CircuitState.OPEN
        deadline = time.monotonic() + 4 * recovery
        while time.monotonic() < deadline:  # well past the recovery timeout: still no trials
            with pytest.raises(CircuitOpenError):  # refused by the breaker: no network
                mgr.execute("SELECT 1")
            time.sleep(0.05)
        assert mgr.monitor.probe_failures_total >= 3  # the monitor did the trying
        assert breaker.opens_total == 1
        assert mgr.health()["status"] == "unhealthy"
        clickhouse_server.start()
        queries = mgr.metrics()["queries_total"]
        wait_until(
            lambda: breaker.state is CircuitState.CLOSED,
            timeout=10.0,
            what="the monitor's probe to close the breaker",
        )
        assert mgr.metrics()["queries_total"] == queries  # no application call did it
        assert mgr.execute("SELECT 1") == [(1,)]
        assert mgr.health()["status"] == "healthy"
    finally:
        mgr.close()


def test_monitor_prunes_idle_connections_past_recycle_time(clickhouse: Any) -> None:
    mgr = monitored(
        clickhouse,
        pool=ConnectionPoolConfig(health_check_interval=INTERVAL, pool_recycle_time=1.0),
    )
    host = mgr.hosts[0]
    try:
        mgr.start(wait=True, timeout=10)
        hold_connections(mgr, 4)
        assert host.pool.status()["idle"] >= 4
        wait_until(lambda: host.pool.stats.pruned >= 3, timeout=15, what="idle connections pruned")
        assert mgr.health()["pool"][host.label]["pruned"] >= 3
        assert mgr.monitor.pruned_total >= 3
        # Pruned connections reconnect transparently when the pool hands them out again.
        results: list[Any] = []
        threads = [
            threading.Thread(target=lambda: results.append(mgr.execute("SELECT 2")))
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert results == [[(2,)]] * 6
    finally:
        mgr.close()


def hold_connections(mgr: ClickHouseConnectionManager, count: int) -> None:
    """Check out ``count`` connections at once, then return them all (a warm pool)."""
    pool = mgr.hosts[0].pool
    barrier = threading.Barrier(count)

    def hold() -> None:
        with pool.connection(5.0) as conn:
            conn.client.execute("SELECT 1")
            barrier.wait(5)

    threads = [threading.Thread(target=hold) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)


def test_prune_racing_checkouts_never_hands_out_a_closed_socket(clickhouse: Any) -> None:
    mgr = ClickHouseConnectionManager(make_config(clickhouse))
    pool = mgr.hosts[0].pool
    errors: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                assert mgr.execute("SELECT 3") == [(3,)]
            except BaseException as exc:
                errors.append(exc)
                return
            time.sleep(0.0005)  # leave connections idle now and then

    try:
        hold_connections(mgr, 5)  # more connections than workers: some are always idle
        workers = [threading.Thread(target=work) for _ in range(3)]
        for worker in workers:
            worker.start()
        pruned = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            pruned += pool.prune(max_age=0)
            time.sleep(0.001)
        stop.set()
        for worker in workers:
            worker.join(10)
        assert not errors, errors[:3]
        assert pruned > 50 and pool.stats.pruned == pruned
        assert mgr.metrics()["retry_attempts"] == 0  # no query even needed a retry
        assert pool.stats.invalidations == 0  # reconnecting a pruned one is not an error
    finally:
        mgr.close()


def test_close_stops_the_monitor_within_a_second(clickhouse: Any) -> None:
    mgr = monitored(clickhouse)
    before = set(threading.enumerate())
    mgr.start(wait=True, timeout=10)
    (thread,) = [t for t in set(threading.enumerate()) - before if t.name == "chresilient-health"]
    assert mgr.monitor.running and thread.daemon
    started = time.monotonic()
    mgr.close()
    assert time.monotonic() - started < 5.0  # hang guard (SERVICE_STOP_TIMEOUT is 1 s)
    assert not thread.is_alive() and not mgr.monitor.running


def test_close_interrupts_a_probe_stuck_on_a_frozen_server(clickhouse_server: Any) -> None:
    mgr = monitored(
        clickhouse_server, health_probe_timeout=10.0, retry=RetryConfig(timeout_per_attempt=10.0)
    )
    observer = clickhouse_server.client(connect_timeout=5, send_receive_timeout=10)
    try:
        before = set(threading.enumerate())
        mgr.start(wait=True, timeout=10)
        (thread,) = [
            t for t in set(threading.enumerate()) - before if t.name == "chresilient-health"
        ]
        wait_until(lambda: mgr.monitor.probes_total >= 1, timeout=15, what="a first probe")
        assert tcp_connections(observer) >= 2
        clickhouse_server.freeze()
        wait_until(
            lambda: mgr.monitor.probing,
            timeout=15,
            what="a probe waiting on the frozen server",
        )
        started = time.monotonic()
        mgr.close()
        assert time.monotonic() - started < 5.0  # not the 10 s probe timeout
        thread.join(5.0)
        assert not thread.is_alive()
    finally:
        clickhouse_server.thaw()
        observer.disconnect()
        mgr.close()
