"""The SQLAlchemy glue against a real server: pooled sockets reused, disconnects detected."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from clickhouse_driver import Client
from helpers import server_tcp_connections

from chresilient import Config
from chresilient.sqlalchemy import create_engine


def _config(server: Any) -> Config:
    return Config(host=server.host, port=server.port)


def test_engine_reuses_one_socket(clickhouse: Any, client: Client) -> None:
    engine = create_engine(_config(clickhouse))
    try:
        before = server_tcp_connections(client)
        for i in range(20):
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT :x"), {"x": i}).scalar() == i
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        assert server_tcp_connections(client) - before == 1
        assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    finally:
        engine.dispose()


@pytest.mark.faults
def test_engine_survives_restart_and_marks_disconnects(clickhouse_server: Any) -> None:
    engine = create_engine(_config(clickhouse_server))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        clickhouse_server.restart()
        # The stale socket is found at checkout: no error for the caller.
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 2")).scalar() == 2
        with engine.connect() as conn:
            clickhouse_server.kill()
            # The dialect passes the socket's own error through (BrokenPipe, EOF), or
            # SQLAlchemy wraps it; either way handle_error marks a disconnect.
            with pytest.raises((sa.exc.DBAPIError, ConnectionError, EOFError)):
                conn.execute(sa.text("SELECT 3"))
            assert conn.invalidated
        clickhouse_server.start()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 4")).scalar() == 4
    finally:
        engine.dispose()
