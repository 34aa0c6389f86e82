"""Core behaviour against a real ClickHouse server: pool, retry, breaker, drop-in results."""

from __future__ import annotations

import datetime as dt
import decimal
import statistics
import threading
import time
import uuid
from typing import Any

import pytest
import structlog
from clickhouse_driver import Client
from clickhouse_driver import errors as driver_errors
from helpers import ClickHouseEndpoint, server_tcp_connections

import chresilient
from chresilient import (
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    ClientClosedError,
    Config,
    ConnectionPoolConfig,
    RetryConfig,
    StartupError,
)
from chresilient.errors import ErrorKind, classify


def make_config(server: Any, *, auth: Any = None, **changes: Any) -> Config:
    """Fast-retrying config for ``server`` (anything with host and port).

    Credentials come from ``auth`` or from ``server`` when it is the session endpoint.
    """
    auth = auth if auth is not None else server
    base: dict[str, Any] = dict(
        host=server.host,
        port=server.port,
        retry=RetryConfig(
            initial_delay=0.02, max_delay=0.2, timeout_per_attempt=3.0, total_timeout=20.0
        ),
        breaker=CircuitBreakerConfig(failure_threshold=5, recovery_timeout=1.0),
    )
    if isinstance(auth, ClickHouseEndpoint):
        base.update(user=auth.user, password=auth.password, database=auth.database)
    base.update(changes)
    return Config(**base)


@pytest.fixture
def manager(clickhouse: Any):
    mgr = ClickHouseConnectionManager(make_config(clickhouse))
    yield mgr
    mgr.close()


MIXED_DDL = """
CREATE TABLE {name} (
    id UInt32, i8 Int8, u64 UInt64, f Float64, d Decimal(12, 3), s String, fs FixedString(4),
    day Date, ts DateTime, ts_tz DateTime('Asia/Kolkata'), u UUID, ns Nullable(String),
    arr Array(Int32), e Enum8('a' = 1, 'b' = 2)
) ENGINE = MergeTree ORDER BY id
"""


def _mixed_rows() -> list[tuple[Any, ...]]:
    rows = []
    for i in range(50):
        rows.append(
            (
                i,
                -i % 128 - 64,
                2**63 + i,
                i / 7,
                decimal.Decimal(f"{i}.125"),
                f"str{i}\u00e9" if i % 3 else "",
                b"ab\x00c"[: 1 + i % 4].decode("latin-1"),
                dt.date(2020, 1, 1) + dt.timedelta(days=i),
                dt.datetime(2021, 5, 6, 7, 8, 9) + dt.timedelta(hours=i),
                dt.datetime(2022, 1, 1, 12, 0, 0) + dt.timedelta(minutes=i),
                uuid.UUID(int=i * 7919),
                None if i % 2 else f"n{i}",
                list(range(i % 5)),
                "a" if i % 2 else "b",
            )
        )
    return rows


def test_results_equal_bare_driver(
    clickhouse: Any, manager: ClickHouseConnectionManager, client: Client
) -> None:
    table = f"mixed_{uuid.uuid4().hex[:8]}"
    manager.execute(MIXED_DDL.format(name=table))
    try:
        inserted = manager.execute(f"INSERT INTO {table} VALUES", _mixed_rows())
        assert inserted == 50
        query = f"SELECT * FROM {table} WHERE id >= %(low)s ORDER BY id"
        params = {"low": 3}
        for kwargs in (
            {},
            {"with_column_types": True},
            {"columnar": True},
            {"columnar": True, "with_column_types": True},
        ):
            ours = manager.execute(query, params, **kwargs)
            bare = client.execute(query, params, **kwargs)
            assert ours == bare, kwargs
        assert list(manager.execute_iter(query, params)) == client.execute(query, params)
        drop_in = chresilient.ResilientClient(manager)
        assert drop_in.execute(query, params, True) == client.execute(query, params, True)
    finally:
        manager.execute(f"DROP TABLE {table}")


def test_pool_reuses_connections_under_load(clickhouse: Any) -> None:
    cfg = make_config(clickhouse, pool=ConnectionPoolConfig(pool_size=5, max_connections=10))
    mgr = ClickHouseConnectionManager(cfg)
    observer = Client(clickhouse.host, port=clickhouse.port)
    baseline = server_tcp_connections(observer)  # includes the observer itself
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server_tcp_connections(observer) - baseline)
            stop.wait(0.01)

    errors: list[BaseException] = []
    wrong: list[tuple[int, Any]] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                value = n * 1000 + i
                got = mgr.execute("SELECT %(v)s", {"v": value})
                if got != [(value,)]:
                    wrong.append((value, got))
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    sampler.join(timeout=5)
    try:
        assert not any(t.is_alive() for t in threads), "worker stuck"
        assert errors == []
        assert wrong == []
        assert 1 <= peak[0] <= 10, f"server saw {peak[0]} connections from the pool"
        metrics = mgr.metrics()
        assert metrics["queries_total"] == 32 * 200
        assert metrics["pool_hits"] > 32 * 200 * 0.9  # the sockets were really reused
        assert metrics["checked_out"] == 0
    finally:
        mgr.close()
        observer.disconnect()


def test_deterministic_errors_make_one_attempt(manager: ClickHouseConnectionManager) -> None:
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


