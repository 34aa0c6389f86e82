"""One pooled driver connection, and the driver client behind it.

The driver pings the server before *every* query; here that ping is replaced by a
non-blocking peek at the socket for connections used recently, and a real ping only after
a connection sat idle longer than ``ping_after_idle``.
"""

from __future__ import annotations

import math
import os
import select
import socket
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Callable

from clickhouse_driver import Client
from clickhouse_driver.connection import Connection

from .config import Config
from .config_values import HostPort

# Longest wait for the driver's own ping of an idle connection.
PING_TIMEOUT = 5.0
# Socket timeouts are set in steps of this many seconds (rounded down).
TIMEOUT_STEP = 0.01


class NoPingConnection(Connection):  # type: ignore[misc]
    """A driver connection that does not ping before every query.

    The pool checks liveness on checkout instead (see :meth:`PooledConnection.is_alive`);
    a closed connection still reconnects, as in the driver.
    """

    def force_connect(self) -> None:
        self.check_query_execution()
        if not self.connected:
            self.connect()


class PooledConnection:
    """One pooled driver ``Client`` and when it was last used."""

    def __init__(self, client: Client, address: HostPort) -> None:
        self.client = client
        self.address = address
        self.pid = os.getpid()  # a child process must never shut down its parent's socket
        self.created = time.monotonic()
        self.last_used = self.created
        self.pings = 0  # liveness pings sent (the pool counts them)
        self.checkouts = 0  # the first needs no liveness check: the connect just happened
        self.timeout: float | None = None  # what set_timeout() last set, on which socket
        self._timed_socket: socket.socket | None = None
        self._poller: Any = None  # select.poll() of the socket with descriptor _polled_fd
        self._polled_fd = -1
        self.pruned = False  # closed by HostPool.prune() while idle (set under the queue lock)
        # Optional features of the server this connection talks to (set on connect).
        self.features: Mapping[str, bool] = {}

    @property
    def connection(self) -> Connection:
        return self.client.connection

    def set_timeout(self, seconds: float) -> None:
        """Bound every socket read and write of the next attempt.

        Rounded down to 10 ms (never longer than asked) and skipped when unchanged: most
        calls ask for the same per-attempt timeout, and ``settimeout`` is a system call.
        """
        if seconds > TIMEOUT_STEP:
            seconds = math.floor(seconds / TIMEOUT_STEP) * TIMEOUT_STEP
        if seconds == self.timeout and self.connection.socket is self._timed_socket:
            return
        self.timeout = seconds
        conn = self.connection
        conn.send_receive_timeout = seconds
        conn.sync_request_timeout = min(seconds, PING_TIMEOUT)
        sock = self._timed_socket = conn.socket
        if sock is not None:
            sock.settimeout(seconds)

    def is_alive(self, ping_after_idle: float, ping_within: Callable[[], float]) -> bool:
        """Peek at the socket; ping only when the connection sat idle a long time.

        A socket peek costs microseconds and sees a server that closed or was killed
        (EOF or stray bytes make the socket readable). It cannot see a frozen server; only
        the per-attempt timeout catches that. A ping waits at most ``ping_within()``.
        """
        conn = self.connection
        sock = conn.socket
        if not conn.connected or sock is None:
            return False
        if self._readable(sock):
            return False  # EOF, reset, or bytes nobody asked for
        if time.monotonic() - self.last_used < ping_after_idle:
            return True
        self.pings += 1
        self.set_timeout(ping_within())
        try:
            return bool(conn.ping())
        except Exception:
            return False

    def _readable(self, sock: socket.socket) -> bool:
        """A zero-timeout poll of the socket: it never blocks, whatever timeout the socket
        has (``recv(MSG_PEEK)`` would wait that long first). The poll object is kept with
        the connection: registering once is cheaper than ``select()`` building its sets."""
        try:
            fd = sock.fileno()
            if self._polled_fd != fd:
                poller = select.poll()
                poller.register(fd, select.POLLIN | select.POLLPRI)
                self._poller, self._polled_fd = poller, fd
            return bool(self._poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        """Called by the pool when the connection is discarded."""
        if os.getpid() != self.pid:
            # Inherited through fork(): shutdown() would cut the parent's connection too;
            # closing our descriptor only drops this process's reference.
            sock = self.connection.socket
            if sock is not None:
                with suppress(OSError):
                    sock.close()
            return
        with suppress(Exception):
            self.client.disconnect()

    def rollback(self) -> None:
        """ClickHouse has no transactions; the pool's reset-on-return is a no-op."""


@dataclass(frozen=True)
class LastCheckout:
    """A thread's latest checkout: ``sequence`` orders them across pools; ``query_info``
    is the driver's ``last_query`` of that call (None while it runs)."""

    sequence: int
    connection: PooledConnection
    query_info: Any


def make_client(cfg: Config, address: HostPort, timeout: float) -> Client:
    """A driver ``Client`` for one host whose connection skips the per-query ping."""
    host, port = address
    kwargs: dict[str, Any] = dict(
        host=host,
        port=port,
        user=cfg.user,
        password=cfg.password,
        database=cfg.database,
        secure=cfg.secure,
        verify=cfg.verify,
        client_name=cfg.client_name,
        compression=cfg.compression,
        connect_timeout=min(cfg.pool.connect_timeout, timeout),
        send_receive_timeout=timeout,
        sync_request_timeout=min(PING_TIMEOUT, timeout),
    )
    options = dict(cfg.driver_options)
    if "sync_request_timeout" in options:
        options["sync_request_timeout"] = min(options["sync_request_timeout"], timeout)
    kwargs.update(options)
    if cfg.ca_certs:
        kwargs["ca_certs"] = cfg.ca_certs
    client = Client(settings=dict(cfg.settings), **kwargs)
    connection = NoPingConnection(**kwargs)
    connection.context.settings = client.settings
    connection.context.client_settings = client.client_settings
    client.connections.clear()
    client.connection = connection
    return client
