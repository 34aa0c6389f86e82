"""Several hosts: failover, load balancing and replica lag (issue 7).

The real-server tests run three private ``clickhouse-server`` processes on loopback.
Traffic per host is counted twice: by the manager (``HostState.queries_total``) and by
each server (``system.events`` 'Query'), so a routing bug cannot hide behind a counter.

Replica lag is tested with a fake value source: Debian's 18.16 server can only create
Replicated tables with a ZooKeeper ensemble, which is not available here. The real
``system.replicas`` query is still run against 18.16 (no replicated tables: delay 0).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import fast_client, make_config, start_local_server, wait_until

from chresilient import (
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    Config,
    ConfigError,
    ConnectionPoolConfig,
    RetryConfig,
)
from chresilient.breaker import CircuitState
from chresilient.hosts import HostState
from chresilient.prometheus import exposition
from chresilient.retry import FAILOVER_MAX_DELAY, RetryPolicy, call_with_retry
from chresilient.server import read_replica_delay
from chresilient.statement import Statement
from chresilient.testing.faultproxy import FaultProxy
from chresilient.testing.server import LocalClickHouse

INTERVAL = 0.4  # health_check_interval of the failover tests


# -- helpers -----------------------------------------------------------------------------
@pytest.fixture
def cluster() -> Iterator[list[LocalClickHouse]]:
    """Three private servers; the test may kill, freeze or restart any of them."""
    servers: list[LocalClickHouse] = []
    try:
        for _ in range(3):
            servers.append(start_local_server())
        yield servers
    finally:
        for server in servers:
            if server.frozen:
                server.thaw()
            server.cleanup(graceful=False)


def cluster_config(servers: list[LocalClickHouse], **changes: Any) -> Config:
    changes.setdefault(
        "retry",
        RetryConfig(initial_delay=0.02, max_delay=0.2, timeout_per_attempt=2.0, total_timeout=10),
    )
    return make_config(
        servers[0], alt_hosts=tuple((s.host, s.port) for s in servers[1:]), **changes
    )


def label(server: LocalClickHouse) -> str:
    return f"{server.host}:{server.port}"


def host_of(mgr: ClickHouseConnectionManager, server: LocalClickHouse) -> HostState:
    return next(h for h in mgr.hosts if h.label == label(server))


def served(mgr: ClickHouseConnectionManager) -> dict[str, int]:
    """Successful attempts per host, from the manager's per-host counters."""
    return {h.label: h.queries_total - h.errors_total for h in mgr.hosts}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def next_calls(mgr: ClickHouseConnectionManager, load: Load, calls: int = 300) -> dict[str, int]:
    """Where the next ``calls`` calls of the running load went (counted, not timed: the
    same window whatever the machine's speed). Only calls that started from here on
    count: a call that ended before (say, before a kill) may be counted a bit later."""
    load.settle()
    before = served(mgr)
    wait_until(
        lambda: sum(delta(served(mgr), before).values()) >= calls,
        timeout=30,
        what=f"{calls} more calls",
    )
    return delta(served(mgr), before)


def server_queries(server: LocalClickHouse) -> int:
    """Queries the server itself has counted since it started (this one included)."""
    client = fast_client(server.host, server.port, timeout=2.0)
    try:
        rows = client.execute("SELECT value FROM system.events WHERE event = 'Query'")
        return int(rows[0][0]) if rows else 0
    finally:
        client.disconnect()


