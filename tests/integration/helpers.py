"""Shared helpers for tests that need a real ClickHouse server.

Imported by conftest.py and by test modules (``from helpers import ...``; the tests
directory has no __init__.py, so pytest puts it on sys.path).
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, unquote, urlparse

import pytest
from clickhouse_driver import Client, errors

from chresilient import CircuitBreakerConfig, ClickHouseUnavailableError, Config, RetryConfig
from chresilient.testing.pytest_plugin import started_server
from chresilient.testing.server import LocalClickHouse

ENV_URL = "CLICKHOUSE_TEST_URL"

HOW_TO_GET_A_SERVER = (
    "These tests need a real ClickHouse server and none is available. Either install "
    "one locally (`apt-get install -y clickhouse-server`; the tests start and stop it "
    f"themselves), run a Docker engine (docker/docker-compose.yml is used), or set "
    f"{ENV_URL}=clickhouse://user:password@host:9000/default."
)

#: What a client may raise when the network or the server goes away under it.
#: clickhouse-driver wraps connect errors (NetworkError/SocketTimeoutError) but lets
#: errors on an established socket escape raw (ConnectionResetError, EOFError, ...).
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    errors.NetworkError,
    errors.SocketTimeoutError,
    EOFError,
    OSError,
)


@dataclass
class ClickHouseEndpoint:
    """Where the session server lives, however it was obtained."""

    host: str
    port: int
    http_port: int | None
    user: str = "default"
    password: str = field(default="", repr=False)
    database: str = "default"
    source: str = "local"  # "env" | "docker" | "local"
    local: LocalClickHouse | None = None

    @property
    def url(self) -> str:
        """clickhouse-driver URL (contains the password, if any: do not log it)."""
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        return f"clickhouse://{auth}@{self.host}:{self.port}/{self.database}"

    def client(self, **kwargs: Any) -> Client:
        kwargs.setdefault("user", self.user)
        kwargs.setdefault("password", self.password)
        kwargs.setdefault("database", self.database)
        return Client(self.host, port=self.port, **kwargs)


def endpoint_from_url(url: str) -> ClickHouseEndpoint:
    parsed = urlparse(url)
    if parsed.scheme not in ("clickhouse", "clickhouses") or not parsed.hostname:
        pytest.fail(f"{ENV_URL} must look like clickhouse://user:password@host:9000/db")
    default_port = 9440 if parsed.scheme == "clickhouses" else 9000
    return ClickHouseEndpoint(
        host=parsed.hostname,
        port=parsed.port or default_port,
        http_port=None,
        user=unquote(parsed.username) if parsed.username else "default",
        password=unquote(parsed.password) if parsed.password else "",
        database=parsed.path.lstrip("/") or "default",
        source="env",
    )


def docker_available(timeout: float = 5.0) -> bool:
    """True if a Docker engine answers `docker info` quickly."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        result = subprocess.run(
            [docker, "info"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def start_local_server(**kwargs: Any) -> LocalClickHouse:
    """A started LocalClickHouse, or a test failure explaining how to get one."""
    return started_server(hint=HOW_TO_GET_A_SERVER, **kwargs)


def fast_client(host: str, port: int, timeout: float = 1.0, **kwargs: Any) -> Client:
    """A client whose connect/read/ping timeouts are short, so fault tests never hang."""
    kwargs.setdefault("connect_timeout", timeout)
    kwargs.setdefault("send_receive_timeout", timeout)
    kwargs.setdefault("sync_request_timeout", timeout)
    return Client(host, port=port, **kwargs)


def tcp_connections(client: Client) -> int:
    """Native-protocol connections the server currently has open (including `client`'s)."""
    rows = client.execute("SELECT value FROM system.metrics WHERE metric = 'TCPConnection'")
    return int(rows[0][0])


#: Alias (name used by test_core.py).
server_tcp_connections = tcp_connections


def settled_tcp_connections(client: Client, timeout: float = 5.0) -> int:
    """`tcp_connections` once stable: unreferenced clients of earlier tests are collected
    first, and the count must read the same twice, 100 ms apart."""
    gc.collect()
    deadline = time.monotonic() + timeout
    last = tcp_connections(client)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = tcp_connections(client)
        if now == last:
            return now
        last = now
    return last


def poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """True once ``predicate`` holds; False after ``timeout`` seconds (no failure here)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_until(
    predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    if not poll(predicate, timeout, interval):
        pytest.fail(f"timed out after {timeout}s waiting for {what or predicate!r}")


def port_refuses(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a TCP connect to host:port is refused (nothing listening)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def env_url() -> str | None:
    return os.environ.get(ENV_URL) or None


_SPOOL_ROOT: list[str] = []


def _spool_root() -> str:
    """One temporary directory for every test's spool, removed when the run ends."""
    if not _SPOOL_ROOT:
        root = tempfile.mkdtemp(prefix="chresilient-test-")
        atexit.register(shutil.rmtree, root, True)
        _SPOOL_ROOT.append(root)
    return _SPOOL_ROOT[0]


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
        # A spool of its own: managers of different tests must not replay each other's.
        spool_dir=tempfile.mkdtemp(prefix="chresilient-test-spool-", dir=_spool_root()),
    )
    if isinstance(auth, ClickHouseEndpoint):
        base.update(user=auth.user, password=auth.password, database=auth.database)
    base.update(changes)
    return Config(**base)


