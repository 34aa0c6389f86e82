"""Thread and shutdown hygiene: close() is prompt, complete and idempotent.

A gunicorn worker calls close() while requests may still be blocked on a frozen server;
the worker must exit on time, leave no thread or socket behind, and lose no insert.
(A double close and ``execute`` after close are also covered by
tests/test_core.py::test_use_after_close_is_a_clear_error.)
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import in_thread, make_config, open_fds, wait_until

from chresilient import (
    CircuitState,
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    ClientClosedError,
    ConnectionPoolConfig,
    ResilientClient,
    RetryConfig,
)
from chresilient.errors import ClosedInFlightError

CLOSE_BOUND = 5.0  # close() ends calls at once (1 s for threads); not their 10 s bound


def _slow_config(server: Any, spool_dir: Path) -> Any:
    """Attempts bounded at 10 s: only close() can end a call on a frozen server sooner."""
    return make_config(
        server,
        spool_dir=str(spool_dir),
        retry=RetryConfig(max_attempts=3, timeout_per_attempt=10.0, total_timeout=30.0),
    )


@pytest.mark.faults
def test_close_interrupts_calls_in_flight_on_a_frozen_server(
    clickhouse_server: Any, tmp_path: Path
) -> None:
    """One read blocked on a pooled socket, one insert blocked in the connect handshake."""
    mgr = ClickHouseConnectionManager(_slow_config(clickhouse_server, tmp_path))
    mgr.start(wait=True, timeout=10)
    mgr.execute("CREATE TABLE t (id UInt64) ENGINE = MergeTree ORDER BY id")
    threads = [t for t in threading.enumerate() if t.name.startswith("chresilient-")]
    try:
        clickhouse_server.freeze()
        reader, read = in_thread(lambda: mgr.execute("SELECT 1"))
        wait_until(lambda: mgr.metrics()["checked_out"] == 1, timeout=15, what="read in flight")
        writer, write = in_thread(lambda: mgr.insert("t", [(1,), (2,)]))
        wait_until(lambda: mgr.metrics()["checked_out"] == 2, timeout=15, what="insert connecting")
        time.sleep(0.2)  # both are now blocked in recv() on the frozen server
        started = time.monotonic()
        mgr.close()
        closed_at = time.monotonic()
        assert closed_at - started < CLOSE_BOUND
        reader.join(CLOSE_BOUND)
        writer.join(CLOSE_BOUND)
        assert not reader.is_alive() and not writer.is_alive(), "a call outlived close()"
        assert read["ended"] - started < CLOSE_BOUND and write["ended"] - started < CLOSE_BOUND
        # The read fails with an error that says why; it is both "closed" and "unavailable"
        # (so a fallback applies), and it does not count against the server.
        error = read.get("error")
        assert isinstance(error, ClosedInFlightError), read
        assert isinstance(error, ClientClosedError)
        assert isinstance(error, ClickHouseUnavailableError)
        assert "in flight" in str(error)
        assert mgr.hosts[0].breaker.state is CircuitState.CLOSED
        # The insert never reached the server: it was spooled, not lost.
        assert "error" not in write, write
        assert write["result"].spooled and not write["result"].delivered
        for thread in threads:
            thread.join(0.5)
            assert not thread.is_alive(), f"{thread.name} survived close()"
        assert mgr.metrics()["connection_state"] == "closed"
    finally:
        clickhouse_server.thaw()
        mgr.close()
    # The next process (same spool dir) delivers what the closed one spooled.
    successor = ClickHouseConnectionManager(_slow_config(clickhouse_server, tmp_path))
    try:
        assert successor.spool is not None
        assert successor.spool.replay().batches == 1
        assert successor.execute("SELECT id FROM t ORDER BY id") == [(1,), (2,)]
    finally:
        successor.close()


def _all_connections_held(
    server: Any, spool_dir: Path, pool_size: int, max_connections: int
) -> tuple[ClickHouseConnectionManager, list[Any]]:
    """A manager whose every connection is held by an open stream (20 s pool timeout)."""
    pool = ConnectionPoolConfig(
        pool_size=pool_size, max_connections=max_connections, connection_timeout=20.0
    )
    mgr = ClickHouseConnectionManager(make_config(server, spool_dir=str(spool_dir), pool=pool))
    streams = [
        mgr.execute_iter("SELECT number FROM system.numbers LIMIT 1000000")
        for _ in range(max_connections)
    ]
    for rows in streams:
        assert next(rows) == (0,)
    return mgr, streams


def test_close_ends_the_waits_for_a_free_connection(clickhouse: Any, tmp_path: Path) -> None:
    mgr, _ = _all_connections_held(clickhouse, tmp_path, 1, 2)
    try:
        waiting = [in_thread(lambda: mgr.execute("SELECT 1")) for _ in range(3)]
        time.sleep(0.3)  # let them reach the pool's queue
        assert all(thread.is_alive() for thread, _ in waiting)
        closed_at = time.monotonic()
        mgr.close()
        for thread, box in waiting:
            thread.join(CLOSE_BOUND)
            assert not thread.is_alive()
            assert isinstance(box.get("error"), ClientClosedError), box
            assert box["ended"] - closed_at < CLOSE_BOUND  # not the 20 s pool timeout
    finally:
        mgr.close()


def test_reconnect_moves_waiting_callers_to_the_new_pool(clickhouse: Any, tmp_path: Path) -> None:
    # A caller waits for the one connection, held by a stream. reconnect() replaces the
    # pool: the caller is served by the new pool while the old connection is still held
    # (it no longer waits in the old pool for that connection to come back).
    mgr, streams = _all_connections_held(clickhouse, tmp_path, 1, 1)
    try:
        thread, box = in_thread(lambda: mgr.execute("SELECT 7"))
        time.sleep(0.3)
        assert thread.is_alive()  # waiting for the one connection
        assert mgr.reconnect()["reconnected"] is True
        thread.join(CLOSE_BOUND)
        assert box.get("result") == [(7,)], box
        streams[0].close()
    finally:
        mgr.close()


def test_close_leaves_no_thread_or_socket_behind(clickhouse: Any, tmp_path: Path) -> None:
    """Everything the manager started is gone after close(), also with a stream held open."""
    gc.collect()
    fds_before = open_fds()
    non_daemon_before = {t for t in threading.enumerate() if not t.daemon}
    mgr = ClickHouseConnectionManager(make_config(clickhouse, spool_dir=str(tmp_path)))
    try:
        mgr.start(wait=True, timeout=10)
        barrier = threading.Barrier(4)

        def use() -> None:
            barrier.wait(5)
            for i in range(20):
                assert mgr.execute("SELECT %(i)s", {"i": i}) == [(i,)]

        workers = [threading.Thread(target=use) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(10)
        assert mgr.health()["status"] == "healthy"
        rows = mgr.execute_iter("SELECT number FROM system.numbers LIMIT 100000000")
        assert next(rows) == (0,)
        mine = [t for t in threading.enumerate() if t.name.startswith("chresilient-")]
        assert mine, "start() should have started the monitor and the replayer"
        started = time.monotonic()
        mgr.close()
        assert time.monotonic() - started < CLOSE_BOUND
        # The stream's socket was shut down: it ends (after the rows already buffered).
        with pytest.raises(ClientClosedError):
            for _ in range(100_000_000):
                next(rows)
        for thread in mine:
            thread.join(1.0)
            assert not thread.is_alive(), f"{thread.name} survived close()"
        assert {t for t in threading.enumerate() if not t.daemon} == non_daemon_before
        gc.collect()
        assert open_fds() <= fds_before, "close() left file descriptors open"
    finally:
        mgr.close()


def test_every_entry_point_is_refused_after_close(clickhouse: Any, tmp_path: Path) -> None:
    """Use after close is a ClientClosedError everywhere, close() itself is always harmless."""
    mgr = ClickHouseConnectionManager(make_config(clickhouse, spool_dir=str(tmp_path)))
    try:
        client = ResilientClient(mgr)
        assert client.execute("SELECT 1") == [(1,)]
        closers = [threading.Thread(target=mgr.close) for _ in range(4)]  # concurrent closes
        for t in closers:
            t.start()
        for t in closers:
            t.join(CLOSE_BOUND)
            assert not t.is_alive()
        mgr.close()  # and once more afterwards
        calls: dict[str, Any] = {
            "execute": lambda: mgr.execute("SELECT 1"),
            "execute_iter": lambda: mgr.execute_iter("SELECT 1"),
            "insert": lambda: mgr.insert("t", [(1,)]),
            "insert_batches": lambda: mgr.insert_batches("t", [(1,)], batch_size=1),
            "reconnect": mgr.reconnect,
            "start": lambda: mgr.start(wait=False),
            "client.execute": lambda: client.execute("SELECT 1"),
        }
        for name, call in calls.items():
            with pytest.raises(ClientClosedError, match="closed") as info:
                call()
            # Not "unavailable": an insert refused this way must not be spooled silently.
            assert not isinstance(info.value, ClickHouseUnavailableError), name
        # Nothing was spooled by a refused insert: the caller got the error instead.
        assert mgr.spool is not None and mgr.spool.pending().batches == 0
        # Observability still answers, and says why.
        health = mgr.health()
        assert health["status"] == "unhealthy" and "closed" in " ".join(health["reasons"])
        assert mgr.metrics()["connection_state"] == "closed"
    finally:
        mgr.close()