class Load:
    """``threads`` callers running ``SELECT 1`` until stopped (hard cap: ``cap`` seconds)."""

    def __init__(self, mgr: ClickHouseConnectionManager, threads: int = 8, cap: float = 120.0):
        self.mgr, self.cap = mgr, cap
        self.errors: list[BaseException] = []
        self.calls = 0
        self.slowest = 0.0  # seconds: the longest call, so the cost of a failover shows
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ended = [0] * threads  # calls ended, per thread
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def settle(self) -> None:
        """Return once every thread has ended a call that started after this was called:
        from then on, each call counted started later than the call to ``settle``."""
        with self._lock:
            before = list(self._ended)
        wait_until(
            lambda: all(now >= then + 2 for now, then in zip(self._ended, before)),
            timeout=30,
            what="every caller thread to end two more calls",
        )

    def _run(self, n: int) -> None:
        ends = time.monotonic() + self.cap
        while not self._stop.is_set() and time.monotonic() < ends:
            started = time.monotonic()
            try:
                assert self.mgr.execute("SELECT 1") == [(1,)]
            except BaseException as exc:
                with self._lock:
                    self.errors.append(exc)
            with self._lock:
                self.calls += 1
                self._ended[n] += 1
                self.slowest = max(self.slowest, time.monotonic() - started)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        assert not any(t.is_alive() for t in self._threads), "a caller thread hangs"


def wait_for_traffic(
    mgr: ClickHouseConnectionManager, host: HostState, since: float, timeout: float
) -> float:
    """Seconds from ``since`` until ``host`` served a call (fails the test on timeout)."""
    before = host.queries_total - host.errors_total
    wait_until(
        lambda: host.queries_total - host.errors_total > before,
        timeout=timeout,
        interval=0.005,
        what=f"traffic on {host.label}",
    )
    return time.monotonic() - since


# -- configuration -----------------------------------------------------------------------
def test_max_replica_delay_config_and_env() -> None:
    assert Config().max_replica_delay == 300.0
    assert Config(max_replica_delay=None).max_replica_delay is None
    cfg = Config.from_env({"CLICKHOUSE_MAX_REPLICA_DELAY": "12.5"})
    assert cfg.max_replica_delay == 12.5
    for bad in ("-1", "0", "soon", "inf"):
        with pytest.raises(ConfigError) as info:
            Config.from_env({"CLICKHOUSE_MAX_REPLICA_DELAY": bad})
        assert info.value.field == "CLICKHOUSE_MAX_REPLICA_DELAY"
    with pytest.raises(ConfigError, match="max_replica_delay"):
        Config(max_replica_delay=-5)


# -- host order, lag, failover delay on real host states ------------------------------------
def order(mgr: ClickHouseConnectionManager, tried: list[HostState]) -> list[HostState]:
    return list(mgr.executor.selector.failover_order(mgr.hosts, tried))


def untried_left(mgr: ClickHouseConnectionManager, tried: list[HostState]) -> bool:
    return mgr.executor.selector.untried_left(mgr.hosts, tried)


def offline_manager(**changes: Any) -> ClickHouseConnectionManager:
    """A manager over three addresses nobody listens on; it never connects."""
    fake = SimpleNamespace(host="127.0.0.1", port=9)
    return ClickHouseConnectionManager(
        make_config(fake, alt_hosts=(("127.0.0.1", 10), ("127.0.0.1", 11)), **changes)
    )


def test_retries_prefer_hosts_the_call_has_not_tried() -> None:
    mgr = offline_manager()
    try:
        a, b, c = mgr.hosts
        assert order(mgr, []) == [a, b, c]
        assert order(mgr, [a]) == [b, c, a]
        assert order(mgr, [a, b]) == [c, a, b]
        assert order(mgr, [a, b, c]) == [a, b, c]
        assert order(mgr, [a, b, c, a]) == [b, c, a]
        assert untried_left(mgr, [a, b])
        assert not untried_left(mgr, [a, b, c])
        c.breaker.force_open()
        assert not untried_left(mgr, [a, b])  # c would refuse the call anyway
        assert mgr.executor.choose([a])[0] is b
    finally:
        mgr.close()


def test_lagging_replica_goes_last_unless_all_lag() -> None:
    mgr = offline_manager(max_replica_delay=300)
    try:
        a, b, c = mgr.hosts
        limit = mgr.config.max_replica_delay
        assert b.set_replica_delay(1000.0, limit) is True  # changed: now lagging
        assert b.set_replica_delay(900.0, limit) is False  # still lagging
        assert order(mgr, []) == [a, c, b]
        assert order(mgr, [a]) == [c, b, a]  # untried beats lag-free
        for host in (a, c):
            host.set_replica_delay(500.0, limit)
        assert order(mgr, []) == [a, b, c]  # all lag: strategy order
        a.set_replica_delay(0.0, limit)
        c.set_replica_delay(300.0, limit)  # at the limit is not over it
        assert b.set_replica_delay(None, limit) is True  # unreadable: not avoided
        assert not any(h.lagging for h in mgr.hosts)
        assert b.set_replica_delay(10_000.0, None) is False  # check disabled
        health = mgr.metrics()["hosts"][b.label]
        assert health["replica_delay"] == 10_000.0 and health["lagging"] is False
    finally:
        mgr.close()