def test_execute_iter_closed_early_discards_connection(
    manager: ClickHouseConnectionManager,
) -> None:
    assert list(manager.execute_iter("SELECT number FROM system.numbers LIMIT 10")) == [
        (i,) for i in range(10)
    ]
    before = manager.metrics()["pool_invalidations"]
    rows = manager.execute_iter("SELECT number FROM system.numbers LIMIT 1000000")
    assert next(rows) == (0,)
    rows.close()  # type: ignore[attr-defined]
    assert manager.metrics()["pool_invalidations"] == before + 1
    assert manager.metrics()["checked_out"] == 0
    assert manager.execute("SELECT 3") == [(3,)]


def test_use_after_close_is_a_clear_error(clickhouse: Any) -> None:
    mgr = ClickHouseConnectionManager(make_config(clickhouse))
    assert mgr.execute("SELECT 1") == [(1,)]
    mgr.close()
    mgr.close()  # harmless
    with pytest.raises(ClientClosedError, match="closed"):
        mgr.execute("SELECT 1")


def test_get_clickhouse_client_from_env(clickhouse: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLICKHOUSE_HOST", clickhouse.host)
    monkeypatch.setenv("CLICKHOUSE_PORT", str(clickhouse.port))
    chresilient.reset_clickhouse_client()
    try:
        client = chresilient.get_clickhouse_client()
        assert client is chresilient.get_clickhouse_client()
        assert isinstance(client.manager, ClickHouseConnectionManager)
        assert client.execute("SELECT %(a)s + 1", {"a": 41}) == [(42,)]
        rows, columns = client.execute("SELECT 'x' AS s", None, True)
        assert rows == [("x",)] and columns == [("s", "String")]
        assert list(client.execute_iter("SELECT number FROM system.numbers LIMIT 3")) == [
            (0,),
            (1,),
            (2,),
        ]
        client.disconnect()
        assert client.execute("SELECT 1") == [(1,)]
    finally:
        chresilient.reset_clickhouse_client()


# -- real faults on a private server ---------------------------------------------------


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


@pytest.mark.faults
def test_restart_between_queries_is_invisible_to_reads(clickhouse_server: Any) -> None:
    mgr = ClickHouseConnectionManager(make_config(clickhouse_server))
    try:
        _warm(mgr, 5)
        clickhouse_server.restart()
        for i in range(20):
            assert mgr.execute("SELECT %(i)s", {"i": i}) == [(i,)]
        metrics = mgr.metrics()
        assert metrics["query_errors_total"] == 0
        assert metrics["circuit_breaker_state"] == "closed"
        # The stale sockets were found by the liveness check, not by failing queries.
        assert metrics["retry_attempts"] == 0
        assert metrics["pool_invalidations"] >= 1
    finally:
        mgr.close()


@pytest.mark.faults
def test_server_killed_while_idle_reads_recover(clickhouse_server: Any) -> None:
    mgr = ClickHouseConnectionManager(make_config(clickhouse_server))
    try:
        _warm(mgr, 3)
        clickhouse_server.kill()
        with pytest.raises(ClickHouseUnavailableError) as info:
            mgr.execute("SELECT 1")
        assert classify(info.value.last_error) is ErrorKind.TRANSPORT  # type: ignore[arg-type]
        clickhouse_server.start()
        mgr.hosts[0].breaker.reset()
        assert mgr.execute("SELECT 1") == [(1,)]
    finally:
        mgr.close()


@pytest.mark.faults
def test_frozen_server_is_bounded_then_breaker_fails_fast(clickhouse_server: Any) -> None:
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
        assert elapsed < 3 * 1.0 + 3 * 0.2 + 2.0, elapsed  # never hangs
        assert mgr.hosts[0].breaker.state is CircuitState.OPEN

        refusals = []
        for _ in range(50):
            t0 = time.perf_counter()
            with pytest.raises(CircuitOpenError):
                mgr.execute("SELECT 1")
            refusals.append(time.perf_counter() - t0)
        assert statistics.median(refusals) < 0.005

        clickhouse_server.thaw()
        time.sleep(1.2)  # recovery_timeout
        assert mgr.execute("SELECT 1") == [(1,)]
        for _ in range(3):
            mgr.execute("SELECT 1")
        assert mgr.hosts[0].breaker.state is CircuitState.CLOSED
    finally:
        clickhouse_server.thaw()
        mgr.close()


@pytest.mark.faults
def test_wrong_password_fails_fast_without_leaking(clickhouse_server: Any) -> None:
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
            assert time.monotonic() - started < 2.0
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


@pytest.mark.faults
def test_insert_is_not_retried_without_dedup_token(clickhouse: Any, fault_proxy: Any) -> None:
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
        fault_proxy.reset()
        with pytest.raises(ClickHouseUnavailableError) as info:
            proxied.execute(f"INSERT INTO {table} VALUES", [(3,)])
        assert info.value.attempts == 1  # outcome unknown: not repeated
        with pytest.raises(ClickHouseUnavailableError) as info:
            proxied.execute("SELECT 1")
        assert info.value.attempts == 4  # reads are repeated
        assert classify(info.value.last_error) is ErrorKind.TRANSPORT  # type: ignore[arg-type]
        fault_proxy.pass_through()
        proxied.hosts[0].breaker.reset()
        assert proxied.execute("SELECT 5") == [(5,)]
        assert direct.execute(f"SELECT count() FROM {table}") == [(2,)]
    finally:
        direct.execute(f"DROP TABLE {table}")
        direct.close()
        proxied.close()