def subprocess_env(server: Any, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a chresilient subprocess (the CLI, gunicorn) aimed at ``server``:
    fast retries, a spool of its own, and no CLICKHOUSE_* of the calling shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKHOUSE_")}
    env.update(
        CLICKHOUSE_HOST=server.host,
        CLICKHOUSE_PORT=str(server.port),
        CLICKHOUSE_SPOOL_DIR=str(tmp_path / "spool"),
        CLICKHOUSE_RETRY_INITIAL_DELAY="0.05",
        CLICKHOUSE_RETRY_MAX_DELAY="0.2",
        CLICKHOUSE_RETRY_TIMEOUT_PER_ATTEMPT="2",
    )
    if isinstance(server, ClickHouseEndpoint):
        env.update(
            CLICKHOUSE_USER=server.user,
            CLICKHOUSE_PASSWORD=server.password,
            CLICKHOUSE_DB=server.database,
        )
    env.update(extra)
    return env


def wait_for_recovery(mgr: Any, timeout: float = 15.0) -> None:
    """Wait until ``mgr`` answers again the way an application sees it: the breaker lets a
    trial call through after its recovery timeout, and that success closes it."""

    def answers() -> bool:
        try:
            return bool(mgr.execute("SELECT 1") == [(1,)])
        except ClickHouseUnavailableError:
            return False

    wait_until(answers, timeout, what="ClickHouse to answer through the breaker again")


def wait_running(server: Any, marker: str, timeout: float = 15.0) -> None:
    """Wait until the server lists a query containing ``marker`` (seen from another
    connection): the call is on the server, not merely started by a thread."""
    watcher = fast_client(server.host, server.port, timeout=2.0)
    query = (
        "SELECT count() FROM system.processes WHERE query LIKE %(q)s "
        "AND query NOT LIKE '%%system.processes%%'"
    )
    try:
        wait_until(
            lambda: watcher.execute(query, {"q": f"%{marker}%"})[0][0] > 0,
            timeout,
            what=f"the server to run {marker!r}",
        )
    finally:
        watcher.disconnect()


def free_port() -> int:
    """A loopback port nothing listens on (a connect there is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a started daemon thread; the box gets its ``result`` or ``error``,
    ``elapsed`` and the monotonic time it ``ended``."""
    box: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc
        box["ended"] = time.monotonic()
        box["elapsed"] = box["ended"] - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def open_fds() -> int:
    """File descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


class ConnectionCounter:
    """Counts native connections a server accepted, from the server's own records.

    Accepted = (open now - open before) + (closed since): the open count comes from
    ``system.metrics``, the closed ones from the server log ("Done processing connection").
    The observer's own connection stays open throughout, so it cancels out.
    """

    def __init__(self, server: LocalClickHouse) -> None:
        self.server = server
        self.observer = server.client(connect_timeout=5, send_receive_timeout=10)
        self.open_before = tcp_connections(self.observer)
        self.closed_before = self._closed()

    def _closed(self) -> int:
        text = self.server.log_path.read_text(encoding="utf-8", errors="replace")
        return text.count("Done processing connection")

    def accepted(self) -> int:
        return (
            tcp_connections(self.observer)
            - self.open_before
            + (self._closed() - self.closed_before)
        )

    def close(self) -> None:
        self.observer.disconnect()