def _waits_before_retry(fresh_host: bool) -> list[float]:
    """What ``call_with_retry`` sleeps after one failure, failing over or not."""
    policy = RetryPolicy(initial_delay=5.0, max_delay=5.0, jitter=False, total_timeout=None)
    waits: list[float] = []
    outcomes: list[Any] = [ConnectionRefusedError("down"), "ok"]

    def attempt(timeout: float) -> str:
        value = outcomes.pop(0)
        if isinstance(value, BaseException):
            raise value
        return str(value)

    def sleep(seconds: float) -> bool:
        waits.append(seconds)
        return True

    result = call_with_retry(
        attempt,
        policy=policy,
        sleep=sleep,
        failover=lambda: fresh_host,
    )
    assert result == "ok"
    return waits


def test_failover_to_an_untried_host_skips_the_backoff() -> None:
    assert _waits_before_retry(fresh_host=True) == [FAILOVER_MAX_DELAY]
    assert _waits_before_retry(fresh_host=False) == [5.0]


# -- real servers ------------------------------------------------------------------------
def test_round_robin_spreads_queries_over_all_three(cluster: list[LocalClickHouse]) -> None:
    mgr = ClickHouseConnectionManager(cluster_config(cluster, load_balancing="round_robin"))
    try:
        mgr.start(wait=True, timeout=10)
        before = served(mgr)
        on_server = [server_queries(s) for s in cluster]
        calls = 300
        for _ in range(calls):
            assert mgr.execute("SELECT 1") == [(1,)]
        threads = [
            threading.Thread(target=lambda: [mgr.execute("SELECT 1") for _ in range(100)])
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        calls += 600
        split = delta(served(mgr), before)
        assert sum(split.values()) == calls
        for host, count in split.items():
            assert count >= 0.25 * calls, (host, split)
        for server in cluster:  # the servers agree (+ probes and our own count query)
            seen = server_queries(server) - on_server[cluster.index(server)]
            assert split[label(server)] <= seen <= split[label(server)] + 10, (server, seen)
        hosts = mgr.metrics()["hosts"]
        assert all(hosts[label(s)]["queries_total"] >= 0.25 * calls for s in cluster)
        assert set(mgr.health()["hosts"]) == {label(s) for s in cluster}
        print(
            f"\nround robin, {calls} calls: "
            + ", ".join(f"{host} {100 * count / calls:.1f}%" for host, count in split.items())
        )
    finally:
        mgr.close()


@pytest.mark.faults
def test_killed_host_under_load_fails_over_and_gets_traffic_back(
    cluster: list[LocalClickHouse],
) -> None:
    cfg = cluster_config(
        cluster,
        load_balancing="round_robin",
        pool=ConnectionPoolConfig(health_check_interval=INTERVAL),
    )
    victim = cluster[1]
    mgr = ClickHouseConnectionManager(cfg)
    try:
        mgr.start(wait=True, timeout=10)
        host = host_of(mgr, victim)
        with Load(mgr, threads=8) as load:
            wait_until(lambda: all(v > 50 for v in served(mgr).values()), timeout=10)
            killed = time.monotonic()
            victim.kill()
            wait_until(lambda: host.breaker.state is CircuitState.OPEN, timeout=10)
            opened = time.monotonic() - killed
            # Serving, but degraded: the breaker, then the monitor's failed probe, named.
            wait_until(
                lambda: any(
                    r.startswith(f"{host.label}: probe failed") for r in mgr.health()["reasons"]
                ),
                timeout=10,
                what="the monitor's probe of the dead host to fail",
            )
            health = mgr.health()
            assert health["status"] == "degraded", health["reasons"]
            assert f"{host.label}: circuit breaker open" in health["reasons"]
            # Traffic moves to the others: nothing more reaches the dead host.
            moved = next_calls(mgr, load)
            assert moved[host.label] == 0, moved
            assert all(v > 50 for k, v in moved.items() if k != host.label), moved
            victim.restart()
            back = wait_for_traffic(mgr, host, time.monotonic(), timeout=5)
        assert load.errors == [], load.errors[:3]
        assert back <= 5.0, back  # expected within two monitor intervals; a hang guard
        assert server_queries(victim) > 1  # it served calls (and probes) since its restart
        metrics = mgr.metrics()
        assert metrics["hosts"][host.label]["circuit_breaker_state"] == "closed"
        assert metrics["failovers_total"] >= 1
        assert host.breaker.opens_total == 1
        body, _ = exposition(mgr)
        assert f'chresilient_host_queries_total{{host="{host.label}"}}'.encode() in body
        print(
            f"\n8 threads, {load.calls} calls, 0 errors, slowest call {load.slowest:.3f}s; "
            f"breaker open {opened:.3f}s after the kill; traffic back {back:.3f}s after the "
            f"restart; split {served(mgr)}"
        )
    finally:
        mgr.close()


@pytest.mark.faults
def test_in_order_fails_over_and_fails_back(cluster: list[LocalClickHouse]) -> None:
    cfg = cluster_config(cluster, pool=ConnectionPoolConfig(health_check_interval=INTERVAL))
    primary, secondary, third = (None, None, None)
    mgr = ClickHouseConnectionManager(cfg)
    try:
        mgr.start(wait=True, timeout=10)
        primary, secondary, third = mgr.hosts
        with Load(mgr, threads=4) as load:
            wait_until(lambda: primary.queries_total > 100, timeout=10)
            assert secondary.queries_total == third.queries_total == 0
            killed = time.monotonic()
            cluster[0].kill()
            failed_over = wait_for_traffic(mgr, secondary, killed, timeout=5)
            wait_until(lambda: primary.breaker.state is CircuitState.OPEN, timeout=10)
            moved = next_calls(mgr, load)
            assert moved[primary.label] == 0 and moved[secondary.label] > 50, moved
            assert moved[third.label] == 0, moved  # in_order: the second host takes it all
            cluster[0].restart()
            back = wait_for_traffic(mgr, primary, time.monotonic(), timeout=5)
            wait_until(lambda: primary.breaker.state is CircuitState.CLOSED, timeout=10)
            moved = next_calls(mgr, load)
        assert load.errors == [], load.errors[:3]
        assert back <= 5.0, back  # expected within two monitor intervals; a hang guard
        # Fail back: the primary takes it all (but calls of the 4 threads already running
        # on the secondary when it came back).
        assert moved[primary.label] > 250 and moved[secondary.label] <= 4, moved
        print(
            f"\nin_order: failover {failed_over:.3f}s after the kill, fail back {back:.3f}s, "
            f"slowest call {load.slowest:.3f}s"
        )
    finally:
        mgr.close()


@pytest.mark.faults
@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_all_hosts_down_raises_unavailable_within_the_deadline(
    cluster: list[LocalClickHouse], fault: str
) -> None:
    total = 2.0
    cfg = cluster_config(
        cluster,
        load_balancing="round_robin",
        retry=RetryConfig(
            initial_delay=0.05, max_delay=0.2, timeout_per_attempt=0.5, total_timeout=total
        ),
        health_probe_timeout=0.5,
    )
    mgr = ClickHouseConnectionManager(cfg)
    try:
        mgr.start(wait=True, timeout=10)
        assert mgr.execute("SELECT 1") == [(1,)]
        for server in cluster:
            getattr(server, fault)()
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(ClickHouseUnavailableError):
                mgr.execute("SELECT 1")
            elapsed = time.monotonic() - started
            assert elapsed <= total + 5.0, elapsed  # the deadline holds (frozen: no hang)
        assert mgr.health()["status"] == "unhealthy"
    finally:
        mgr.close()


@pytest.mark.faults
def test_insert_fails_over_when_nothing_was_sent_or_it_is_deduplicated(
    cluster: list[LocalClickHouse],
) -> None:
    cfg = cluster_config(cluster)
    ddl = "CREATE TABLE t (x UInt32) ENGINE = MergeTree ORDER BY x"
    for server in cluster[1:]:
        fast_client(server.host, server.port).execute(ddl)
    mgr = ClickHouseConnectionManager(cfg)
    try:
        mgr.start(wait=True, timeout=10)
        secondary = mgr.hosts[1]
        cluster[0].kill()  # its breaker is still closed: the first attempt goes there
        # Refused at connect: nothing was sent, so even without a dedup token (18.16) the
        # insert goes to the next host instead of failing.
        assert mgr.execute("INSERT INTO t VALUES", [(1,)]) == 1
        assert secondary.queries_total == 1
        # An insert whose outcome is unknown moves on only with a working dedup token.
        # (18.16 lacks the setting, so the routing is driven directly.)
        result = mgr.executor.call(
            lambda conn: conn.client.execute("INSERT INTO t VALUES", [(2,)]),
            Statement(is_write=True, deduplicated=True, what="insert"),
        )
        assert result == 1
        assert secondary.queries_total == 2
        rows = fast_client(cluster[1].host, cluster[1].port).execute("SELECT x FROM t ORDER BY x")
        assert rows == [(1,), (2,)]
    finally:
        mgr.close()
    # A replica dying while an INSERT is on the wire: its outcome is unknown, so without a
    # dedup token it does not go to the other replica but to the spool.
    with contextlib.closing(FaultProxy((cluster[1].host, cluster[1].port))) as proxy:
        proxy.start()
        cfg = make_config(proxy, alt_hosts=((cluster[2].host, cluster[2].port),))
        with ClickHouseConnectionManager(cfg) as cut:
            assert cut.execute("SELECT 1") == [(1,)]
            other = cut.hosts[1]
            proxy.reset(after_bytes=4096)
            result = cut.insert("t", [(n,) for n in range(100, 20_100)], ["x"])
            assert result.spooled and not result.delivered
            assert other.queries_total == 0 and cut.metrics()["failovers_total"] == 0
    third = fast_client(cluster[2].host, cluster[2].port)
    assert third.execute("SELECT count() FROM t") == [(0,)]


def test_replica_delay_is_read_from_system_replicas(
    cluster: list[LocalClickHouse], monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    server = cluster[0]
    client = fast_client(server.host, server.port)
    assert read_replica_delay(label(server), client) == 0.0  # no replicated tables
    mgr = ClickHouseConnectionManager(
        cluster_config(cluster, pool=ConnectionPoolConfig(health_check_interval=INTERVAL))
    )
    try:
        mgr.start(wait=True, timeout=10)
        wait_until(lambda: all(h.replica_delay == 0.0 for h in mgr.hosts), timeout=15)
        health = mgr.health()
        assert all(r["replica_delay"] == 0.0 for r in health["probe"]["hosts"].values())
        assert all(h["lagging"] is False for h in health["hosts"].values())
        # The dependency report: one entry per check and host.
        report = mgr.validate_service_dependencies(timeout=60)
        tcp = [c for c in report["checks"] if c["name"] == "tcp"]
        assert sorted(c["host"] for c in tcp) == sorted(label(s) for s in cluster)
        assert all(c["status"] == "passed" for c in tcp)
    finally:
        mgr.close()
    off = ClickHouseConnectionManager(cluster_config(cluster, max_replica_delay=None))
    try:
        off.start(wait=True, timeout=10)
        probed = off.health()["probe"]  # a probe round ran, and did not read the delay
        assert off.monitor.probes_total >= 1 and all(r["ok"] for r in probed["hosts"].values())
        assert all(r.get("replica_delay") is None for r in probed["hosts"].values())
        assert all(h.replica_delay is None for h in off.hosts)
    finally:
        off.close()


