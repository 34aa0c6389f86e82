"""Claims of the README and docs that no other test proved, each against a real server."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from clickhouse_driver import Client
from helpers import make_config, subprocess_env, wait_until
from test_cli import run_cli

from chresilient import (
    CircuitBreakerConfig,
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    ConnectFailedError,
    ConnectionPoolConfig,
    RetryConfig,
    StartupError,
    StartupTimeoutError,
)
from chresilient.events import Event
from chresilient.testing.faultproxy import FaultProxy


def test_pool_exhausted_sends_the_batch_to_the_spool(clickhouse: Any, client: Client) -> None:
    table = f"exhausted_{uuid.uuid4().hex[:8]}"
    client.execute(f"CREATE TABLE {table} (id UInt8) ENGINE = Memory")
    cfg = make_config(
        clickhouse,
        retry=RetryConfig(timeout_per_attempt=3.0, total_timeout=1.0),
        pool=ConnectionPoolConfig(pool_size=1, max_connections=1, connection_timeout=0.5),
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        held = mgr.execute_iter("SELECT number FROM system.numbers LIMIT 2")
        assert next(held) == (0,)  # the only connection is busy
        result = mgr.insert(table, [(1,)], ["id"])
        assert result.spooled and "PoolTimeoutError" in (result.error or "")
        assert result.delivery == "unknown"  # never inserted into while the server answered
        assert list(held) == [(1,)]
        assert mgr.spool is not None and mgr.spool.replay().batches == 1
    assert client.execute(f"SELECT id FROM {table}") == [(1,)]


def test_without_a_spool_an_insert_during_an_outage_raises(
    clickhouse: Any, fault_proxy: FaultProxy
) -> None:
    cfg = make_config(fault_proxy, auth=clickhouse, spool_enabled=False)
    with ClickHouseConnectionManager(cfg) as mgr:
        fault_proxy.refuse()
        with pytest.raises(ClickHouseUnavailableError):
            mgr.insert("anything", [(1,)], ["id"])
        assert mgr.spool is None and mgr.spool_health()["enabled"] is False


def test_start_raises_startup_timeout_in_process(fault_proxy: FaultProxy, clickhouse: Any) -> None:
    fault_proxy.refuse()
    with ClickHouseConnectionManager(make_config(fault_proxy, auth=clickhouse)) as mgr:
        with pytest.raises(StartupTimeoutError):
            mgr.start(wait=True, timeout=1.0)
        assert not mgr.started


def test_an_unknown_database_is_a_startup_error_and_cli_exit_3(
    clickhouse: Any, tmp_path: Path
) -> None:
    with ClickHouseConnectionManager(make_config(clickhouse, database="no_such_db")) as mgr:
        with pytest.raises(StartupError) as info:
            mgr.start(wait=True, timeout=20)
        assert "CLICKHOUSE_DB" in str(info.value) and not mgr.started
    env = subprocess_env(clickhouse, tmp_path, CLICKHOUSE_DB="no_such_db")
    result = run_cli(["wait", "--timeout", "20"], env, timeout=60)
    assert result.returncode == 3 and "CLICKHOUSE_DB" in result.stderr


def test_spool_replay_limit_and_purging_set_aside_batches(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    table, missing = (f"{p}_{uuid.uuid4().hex[:8]}" for p in ("verbs", "missing"))
    client.execute(f"CREATE TABLE {table} (id UInt8) ENGINE = Memory")
    cfg = make_config(fault_proxy, auth=clickhouse, spool_dir=str(tmp_path / "spool"))
    with ClickHouseConnectionManager(cfg) as mgr:
        fault_proxy.refuse()
        for n in range(3):
            assert mgr.insert(table, [(n,)], ["id"]).spooled
        assert mgr.insert(missing, [(9,)], ["id"]).spooled
    fault_proxy.pass_through()
    env = subprocess_env(
        clickhouse,
        tmp_path,
        CLICKHOUSE_HOST=fault_proxy.host,
        CLICKHOUSE_PORT=str(fault_proxy.port),
    )
    first = run_cli(["spool", "replay", "--limit", "1"], env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["batches"] == 1
    assert client.execute(f"SELECT count() FROM {table}") == [(1,)]
    rest = run_cli(["spool", "replay"], env)
    assert rest.returncode == 0, rest.stderr
    report = json.loads(rest.stdout)
    assert (report["batches"], report["set_aside"]) == (2, 1)
    with ClickHouseConnectionManager(cfg) as mgr:
        assert mgr.spool is not None
        purged = mgr.spool.purge(confirm=True, failed_only=True)
        assert (purged.batches, purged.rows) == (1, 1) and mgr.spool.set_aside() == []
    assert client.execute(f"SELECT id FROM {table} ORDER BY id") == [(0,), (1,), (2,)]


def test_idle_connections_are_pinged_and_old_ones_recycled(clickhouse: Any) -> None:
    cfg = make_config(
        clickhouse,
        pool=ConnectionPoolConfig(ping_after_idle=1.0, pool_recycle_time=3.0),
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        stats = mgr.hosts[0].pool.stats
        for _ in range(3):
            mgr.execute("SELECT 1")
        assert (stats.connects, stats.pings) == (1, 0)  # recently used: the peek is enough
        time.sleep(1.5)  # idle past ping_after_idle
        mgr.execute("SELECT 1")
        assert (stats.connects, stats.pings) == (1, 1)  # pinged, alive, kept
        time.sleep(2.0)  # older than pool_recycle_time (3.5 s since it connected)
        mgr.execute("SELECT 1")
        assert stats.connects == 2  # replaced by a new connection


def test_the_attempt_timeout_bounds_silence_not_query_length(clickhouse: Any) -> None:
    cfg = make_config(
        clickhouse, retry=RetryConfig(max_attempts=1, timeout_per_attempt=1.0, total_timeout=20.0)
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        # 2 s in all, a block every 0.2 s: never silent for the 1 s bound (5x margin).
        rows = mgr.execute("SELECT sleep(0.2) FROM numbers(10) SETTINGS max_block_size = 1")
        assert len(rows) == 10
        with pytest.raises(ClickHouseUnavailableError) as info:
            mgr.execute("SELECT sleep(2)")  # 2 s of silence
        assert "timed out" in str(info.value).lower() or "timeout" in str(info.value).lower()


def test_the_retry_budget_stops_retries_inside_the_manager(
    clickhouse: Any, fault_proxy: FaultProxy
) -> None:
    cfg = make_config(
        fault_proxy,
        auth=clickhouse,
        retry=RetryConfig(
            max_attempts=5, initial_delay=0.01, max_delay=0.02, budget_ratio=0.0, budget_burst=2
        ),
        spool_enabled=False,
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        fault_proxy.refuse()
        failures = []
        for _ in range(2):
            with pytest.raises(ClickHouseUnavailableError) as info:
                mgr.execute("SELECT 1")
            failures.append(str(info.value))
        assert all("budget" in text for text in failures), failures
        metrics = mgr.metrics()
        assert metrics["retry_budget_exhausted"] >= 1
        assert metrics["retry_attempts"] == 2  # the burst, then no retry at all


def test_reconnect_answers_504_while_the_server_is_frozen(clickhouse_server: Any) -> None:
    from chresilient import health_wsgi_app
    from chresilient.testing.http import request, serve_wsgi

    cfg = make_config(clickhouse_server, retry=RetryConfig(timeout_per_attempt=3.0))
    with ClickHouseConnectionManager(cfg) as mgr:
        mgr.execute("SELECT 1")
        app = health_wsgi_app(mgr, reconnect_token="t0ken", reconnect_timeout=0.5)
        with serve_wsgi(app) as url:
            clickhouse_server.freeze()
            try:
                reply = request(
                    url + "/health/clickhouse/reconnect",
                    "POST",
                    {"Authorization": "Bearer t0ken"},
                )
            finally:
                clickhouse_server.thaw()
        assert reply.status == 504 and "still running" in reply.json()["error"]


def test_register_collector_exposes_the_manager_in_a_registry(clickhouse: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from chresilient.prometheus import register_collector

    with ClickHouseConnectionManager(make_config(clickhouse)) as mgr:
        mgr.execute("SELECT 1")
        registry = CollectorRegistry()
        register_collector(mgr, registry)
        text = generate_latest(registry).decode()
    assert "chresilient_queries_total" in text and "chresilient_spool_usable 1.0" in text


def test_the_core_publishes_its_events_to_listeners(
    clickhouse: Any, fault_proxy: FaultProxy
) -> None:
    """docs/architecture.md, "Events": payloads, and listeners run after the core released
    its locks (a listener reading the breaker from another thread is not blocked)."""
    cfg = make_config(
        fault_proxy,
        auth=clickhouse,
        retry=RetryConfig(max_attempts=1, timeout_per_attempt=3.0, total_timeout=5.0),
        breaker=CircuitBreakerConfig(
            failure_threshold=1, recovery_timeout=0.2, half_open_max_calls=1
        ),
        spool_enabled=False,
        # The monitor probes only when the breaker opens (it is woken), not on its own
        # cadence during the test: every event below comes from the calls made here.
        pool=ConnectionPoolConfig(health_check_interval=600.0),
    )
    seen: list[tuple[Event, dict[str, Any]]] = []
    unlocked: list[bool] = []

    def listener(event: Event) -> Callable[..., None]:
        def record(**payload: Any) -> None:
            if event is Event.CLOSING:  # the pools and the monitor are still there
                idle = mgr.hosts[0].pool.status()["idle"]
                payload = {"idle": idle, "monitor": mgr.monitor.running}
            reader = threading.Thread(target=lambda: mgr.hosts[0].breaker.state)
            reader.start()
            reader.join(5)
            unlocked.append(not reader.is_alive())
            seen.append((event, payload))

        return record

    mgr = ClickHouseConnectionManager(cfg)
    try:
        for event in Event:
            if event not in (Event.PROBED, Event.RECOVERED):  # the monitor's own cadence
                mgr.events.listen(event, listener(event))
        mgr.start(wait=True, timeout=10)
        label = mgr.hosts[0].label
        seen.clear()
        assert mgr.execute("SELECT 1") == [(1,)]
        assert seen == [(Event.CALL_SUCCEEDED, {"host": label})]
        seen.clear()
        fault_proxy.refuse()
        fault_proxy.reset_active()
        with pytest.raises(ClickHouseUnavailableError):
            mgr.execute("SELECT 1")
        kinds = [event for event, _ in seen]
        assert kinds == [Event.BREAKER_OPENED, Event.CALL_FAILED], kinds
        assert seen[0][1] == {"host": label}
        failed = seen[1][1]
        assert failed["host"] == label and isinstance(failed["error"], ConnectFailedError)
        seen.clear()
        fault_proxy.pass_through()
        wait_until(
            lambda: (Event.BREAKER_CLOSED, {"host": label}) in seen,
            timeout=15,
            what="the breaker to close",
        )
        seen.clear()
        mgr.close()
        assert seen == [(Event.CLOSING, {"idle": 1, "monitor": True})]
        assert mgr.hosts[0].pool.status()["idle"] == 0 and not mgr.monitor.running
        assert unlocked and all(unlocked)
    finally:
        mgr.close()
