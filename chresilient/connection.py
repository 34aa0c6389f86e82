"""One pooled driver connection, and the driver client behind it.

The driver pings the server before *every* query; here that ping is replaced by a
non-blocking peek at the socket for connections used recently, and a real ping only after
a connection sat idle longer than ``ping_after_idle``.
"""

from __future__ import annotations

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
        self.pruned = False  # closed by HostPool.prune() while idle; guarded by its lock
        # Optional features of the server this connection talks to (set on connect).
        self.features: Mapping[str, bool] = {}

    @property
    def connection(self) -> Connection:
        return self.client.connection

    def set_timeout(self, seconds: float) -> None:
        """Bound every socket read and write of the next attempt."""
        conn = self.connection
        conn.send_receive_timeout = seconds
        conn.sync_request_timeout = min(seconds, PING_TIMEOUT)
        sock = conn.socket
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
        if _socket_is_readable(sock):
            return False  # EOF, reset, or bytes nobody asked for
        if time.monotonic() - self.last_used < ping_after_idle:
            return True
        self.pings += 1
        self.set_timeout(ping_within())
        try:
            return bool(conn.ping())
        except Exception:
            return False

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


def _socket_is_readable(sock: socket.socket) -> bool:
    # select() with a zero timeout never blocks, whatever timeout the socket has;
    # recv(MSG_PEEK) on a socket with a timeout would wait that long first.
    try:
        readable, _, errored = select.select([sock], [], [sock], 0)
    except (OSError, ValueError):
        return True
    return bool(readable or errored)


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
