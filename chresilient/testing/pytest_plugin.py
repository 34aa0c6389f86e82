"""A pytest plugin for your own outage tests: a real private ClickHouse you can break.

Installed with chresilient (entry point ``pytest11``; ``pip install chresilient[testing]``
brings pytest). Fixtures:

- ``clickhouse_server``: a :class:`LocalClickHouse` (``.kill()``, ``.freeze()``, ``.thaw()``,
  ``.restart()``, ``.url``, ``.config(**changes)``). One server per session by default
  (``--clickhouse-scope=function`` or the ini option ``clickhouse_scope`` for one per test);
  after each test it is thawed and started again if the test left it frozen or dead. Its
  data stays from test to test: give each test its own tables.
- ``clickhouse_fault_proxy``: a :class:`FaultProxy` in front of the server (refuse, reset
  mid-stream, latency, black-hole); ``clickhouse_server.config(host=proxy.host,
  port=proxy.port)`` points a manager through it.
- ``clickhouse_manager``: a started :class:`ClickHouseConnectionManager` on the server,
  closed after the test; ``@pytest.mark.clickhouse_config(**changes)`` changes its Config.

No server binary is a test failure with the install hint, never a skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported by the fixtures: a pytest run that uses none pays nothing
    from ..manager import ClickHouseConnectionManager
    from .faultproxy import FaultProxy
    from .server import LocalClickHouse

SCOPES = ("session", "package", "module", "class", "function")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chresilient", "chresilient's private ClickHouse")
    group.addoption(
        "--clickhouse-scope",
        choices=SCOPES,
        default=None,
        help="how long one clickhouse_server lives (default: session)",
    )
    group.addoption(
        "--clickhouse-binary",
        default=None,
        help="clickhouse-server binary (default: $CLICKHOUSE_SERVER_BINARY, then PATH)",
    )
    parser.addini("clickhouse_scope", "how long one clickhouse_server lives", default="session")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "clickhouse_config(**changes): Config changes for clickhouse_manager"
    )
    _scope("clickhouse_server_process", config)  # a bad ini value: a usage error now


def _scope(fixture_name: str, config: pytest.Config) -> str:
    scope = config.getoption("clickhouse_scope") or config.getini("clickhouse_scope")
    if scope not in SCOPES:
        raise pytest.UsageError(f"clickhouse_scope must be one of {SCOPES}, got {scope!r}")
    return str(scope)


def started_server(hint: str = "", **kwargs: Any) -> LocalClickHouse:
    """A started :class:`LocalClickHouse`, or a test failure that says why (and ``hint``:
    how to get a server); never a skip."""
    from .server import LocalClickHouse, LocalClickHouseError

    try:
        server = LocalClickHouse(**kwargs)
    except LocalClickHouseError as err:
        pytest.fail(f"clickhouse_server: {err}" + (f"\n{hint}" if hint else ""), pytrace=False)
    try:
        server.start()
    except LocalClickHouseError as err:
        server.cleanup(graceful=False)
        pytest.fail(f"clickhouse_server did not start: {err}", pytrace=False)
    return server


@pytest.fixture(scope=_scope)  # type: ignore[arg-type]
def clickhouse_server_process(request: pytest.FixtureRequest) -> Iterator[LocalClickHouse]:
    """The server process behind ``clickhouse_server`` (shared for the chosen scope)."""
    binary = request.config.getoption("clickhouse_binary") or os.environ.get(
        "CLICKHOUSE_SERVER_BINARY"
    )
    server = started_server(binary=binary)
    try:
        yield server
    finally:
        server.cleanup(graceful=False)


@pytest.fixture
def clickhouse_server(clickhouse_server_process: LocalClickHouse) -> Iterator[LocalClickHouse]:
    """A private ClickHouse to break; running and answering again after the test."""
    server = clickhouse_server_process
    try:
        yield server
    finally:
        if server.frozen:
            server.thaw()
        if not server.running:
            server.start()


@pytest.fixture
def clickhouse_fault_proxy(clickhouse_server: LocalClickHouse) -> Iterator[FaultProxy]:
    """A loopback TCP proxy in front of ``clickhouse_server``, passing traffic through."""
    from .faultproxy import FaultProxy

    proxy = FaultProxy((clickhouse_server.host, clickhouse_server.port)).start()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def clickhouse_manager(
    request: pytest.FixtureRequest, clickhouse_server: LocalClickHouse
) -> Iterator[ClickHouseConnectionManager]:
    """A started manager on ``clickhouse_server``; closed after the test."""
    from ..manager import ClickHouseConnectionManager

    marker = request.node.get_closest_marker("clickhouse_config")
    changes: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    manager = ClickHouseConnectionManager(clickhouse_server.config(**changes))
    try:
        manager.start(wait=True, timeout=60)
        yield manager
    finally:
        manager.close()
