"""A SQLAlchemy ``QueuePool`` of clickhouse-driver connections with a cheap liveness check.

The pool holds :class:`PooledConnection` objects, each wrapping one driver ``Client`` with
one socket. The driver pings the server before *every* query; here that ping is replaced
by a non-blocking peek at the socket for connections used recently, and a real ping only
after a connection sat idle longer than ``ping_after_idle``.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import structlog
from clickhouse_driver import Client
from clickhouse_driver.connection import Connection
from clickhouse_driver.errors import ServerException
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from .config import Config, HostPort, format_host
from .errors import ClientClosedError, ClosedInFlightError, PoolTimeoutError, describe

log = structlog.get_logger("chresilient.pool")

# Longest wait for the driver's own ping of an idle connection.
PING_TIMEOUT = 5.0


class _NoPingConnection(Connection):  # type: ignore[misc]
    """A driver connection that does not ping before every query.

    The pool checks liveness on checkout instead (see :meth:`PooledConnection.is_alive`);
    a closed connection still reconnects, as in the driver.
    """

    def force_connect(self) -> None:
        self.check_query_execution()
        if not self.connected:
            self.connect()


@dataclass
class ServerInfo:
    """What one server said about itself when a connection was made."""

    name: str = ""
    version: tuple[int, ...] = ()
    revision: int = 0
    timezone: str = ""
    display_name: str = ""

    @property
    def version_string(self) -> str:
        return ".".join(str(v) for v in self.version)


class PooledConnection:
    """One pooled driver ``Client`` and when it was last used."""

    def __init__(self, client: Client, address: HostPort) -> None:
        self.client = client
        self.address = address
        self.pid = os.getpid()  # a child process must never shut down its parent's socket
        self.created = time.monotonic()
        self.last_used = self.created
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

    def is_alive(self, ping_after_idle: float) -> bool:
        """Peek at the socket; ping only when the connection sat idle a long time.

        A socket peek costs microseconds and sees a server that closed or was killed
        (EOF or stray bytes make the socket readable). It cannot see a frozen server; only
        the per-attempt timeout catches that.
        """
        conn = self.connection
        sock = conn.socket
        if not conn.connected or sock is None:
            return False
        if _socket_is_readable(sock):
            return False  # EOF, reset, or bytes nobody asked for
        if time.monotonic() - self.last_used < ping_after_idle:
            return True
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
    if cfg.ca_certs:
        kwargs["ca_certs"] = cfg.ca_certs
    client = Client(settings=dict(cfg.settings), **kwargs)
    connection = _NoPingConnection(**kwargs)
    connection.context.settings = client.settings
    connection.context.client_settings = client.client_settings
    client.connections.clear()
    client.connection = connection
    return client


@dataclass
class PoolStats:
    """Counters fed by the pool's events."""

    connect_attempts: int = 0
    connect_failures: int = 0
    connects: int = 0
    checkouts: int = 0
    hits: int = 0
    misses: int = 0
    invalidations: int = 0
    pruned: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class HostPool:
    """The connection pool for one ClickHouse host."""

    def __init__(
        self,
        cfg: Config,
        address: HostPort,
        connection_class: type[PooledConnection] = PooledConnection,
    ) -> None:
        self.cfg = cfg
        self.address = address
        self.connection_class = connection_class
        self.stats = PoolStats()
        self.server_info: ServerInfo | None = None
        self.features: Mapping[str, bool] = {}
        # The checkout's time bound, so a connection made for it is bounded by it too.
        self._local = threading.local()
        # Connections sitting in the pool, for prune(); the checkout hook takes the lock.
        self._idle: weakref.WeakSet[PooledConnection] = weakref.WeakSet()
        self._idle_lock = threading.Lock()
        # close(): connections being made or checked out, whose sockets it shuts down so
        # a call blocked on a frozen server ends at once instead of at its timeout.
        self._closed = False
        self._busy: set[PooledConnection] = set()
        self._connecting: set[Client] = set()
        self._busy_lock = threading.Lock()
        self._pool = self._new_pool()

    @property
    def label(self) -> str:
        return format_host(*self.address)

    def _create(self) -> PooledConnection:
        self.stats.bump(connect_attempts=1)
        timeout = self.cfg.retry.timeout_per_attempt
        timeout = min(timeout, getattr(self._local, "timeout", timeout))
        client = make_client(self.cfg, self.address, timeout)
        with self._busy_lock:
            if self._closed:
                raise ClientClosedError(f"the pool for {self.label} is closed")
            self._connecting.add(client)
        try:
            client.connection.connect()
        except BaseException:
            self.stats.bump(connect_failures=1)
            raise
        finally:
            with self._busy_lock:
                self._connecting.discard(client)
        return self.connection_class(client, self.address)

    def _new_pool(self) -> QueuePool:
        pcfg = self.cfg.pool
        pool = QueuePool(
            self._create,  # type: ignore[arg-type]  # any object with close() will do
            pool_size=pcfg.pool_size,
            max_overflow=pcfg.max_connections - pcfg.pool_size,
            timeout=pcfg.connection_timeout,
            recycle=int(pcfg.pool_recycle_time),
            use_lifo=True,
            reset_on_return=None,
        )
        event.listen(pool, "connect", self._on_pool_connect)
        event.listen(pool, "checkout", self._on_checkout)
        event.listen(pool, "checkin", self._on_checkin)
        event.listen(pool, "invalidate", self._on_invalidate)
        return pool

    # -- pool events ------------------------------------------------------------------
    def _on_pool_connect(self, dbapi_conn: PooledConnection, record: ConnectionPoolEntry) -> None:
        record.info["fresh"] = True
        info = dbapi_conn.connection.server_info
        server = ServerInfo(
            name=str(info.name),
            version=tuple(info.version_tuple()),
            revision=int(info.revision),
            timezone=str(info.timezone or ""),
            display_name=str(getattr(info, "display_name", "") or ""),
        )
        previous, self.server_info = self.server_info, server
        if previous is None or previous.revision != server.revision or not self.features:
            # Once per host (and again after an upgrade): which optional features exist.
            self.features = server_features(dbapi_conn)
        dbapi_conn.features = self.features
        self.stats.bump(connects=1)

    def _on_checkout(
        self, dbapi_conn: PooledConnection, record: ConnectionPoolEntry, proxy: Any
    ) -> None:
        with self._idle_lock:
            self._idle.discard(dbapi_conn)
            pruned = dbapi_conn.pruned
        if pruned:  # its socket is closed: this record reconnects instead
            raise _PrunedError("connection was pruned while idle")
        if record.info.pop("fresh", False):
            self.stats.bump(checkouts=1, misses=1)
            return
        if not dbapi_conn.connection.connected:
            # Closed on our side (the driver disconnects after any error): only this one.
            raise sa_exc.DisconnectionError("connection was closed after an error")
        if not dbapi_conn.is_alive(self.cfg.pool.ping_after_idle):
            # The server closed the socket: most likely it restarted, so every
            # connection made before now is stale. Recycle them all at once.
            raise sa_exc.InvalidatePoolError("stale connection found on checkout")
        self.stats.bump(checkouts=1, hits=1)

    def _on_checkin(self, dbapi_conn: PooledConnection | None, record: ConnectionPoolEntry) -> None:
        if dbapi_conn is not None:
            with self._idle_lock:
                self._idle.add(dbapi_conn)

    def _on_invalidate(
        self, dbapi_conn: Any, record: ConnectionPoolEntry, exception: BaseException | None
    ) -> None:
        if not isinstance(exception, _PrunedError):
            self.stats.bump(invalidations=1)

    # -- use --------------------------------------------------------------------------
    @contextmanager
    def connection(self, timeout: float) -> Iterator[PooledConnection]:
        """Check out a live connection bounded by ``timeout``; discard it if the body fails.

        A connection is returned to the pool only when the body finished cleanly.
        """
        self._local.timeout = timeout
        try:
            fairy = self._pool.connect()
        except sa_exc.TimeoutError as err:
            raise PoolTimeoutError(
                f"no free connection to {self.label} within "
                f"{self.cfg.pool.connection_timeout:.1f}s "
                f"(pool_size={self.cfg.pool.pool_size}, "
                f"max_connections={self.cfg.pool.max_connections})"
            ) from err
        except sa_exc.InvalidRequestError as err:  # reconnect attempts exhausted on checkout
            raise ConnectionError(f"could not get a live connection to {self.label}") from err
        except Exception as err:  # e.g. a connect that close() interrupted
            self._raise_if_closed(err)
            raise
        conn: PooledConnection = fairy.dbapi_connection  # type: ignore[assignment]
        with self._busy_lock:
            closed = self._closed
            if not closed:
                self._busy.add(conn)
        if closed:
            _release(fairy, False)
            raise ClientClosedError(f"the pool for {self.label} is closed")
        ok = False
        try:
            conn.set_timeout(timeout)
            yield conn
            ok = True
        except Exception as err:
            self._raise_if_closed(err)
            raise
        finally:
            conn.last_used = time.monotonic()
            with self._busy_lock:
                self._busy.discard(conn)
            # A caught error leaves the driver disconnected: never pool a closed socket.
            _release(fairy, ok and not self._closed and conn.connection.connected)
            if self._closed:  # returned while close() ran: make sure nothing stays pooled
                self._pool.dispose()

    def _raise_if_closed(self, err: Exception) -> None:
        """After close(), a broken connection is close()'s doing (it shut the socket down);
        a server's answer (``ServerException``) still reaches the caller unchanged."""
        if self._closed and not isinstance(err, (ClientClosedError, ServerException)):
            raise ClosedInFlightError(
                f"the connection to {self.label} was closed while the call was in flight",
                last_error=err,
            ) from err

    @property
    def queue_pool(self) -> QueuePool:
        """The underlying SQLAlchemy pool (for an engine that should share it)."""
        return self._pool

    def status(self) -> dict[str, int]:
        """Pool gauges: size, checked out, idle, overflow."""
        pool = self._pool
        return {
            "size": pool.size(),
            "checked_out": pool.checkedout(),
            "idle": pool.checkedin(),
            "overflow": max(pool.overflow(), 0),
            "max_connections": self.cfg.pool.max_connections,
        }

    def dispose(self) -> None:
        """Close every idle connection; checked-out ones close when returned."""
        self._pool.dispose()

    def close(self) -> int:
        """Stop for good: shut down the sockets of calls in flight, close idle connections.

        A call blocked on a frozen server ends at once with :class:`ClosedInFlightError`
        instead of at its timeout; a connection returned afterwards is discarded, and a
        checkout raises :class:`ClientClosedError`. Idempotent. Returns how many sockets
        in use were shut down.
        """
        with self._busy_lock:
            self._closed = True
            socks = [c.connection.socket for c in self._busy]
            socks += [c.connection.socket for c in self._connecting]
        shut = 0
        for sock in socks:
            if sock is None:
                continue
            with suppress(OSError):  # wakes a recv()/send() blocked on this socket
                sock.shutdown(socket.SHUT_RDWR)
                shut += 1
        self._pool.dispose()
        return shut

    @property
    def closed(self) -> bool:
        return self._closed

    def after_fork(self) -> None:
        """In a forked child: leave the parent's sockets alone and start an empty pool.

        The old pool is dropped, not disposed (disposing would shut the sockets down for
        the parent as well); locks are new, since a parent thread may have held them.
        """
        self._idle = weakref.WeakSet()
        self._idle_lock = threading.Lock()
        self._busy = set()
        self._connecting = set()
        self._busy_lock = threading.Lock()
        self.stats.lock = threading.Lock()
        self._pool = self._new_pool()

    def recreate(self) -> None:
        """Replace the pool by a fresh one (used by reconnect)."""
        old = self._pool
        self._pool = self._new_pool()
        old.dispose()

    def prune(self, max_age: float | None = None) -> int:
        """Close idle connections older than ``max_age`` (default: the recycle time).

        QueuePool recycles an old connection only when it is checked out again, so one at
        the bottom of the LIFO stack keeps its socket (and a server slot) indefinitely.
        Each victim is marked under the lock the checkout hook takes, so a concurrent
        checkout of it reconnects instead of using the closed socket. Returns the count.
        """
        limit = self.cfg.pool.pool_recycle_time if max_age is None else max_age
        now = time.monotonic()
        with self._idle_lock:
            victims = [
                c
                for c in self._idle
                if now - c.created >= limit and not c.pruned and c.connection.connected
            ]
            for conn in victims:
                conn.pruned = True
                self._idle.discard(conn)
        for conn in victims:
            conn.close()
        if victims:
            self.stats.bump(pruned=len(victims))
        return len(victims)


class _PrunedError(sa_exc.DisconnectionError):
    """Raised by the checkout hook for a pruned connection: SQLAlchemy reconnects it."""


def _release(fairy: PoolProxiedConnection, ok: bool) -> None:
    if not ok:
        fairy.invalidate()
    fairy.close()


DEDUP_SETTING = "insert_deduplication_token"


def insert_delivery(dedup_supported: bool) -> str:
    """What a server's dedup support means for a batch whose outcome was unknown.

    The token only deduplicates on tables that do (Replicated*MergeTree, or MergeTree with
    ``non_replicated_deduplication_window``); elsewhere a replayed batch may appear twice.
    """
    return "exactly_once_on_deduplicating_tables" if dedup_supported else "at_least_once"


def server_features(conn: PooledConnection) -> Mapping[str, bool]:
    """Ask the server which optional features it has (one query per host)."""
    try:
        rows = conn.client.execute(
            f"SELECT name FROM system.settings WHERE name IN ('{DEDUP_SETTING}')"
        )
    except ServerException as err:  # e.g. a user without access to system tables
        log.warning("feature_detection_failed", host=conn.address[0], error=describe(err))
        rows = []
    names = {row[0] for row in rows}
    return {DEDUP_SETTING: DEDUP_SETTING in names}
