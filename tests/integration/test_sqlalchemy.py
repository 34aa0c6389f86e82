"""The SQLAlchemy glue against a real server: pooled sockets reused, disconnects detected."""

from __future__ import annotations

import faulthandler
import json
import os
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


def _local_port(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        dbapi = conn.connection.dbapi_connection
        return int(dbapi.client.connection.socket.getsockname()[1])  # type: ignore[union-attr]


def test_a_forked_child_gets_its_own_engine_connections(clickhouse: Any) -> None:
    # gunicorn --preload: an engine made (and used) in the master, then a worker forked.
    engine = create_engine(_config(clickhouse))
    try:
        parent_port = _local_port(engine)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                faulthandler.dump_traceback_later(50, exit=True)
                first_port = _local_port(engine)
                answers = []
                for i in range(20):
                    with engine.connect() as conn:
                        answers.append(conn.execute(sa.text(f"SELECT {i}")).scalar())
                report = {"port": first_port, "answers": answers}
                os.write(write_end, json.dumps(report).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        # The parent keeps using its socket meanwhile: no answer may go astray.
        assert [_local_port(engine) for _ in range(20)] == [parent_port] * 20
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end) as pipe:
            child = json.loads(pipe.read() or "{}")
        assert status == 0 and child["answers"] == list(range(20)), (status, child)
        assert child["port"] != parent_port  # a socket of its own
        assert _local_port(engine) == parent_port  # the parent's socket still works
    finally:
        engine.dispose()
