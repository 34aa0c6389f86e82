"""``ResilientClient``: a drop-in for ``clickhouse_driver.Client`` backed by a manager.

``get_clickhouse_client()`` returns one client per process, configured from the
``CLICKHOUSE_*`` environment; after ``fork()`` (gunicorn with preload) the manager gives
the child its own sockets and threads on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from . import fork
from .config import Config
from .manager import ClickHouseConnectionManager


class ResilientClient:
    """``execute``/``execute_iter`` with clickhouse-driver's signatures and return values."""

    def __init__(self, manager: ClickHouseConnectionManager) -> None:
        self.manager = manager

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

    def disconnect(self) -> None:
        """Close idle pooled connections (the driver's ``disconnect``); the client stays usable."""
        for host in self.manager.hosts:
            host.pool.dispose()

    def __repr__(self) -> str:
        return f"ResilientClient({self.manager.config.safe_url()})"


_lock = threading.Lock()
_client: ResilientClient | None = None


class _ClientLock:
    """Re-creates the process-wide client's lock in a forked child (see chresilient.fork)."""

    def after_fork_in_child(self) -> None:
        global _lock
        _lock = threading.Lock()


_FORK_HOOK = _ClientLock()
fork.register(_FORK_HOOK)


def get_clickhouse_client(config: Config | None = None) -> ResilientClient:
    """The process-wide client; created on first use from ``config`` or the environment.

    After ``fork()`` the same client serves the child: its manager notices the fork on
    first use and opens its own connections and threads (see the manager).
    """
    global _client
    client = _client
    if client is not None and not client.manager.closed:
        return client
    with _lock:
        if _client is None or _client.manager.closed:
            manager = ClickHouseConnectionManager(config)
            manager.start(wait=False)
            _client = ResilientClient(manager)
        return _client


def reset_clickhouse_client() -> None:
    """Close the process-wide client; the next ``get_clickhouse_client()`` makes a new one."""
    global _client
    with _lock:
        if _client is not None:
            _client.manager.close()
        _client = None
