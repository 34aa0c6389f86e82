"""SQLAlchemy engines over clickhouse-sqlalchemy's native dialect, with chresilient's pool.

clickhouse-sqlalchemy's DBAPI disconnects the driver whenever a cursor closes, so a plain
engine on it opens a new TCP connection per statement, and ``pool_pre_ping`` adds a round
trip on top. Here the engine runs on a :class:`~chresilient.pool.HostPool`: sockets stay
open between statements, liveness is a socket peek, and the driver errors that their DBAPI
wraps outside ``dbapi.Error`` are still recognised as disconnects (``handle_error``).

Requires the ``sqlalchemy`` extra (``pip install chresilient[sqlalchemy]``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from clickhouse_driver import Client
from clickhouse_sqlalchemy.drivers.native import connector
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.pool import QueuePool

from .config import Config
from .config_values import HostPort
from .connection import PooledConnection
from .errors import UNAVAILABLE_KINDS, classify
from .pool import HostPool


class _KeepAliveCursor(connector.Cursor):  # type: ignore[misc]
    """Their cursor closes the socket on ``close()``; a pooled socket must stay open."""

    def close(self) -> None:
        return None


class DbapiConnection(PooledConnection):
    """A pooled driver connection that also speaks clickhouse-sqlalchemy's DBAPI."""

    def __init__(self, client: Client, address: HostPort) -> None:
        super().__init__(client, address)
        self.transport = client

    def cursor(self) -> Any:
        return _KeepAliveCursor(self)

    def commit(self) -> None:
        """ClickHouse has no transactions."""


def _unwrap(exc: BaseException) -> BaseException:
    inner = getattr(exc, "orig", None)
    while isinstance(inner, BaseException) and inner is not exc:
        exc, inner = inner, getattr(inner, "orig", None)
    return exc


def _mark_disconnects(ctx: ExceptionContext) -> None:
    """Tell SQLAlchemy a broken socket is a disconnect, so the connection is discarded."""
    if classify(_unwrap(ctx.original_exception)) in UNAVAILABLE_KINDS:
        ctx.is_disconnect = True


def create_engine(config: Config | str, **engine_kwargs: Any) -> sa.Engine:
    """An engine for the first host of ``config`` (a :class:`Config` or a URL)."""
    cfg = Config.from_url(config) if isinstance(config, str) else config
    pool = HostPool(cfg, cfg.hosts[0], connection_class=DbapiConnection)
    pool.check_on_checkout()  # the engine checks out without HostPool.connection()
    engine = sa.create_engine("clickhouse+native://", pool=pool.queue_pool, **engine_kwargs)
    sa.event.listen(engine, "handle_error", _mark_disconnects)
    pool.followers.append(_repoint(weakref.ref(engine)))
    return engine


def _repoint(engine_ref: weakref.ref[sa.Engine]) -> Callable[[QueuePool], None]:
    """A forked child's engine uses the child's new pool (the parent's sockets stay the
    parent's)."""

    def repoint(new: QueuePool) -> None:
        engine = engine_ref()
        if engine is not None:
            engine.pool = new

    return repoint
