"""``ResilientClient``: a drop-in for ``clickhouse_driver.Client`` backed by a manager.

``get_clickhouse_client()`` returns one client per process, configured from the
``CLICKHOUSE_*`` environment; after ``fork()`` (gunicorn with preload) the manager gives
the child its own sockets and threads on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Callable, TypeVar

from clickhouse_driver import Client as DriverClient
from clickhouse_driver.connection import Connection
from clickhouse_driver.util.helpers import parse_url

from . import fork, tracing
from .config import Config
from .connection import LastCheckout, PooledConnection, make_client
from .driver_args import config_from_driver_args
from .events import Event
from .manager import ClickHouseConnectionManager
from .progress import Pending, ProgressResult
from .statement import DEDUP_SETTING, Statement, settings_for_server

T = TypeVar("T")
# Checking out a connection only to show it: a failure says nothing about the server.
LOOK = Statement(is_write=False, background=True)


class ResilientClient:
    """clickhouse-driver's ``Client`` API, each call through the manager's pool, retry and
    breaker. What a pooled client cannot mean the same way (docs/migration.md):
    ``connection`` and ``last_query`` are those of the calling thread's latest call, and
    ``disconnect()`` closes the idle pooled connections."""

    def __init__(self, manager: ClickHouseConnectionManager) -> None:
        self.manager = manager
        self._local = threading.local()  # the thread's pending progress result, resets
        self._offline: DriverClient | None = None
        self._driver_args: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        fork.register(self)

    def after_fork_in_child(self) -> None:
        """A forked child has no pending progress result and no last call of its own."""
        self._local = threading.local()

    @classmethod
    def from_kwargs(cls, *args: Any, config: Config | None = None, **kwargs: Any) -> Any:
        """A client from ``clickhouse_driver.Client``'s arguments (host, port, user, ...,
        settings, alt_hosts, round_robin); ``config`` supplies the rest (pool, retry)."""
        return cls(ClickHouseConnectionManager(config_from_driver_args(args, kwargs, config)))

    @classmethod
    def from_url(cls, url: str, config: Config | None = None) -> Any:
        """``clickhouse_driver.Client.from_url``: the driver's URL forms and parameters."""
        host, kwargs = parse_url(url)
        return cls.from_kwargs(host, config=config, **kwargs)

    def __enter__(self) -> ResilientClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    # -- calls ------------------------------------------------------------------------
    def execute(
        self,
        query: str,
        params: Any = None,
        with_column_types: bool = False,
        external_tables: Sequence[Mapping[str, Any]] | None = None,
        query_id: str | None = None,
        settings: Mapping[str, Any] | None = None,
        types_check: bool = False,
        columnar: bool = False,
    ) -> Any:
        return self.manager.execute(
            query,
            params,
            with_column_types=with_column_types,
            external_tables=external_tables,
            query_id=query_id,
            settings=settings,
            types_check=types_check,
            columnar=columnar,
        )

    def execute_iter(
        self,
        query: str,
        params: Any = None,
        with_column_types: bool = False,
        external_tables: Sequence[Mapping[str, Any]] | None = None,
        query_id: str | None = None,
        settings: Mapping[str, Any] | None = None,
        types_check: bool = False,
        chunk_size: int = 1,
    ) -> Iterator[Any]:
        return self.manager.execute_iter(
            query,
            params,
            with_column_types=with_column_types,
            external_tables=external_tables,
            query_id=query_id,
            settings=settings,
            types_check=types_check,
            chunk_size=chunk_size,
        )

    def execute_with_progress(
        self,
        query: str,
        params: Any = None,
        with_column_types: bool = False,
        external_tables: Sequence[Mapping[str, Any]] | None = None,
        query_id: str | None = None,
        settings: Mapping[str, Any] | None = None,
        types_check: bool = False,
        columnar: bool = False,
    ) -> ProgressResult:
        """Progress packets, then ``get_result()``; the connection is held until the result
        is read (or ``cancel()``). Sending the query is retried like ``execute``."""
        sets = self._settings(settings)

        def start(conn: PooledConnection) -> Any:
            return conn.client.execute_with_progress(
                query,
                params,
                with_column_types=with_column_types,
                external_tables=external_tables,
                query_id=query_id,
                settings=settings_for_server(sets, conn.features),
                types_check=types_check,
                columnar=columnar,
            )

        statement = self._statement(query, params, sets)
        pending = self._pending()
        with self._traced(query):  # the span covers sending the query
            held = self.manager.open_executor().checkout(start, statement)
        return ProgressResult(held, pending)  # replaces (and so frees) an earlier one

    def cancel(self, with_column_types: bool = False) -> Any:
        """Cancel this thread's pending ``execute_with_progress`` query; returns what the
        server sent until then, as the driver does."""
        progress = self._pending().result
        if progress is None or not progress.pending:
            raise RuntimeError("cancel(): no pending execute_with_progress() on this thread")
        return progress.cancel(with_column_types)

    def query_dataframe(
        self,
        query: str,
        params: Any = None,
        external_tables: Sequence[Mapping[str, Any]] | None = None,
        query_id: str | None = None,
        settings: Mapping[str, Any] | None = None,
        replace_nonwords: bool = True,
    ) -> Any:
        """A pandas DataFrame (the ``numpy`` extra), read like ``execute``."""
        return self._on_driver(
            query,
            params,
            settings,
            lambda client, sets: client.query_dataframe(
                query, params, external_tables, query_id, sets, replace_nonwords
            ),
        )

    def insert_dataframe(
        self,
        query: str,
        dataframe: Any,
        external_tables: Sequence[Mapping[str, Any]] | None = None,
        query_id: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Any:
        """Insert a pandas DataFrame: a write, never repeated once sent (as ``execute``)."""
        return self._on_driver(
            query,
            [],  # a write, whatever the verb says
            settings,
            lambda client, sets: client.insert_dataframe(
                query, dataframe, external_tables, query_id, sets
            ),
        )

    def substitute_params(self, query: str, params: Any, context: Any) -> str:
        """The driver's client-side parameter substitution (no network)."""
        return str(self._offline_client().substitute_params(query, params, context))

    # -- what the calling thread last used ----------------------------------------------
    @property
    def connection(self) -> Connection:
        """The driver connection of this thread's latest call, which its next call uses
        again (the pool is LIFO). Before any call, one is checked out and returned (a
        connect within ``connect_timeout``, with failover); if none can be had, an
        unconnected one configured like the client."""
        last = self._last()
        if last is not None:
            return last.connection.connection
        try:
            executor = self.manager.open_executor()
            held = executor.checkout(
                lambda conn: None, LOOK, self.manager.config.pool.connect_timeout
            )
        except Exception:
            return self._offline_client().connection
        held.release()
        self.reset_last_query()  # a look, not a query: last_query stays None
        return held.connection.connection

    @property
    def connections(self) -> Any:
        """The driver's round-robin spares as it would configure them (not the pool)."""
        return self._offline_client().connections

    @property
    def settings(self) -> dict[str, Any]:
        """The query settings every call carries (``Config.settings`` without the
        client-side ones), as the driver's ``Client.settings``."""
        return dict(self._offline_client().settings)

    @property
    def client_settings(self) -> dict[str, Any]:
        """The driver's client-side settings (use_numpy, insert_block_size, ...)."""
        return dict(self._offline_client().client_settings)

    @property
    def last_query(self) -> Any:
        """``QueryInfo`` (profile, progress, elapsed) of this thread's latest query."""
        last = self._last()
        if last is None or last.sequence <= getattr(self._local, "cleared", -1):
            return None
        if last.query_info is None:  # still running on this thread (a held result)
            return getattr(last.connection.client, "last_query", None)
        return last.query_info

    def reset_last_query(self) -> None:
        last = self._last()
        self._local.cleared = -1 if last is None else last.sequence

    def disconnect(self) -> None:
        """Close idle pooled connections (the driver's ``disconnect``); the client stays usable."""
        for host in self.manager.hosts:
            host.pool.prune(max_age=0)  # idle ones only: dispose() would forget overflow
        self.reset_last_query()

    disconnect_connection = disconnect

    def __repr__(self) -> str:
        return f"ResilientClient({self.manager.config.safe_url()})"

    # -- helpers ------------------------------------------------------------------------
    def _last(self) -> LastCheckout | None:
        found = [c for c in (h.pool.last_checkout() for h in self.manager.hosts) if c]
        if not found:
            return None
        return max(found, key=lambda c: c.sequence)

    def _pending(self) -> Pending:
        pending: Pending | None = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = Pending()
        return pending

    def _settings(self, settings: Mapping[str, Any] | None) -> dict[str, Any] | None:
        return dict(settings) if settings else None

    def _statement(self, query: str, params: Any, settings: dict[str, Any] | None) -> Statement:
        return Statement.of(query, params, settings, lambda: self.manager.supports(DEDUP_SETTING))

    def _on_driver(
        self,
        query: str,
        params: Any,
        settings: Mapping[str, Any] | None,
        run: Callable[[DriverClient, dict[str, Any] | None], T],
    ) -> T:
        """``run(driver_client, settings)`` on a pooled connection, as a call for ``query``."""
        sets = self._settings(settings)
        with self._traced(query):
            return self.manager.open_executor().call(
                lambda conn: run(conn.client, settings_for_server(sets, conn.features)),
                self._statement(query, params, sets),
            )

    def _traced(self, query: str) -> AbstractContextManager[Any]:
        cfg = self.manager.config
        return tracing.call(query, cfg.database, cfg.trace_query_text)

    def _offline_client(self) -> DriverClient:
        """A driver client that never connects: parameter substitution, and the connection
        shown before a first call could reach the server."""
        if self._offline is None:
            cfg = self.manager.config
            if self._driver_args is not None:  # exactly as the driver reads its arguments
                args, kwargs = self._driver_args
                self._offline = DriverClient(*args, **kwargs)
            else:
                self._offline = make_client(cfg, cfg.hosts[0], cfg.retry.timeout_per_attempt)
        return self._offline


class Client(ResilientClient):
    """``from chresilient import Client`` in place of ``from clickhouse_driver import
    Client``: the driver's constructor arguments, a pooled, retrying client behind them."""

    def __init__(self, *args: Any, config: Config | None = None, **kwargs: Any) -> None:
        super().__init__(ClickHouseConnectionManager(config_from_driver_args(args, kwargs, config)))
        self._driver_args = (args, dict(kwargs))
        # No threads until they are needed: the health monitor starts when a breaker first
        # opens, so a host that failed is seen answering again without waiting for a call.
        self.manager.events.listen(Event.BREAKER_OPENED, self._start_monitor)

    @classmethod
    def from_kwargs(cls, *args: Any, config: Config | None = None, **kwargs: Any) -> Any:
        return cls(*args, config=config, **kwargs)

    def _start_monitor(self, **_: Any) -> None:
        if not self.manager.closed:
            self.manager.start(wait=False)


_lock = fork.ChildLock()
_client: ResilientClient | None = None


def get_clickhouse_client(config: Config | None = None) -> ResilientClient:
    """The process-wide client; created on first use from ``config`` or the environment.

    After ``fork()`` the same client serves the child: its manager notices the fork on
    first use and opens its own connections and threads (see the manager).
    """
    global _client
    client = _client
    if client is not None and not client.manager.closed:
        return client
    with _lock.held():
        if _client is None or _client.manager.closed:
            manager = ClickHouseConnectionManager(config)
            manager.start(wait=False)
            _client = ResilientClient(manager)
        return _client


def reset_clickhouse_client() -> None:
    """Close the process-wide client; the next ``get_clickhouse_client()`` makes a new one."""
    global _client
    with _lock.held():
        if _client is not None:
            _client.manager.close()
        _client = None
