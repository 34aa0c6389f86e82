"""A SQLAlchemy ``QueuePool`` of clickhouse-driver connections with a cheap liveness check.

The pool holds :class:`~chresilient.connection.PooledConnection` objects, each wrapping one
driver ``Client`` with one socket. A connection taken from the pool is checked inline on
the way out (pruned, older than a server restart, closed, or a socket peek; see
``is_alive``), not by a checkout listener: the per-call path runs no pool events (users'
own listeners still fire). The connect and invalidate events feed :class:`PoolStats` and
record what the server said about itself.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from typing import Any

import structlog
from clickhouse_driver import Client
from clickhouse_driver.errors import ServerException
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from . import fork
from .config import Config
from .config_values import HostPort, format_host
from .connection import LastCheckout, PooledConnection, make_client
from .errors import (
    UNAVAILABLE_KINDS,
    ChResilientError,
    ClientClosedError,
    ClosedInFlightError,
    ConnectFailedError,
    PoolTimeoutError,
    classify,
)
from .handoff import HandoffPool, PoolClosedError
from .retry import AttemptClock, Deadline
from .server import ServerInfo, detect_features

log = structlog.get_logger("chresilient.pool")

# Orders the checkouts of all pools (itertools.count is atomic under the GIL).
_CHECKOUTS = itertools.count()
# Unusable connections a checkout discards in a row (each reconnects) before it gives up.
CHECKOUT_TRIES = 3


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
    pings: int = 0  # liveness pings of connections that sat idle (ping_after_idle)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def checkout(self, hit: bool) -> None:
        """One checkout (the per-call path: one lock, no keyword loop)."""
        with self.lock:
            self.checkouts += 1
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}


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
        # Connections made before this moment are stale: a checkout found the server gone
        # (most likely restarted) and every older connection is replaced without a peek.
        self._stale_before = float("-inf")
        self._check_listener = False  # see check_on_checkout()
        # close(): connections being made or checked out, whose sockets it shuts down so
        # a call blocked on a frozen server ends at once instead of at its timeout.
        self._closed = False
        self._busy: set[PooledConnection] = set()
        self._connecting: set[Client] = set()
        self._busy_lock = threading.Lock()
        self._pool = self._new_pool()
        # Told the new QueuePool when a forked child replaces it (an engine on the pool).
        self.followers: list[Callable[[QueuePool], object]] = []
        fork.register(self)

    @property
    def label(self) -> str:
        return format_host(*self.address)

    def _bound(self) -> float:
        """The time left of the attempt in progress on this thread (ping, connect)."""
        clock: AttemptClock | None = getattr(self._local, "attempt", None)
        return self.cfg.retry.timeout_per_attempt if clock is None else clock.remaining()

    def _create(self) -> PooledConnection:
        self.stats.bump(connect_attempts=1)
        client = make_client(self.cfg, self.address, self._bound())
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

    def _new_pool(self) -> HandoffPool:
        pcfg = self.cfg.pool
        pool = HandoffPool(
            self._create,  # any object with close() will do
            pool_size=pcfg.pool_size,
            max_overflow=pcfg.max_connections - pcfg.pool_size,
            timeout=pcfg.connection_timeout,
            recycle=int(pcfg.pool_recycle_time),
            use_lifo=True,
            reset_on_return=None,
        )
        event.listen(pool, "connect", self._on_pool_connect)
        event.listen(pool, "invalidate", self._on_invalidate)
        if self._check_listener:
            event.listen(pool, "checkout", self._on_checkout)
        return pool

    def check_on_checkout(self) -> None:
        """Check connections in a checkout listener too: for users of :attr:`queue_pool`
        that bypass :meth:`connection` (an SQLAlchemy engine on this pool)."""
        self._check_listener = True
        event.listen(self._pool, "checkout", self._on_checkout)

    # -- pool events ------------------------------------------------------------------
    def _on_pool_connect(self, dbapi_conn: PooledConnection, record: ConnectionPoolEntry) -> None:
        server = ServerInfo.of(dbapi_conn.connection)
        previous, self.server_info = self.server_info, server
        if previous is None or previous.revision != server.revision or not self.features:
            # Once per host (and again after an upgrade): which optional features exist,
            # within what the attempt has left after the connect.
            dbapi_conn.set_timeout(self._bound())
            self.features = detect_features(dbapi_conn.client, self.label)
        dbapi_conn.features = self.features
        self.stats.bump(connects=1)

    def _on_invalidate(
        self, dbapi_conn: Any, record: ConnectionPoolEntry, exception: BaseException | None
    ) -> None:
        if not isinstance(exception, _Replaced):
            self.stats.bump(invalidations=1)

    def _on_checkout(
        self, dbapi_conn: PooledConnection, record: ConnectionPoolEntry, proxy: Any
    ) -> None:
        """The inline check, as a listener: SQLAlchemy reconnects the record it rejects."""
        unusable = self._admit(dbapi_conn)
        if unusable is not None:
            raise unusable

    # -- checkout -----------------------------------------------------------------------
    def _admit(self, conn: PooledConnection) -> sa_exc.DisconnectionError | None:
        """Count a checkout of ``conn``, or why it must not be used (a new one: no check)."""
        hit = conn.checkouts > 0
        unusable = self._unusable(conn) if hit else None
        if unusable is None:
            conn.checkouts += 1
            self.stats.checkout(hit)
        return unusable

    def _unusable(self, conn: PooledConnection) -> sa_exc.DisconnectionError | None:
        """Why a connection that was used before must not be used now, or None.

        Pruned while idle, or made before a server restart was seen: replaced quietly.
        Closed on our side (the driver disconnects after any error): only this one. Found
        dead by the peek (or a ping after a long idle, bounded by the attempt): the server
        most likely restarted, so every connection made before now is stale.
        """
        if conn.pruned:
            return _Replaced("connection was pruned while idle")
        if conn.created <= self._stale_before:
            return _Replaced("connection predates a server restart")
        if not conn.connection.connected:
            return sa_exc.DisconnectionError("connection was closed after an error")
        pings = conn.pings
        alive = conn.is_alive(self.cfg.pool.ping_after_idle, self._bound)
        if conn.pings != pings:
            self.stats.bump(pings=1)
        if alive:
            return None
        self._stale_before = time.monotonic()
        return sa_exc.DisconnectionError("stale connection found on checkout")

    def _checkout(
        self, wait: float
    ) -> tuple[HandoffPool, PoolProxiedConnection, PooledConnection]:
        """A checked-out connection that passed the inline check (see :meth:`_unusable`)
        and the pool it came from, all tries within ``wait`` for free connections. A wait
        that reconnect() ends (it replaced the pool) goes on in the new pool."""
        ends, left = time.monotonic() + wait, wait
        for _ in range(CHECKOUT_TRIES):
            pool = self._pool
            try:
                fairy = pool.connect_within(left)
            except PoolClosedError:
                if self._closed:
                    raise ClientClosedError(f"the pool for {self.label} is closed") from None
                left = max(ends - time.monotonic(), 0.001)
                continue
            conn: PooledConnection = fairy.dbapi_connection  # type: ignore[assignment]
            unusable = self._admit(conn)
            if unusable is None:
                return pool, fairy, conn
            fairy.invalidate(unusable)  # closes it; the record reconnects when next taken
            left = max(ends - time.monotonic(), 0.001)
        raise sa_exc.InvalidRequestError("no usable connection after reconnecting")

    # -- use --------------------------------------------------------------------------
    @contextmanager
    def connection(
        self, timeout: float, deadline: Deadline | None = None
    ) -> Iterator[PooledConnection]:
        """Check out a live connection; discard it if the body fails.

        The wait for a free connection is bounded by ``pool_timeout`` and by the call's
        ``deadline`` (or by ``timeout`` without one); everything after it (a ping of an
        idle connection, a reconnect, the body's socket operations) by ``timeout`` and
        what is left of the deadline. A connection is returned to the pool only when the
        body finished cleanly.
        """
        left = timeout if deadline is None else max(deadline.remaining(), 0.001)
        wait = min(self.cfg.pool.connection_timeout, left)
        clock = AttemptClock(timeout, deadline)
        self._local.attempt = clock
        try:
            # A connection checked out of a pool replaced since is not pooled again.
            pool, fairy, conn = self._checkout(wait)
        except sa_exc.TimeoutError as err:
            raise PoolTimeoutError(
                f"no free connection to {self.label} within {wait:.1f}s "
                f"(pool_timeout={self.cfg.pool.connection_timeout:.1f}s, or what the call's "
                f"deadline had left; pool_size={self.cfg.pool.pool_size}, "
                f"max_connections={self.cfg.pool.max_connections})"
            ) from err
        except sa_exc.InvalidRequestError as err:  # reconnect attempts exhausted on checkout
            raise ConnectFailedError(
                f"could not get a live connection to {self.label}", last_error=err
            ) from err
        except Exception as err:  # e.g. a connect that close() interrupted
            self._raise_if_closed(err)
            if classify(err) in UNAVAILABLE_KINDS and not isinstance(err, ChResilientError):
                # Refused, reset or timed out while connecting: nothing was sent.
                raise ConnectFailedError(
                    f"could not connect to {self.label}", last_error=err
                ) from err
            raise
        finally:
            self._local.attempt = None
        local = self._local
        local.last, local.sequence, local.query_info = conn, next(_CHECKOUTS), None
        with self._busy_lock:
            closed = self._closed
            if not closed:
                self._busy.add(conn)
        if closed:
            _release(fairy, False)
            raise ClientClosedError(f"the pool for {self.label} is closed")
        ok = False
        try:
            conn.set_timeout(clock.remaining())
            yield conn
            ok = True
        except Exception as err:
            self._raise_if_closed(err)
            raise
        finally:
            conn.last_used = time.monotonic()
            local.query_info = getattr(conn.client, "last_query", None)
            with self._busy_lock:
                self._busy.discard(conn)
            # A caught error leaves the driver disconnected: never pool a closed socket;
            # one from a pool that reconnect() replaced is closed, not left to the GC.
            fresh = pool is self._pool and not self._closed
            _release(fairy, ok and fresh and conn.connection.connected)
            if self._closed:  # returned while close() ran: make sure nothing stays pooled
                self._pool.dispose()

    def last_checkout(self) -> LastCheckout | None:
        """This thread's latest connection from this pool: what the drop-in client's
        ``connection`` and ``last_query`` show (see chresilient.client)."""
        local = self._local
        conn = getattr(local, "last", None)
        if conn is None:
            return None
        return LastCheckout(local.sequence, conn, local.query_info)

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

    def checked_out(self) -> int:
        return self._pool.checkedout()

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
        self._pool.close_waits()  # threads waiting for a connection end now
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

    def after_fork_in_child(self) -> None:
        """In a forked child: leave the parent's sockets alone and start an empty pool.

        The old pool is dropped, not disposed (disposing would shut the sockets down for
        the parent as well); its ``recreate()`` keeps every listener on it (ours, a user's,
        an engine's); locks are new, since a parent thread may have held them.
        """
        self._local = threading.local()  # the parent's last checkout is not this process's
        self._busy = set()
        self._connecting = set()
        self._busy_lock = threading.Lock()
        self.stats = PoolStats()  # this process's own counts
        self._pool = self._pool.recreate()
        for follow in self.followers:
            follow(self._pool)

    def recreate(self) -> None:
        """Replace the pool by a fresh one (used by reconnect)."""
        old = self._pool
        self._pool = self._new_pool()
        old.close_waits()  # its waiters go on waiting in the new pool
        old.dispose()

    def prune(self, max_age: float | None = None) -> int:
        """Close idle connections older than ``max_age`` (default: the recycle time).

        QueuePool recycles an old connection only when it is checked out again, so one at
        the bottom of the LIFO stack keeps its socket (and a server slot) indefinitely.
        Each victim is marked under the queue's lock, so a checkout that takes it next
        reconnects instead of using the closed socket. Returns the count.
        """
        limit = self.cfg.pool.pool_recycle_time if max_age is None else max_age
        now = time.monotonic()
        # Taken under the lock: after it, a checkout may replace a victim's connection.
        victims: list[PooledConnection] = []

        def old(record: ConnectionPoolEntry) -> bool:
            conn: PooledConnection | None = record.dbapi_connection  # type: ignore[assignment]
            if (conn is None or conn.pruned or now - conn.created < limit
                    or not conn.connection.connected):
                return False
            conn.pruned = True  # under the queue's lock: no checkout can take it meanwhile
            victims.append(conn)
            return True

        self._pool.select_idle(old)
        for conn in victims:
            conn.close()
        if victims:
            self.stats.bump(pruned=len(victims))
        return len(victims)


class _Replaced(sa_exc.DisconnectionError):
    """A connection discarded without being found broken (pruned while idle, or older
    than a restart): not counted as an invalidation."""


def _release(fairy: PoolProxiedConnection, ok: bool) -> None:
    if not ok:
        fairy.invalidate()
    fairy.close()
