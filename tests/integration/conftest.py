"""Real-server fixtures.

Where the shared session server comes from, in order of precedence:

1. ``CLICKHOUSE_TEST_URL`` (an existing server; fault tests need a local binary anyway),
2. a reachable Docker engine (docker/docker-compose.yml via pytest-docker),
3. a private ``clickhouse-server`` child process (`LocalClickHouse`).

If none is available, tests using these fixtures FAIL with instructions: a silently
skipped resilience suite is worse than a red one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from clickhouse_driver import Client
from helpers import (
    ClickHouseEndpoint,
    docker_available,
    endpoint_from_url,
    env_url,
    make_config,
    start_local_server,
)

from chresilient import ClickHouseConnectionManager
from chresilient.testing.cluster import LocalCluster
from chresilient.testing.faultproxy import FaultProxy
from chresilient.testing.server import LocalClickHouse

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_FAULT_FIXTURES = frozenset({"clickhouse_server", "fault_proxy"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything that breaks a server or the network is a fault test (`-m "not faults"`).
    for item in items:
        if _FAULT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    """Overrides pytest-docker's default location (only used on the Docker path)."""
    return os.path.join(_ROOT, "docker", "docker-compose.yml")


def _docker_endpoint(request: pytest.FixtureRequest) -> ClickHouseEndpoint:
    # Requested lazily so pytest-docker never runs `docker compose` unless Docker is up.
    services: Any = request.getfixturevalue("docker_services")
    ip: str = request.getfixturevalue("docker_ip")
    port = int(services.port_for("clickhouse", 9000))
    http_port = int(services.port_for("clickhouse", 8123))

    def responsive() -> bool:
        client = Client(ip, port=port, connect_timeout=1, send_receive_timeout=2)
        try:
            client.execute("SELECT 1")
            return True
        except Exception:
            return False
        finally:
            client.disconnect()

    services.wait_until_responsive(check=responsive, timeout=120.0, pause=0.5)
    return ClickHouseEndpoint(host=ip, port=port, http_port=http_port, source="docker")


@pytest.fixture(scope="session")
def clickhouse(request: pytest.FixtureRequest) -> Iterator[ClickHouseEndpoint]:
    """The shared session server.  Tests must not break it (use `clickhouse_server`)."""
    url = env_url()
    if url is not None:
        yield endpoint_from_url(url)
        return
    if docker_available():
        yield _docker_endpoint(request)
        return
    server = start_local_server()
    try:
        yield ClickHouseEndpoint(
            host=server.host,
            port=server.port,
            http_port=server.http_port,
            source="local",
            local=server,
        )
    finally:
        server.cleanup()


@pytest.fixture
def replicated() -> Iterator[LocalCluster]:
    """ZooKeeper and two clickhouse-server replicas of one shard, private to the test."""
    cluster = LocalCluster(replicas=2)
    try:
        cluster.start()
        yield cluster
    finally:
        for replica in cluster.replicas:
            if replica.frozen:
                replica.thaw()
        cluster.zookeeper.thaw()
        cluster.cleanup()


@pytest.fixture
def clickhouse_server() -> Iterator[LocalClickHouse]:
    """A private, started LocalClickHouse that the test may kill, freeze or restart."""
    server = start_local_server()
    try:
        yield server
    finally:
        if server.frozen:
            server.thaw()
        # SIGKILL: its data dir is deleted anyway, and a graceful stop with clients
        # still connected costs ~1 s per test.
        server.cleanup(graceful=False)


@pytest.fixture
def fault_proxy(clickhouse: ClickHouseEndpoint) -> Iterator[FaultProxy]:
    """A started FaultProxy (mode pass) in front of the session server."""
    try:
        proxy = FaultProxy((clickhouse.host, clickhouse.port))
    except ValueError as exc:
        pytest.fail(
            f"fault_proxy needs a loopback server, but the session server is "
            f"{clickhouse.host}:{clickhouse.port} ({exc})",
            pytrace=False,
        )
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def mgr(clickhouse: ClickHouseEndpoint) -> Iterator[ClickHouseConnectionManager]:
    """A manager on the session server (a spool of its own, fast retries), closed after."""
    manager = ClickHouseConnectionManager(make_config(clickhouse))
    try:
        yield manager
    finally:
        manager.close()


@pytest.fixture
def client(clickhouse: ClickHouseEndpoint) -> Iterator[Client]:
    """A bare clickhouse_driver.Client connected to the session server."""
    c = clickhouse.client(connect_timeout=5, send_receive_timeout=30)
    try:
        yield c
    finally:
        c.disconnect()
