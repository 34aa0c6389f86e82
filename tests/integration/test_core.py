"""Core behaviour against a real ClickHouse server: pool, retry, breaker, drop-in results."""

from __future__ import annotations

import datetime as dt
import decimal
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client
from clickhouse_driver.errors import ServerException
from helpers import make_config, server_tcp_connections

import chresilient
from chresilient import (
    ClickHouseConnectionManager,
    ClientClosedError,
    ConnectionPoolConfig,
)

MIXED_DDL = """
CREATE TABLE {name} (
    id UInt32, i8 Int8, u64 UInt64, f Float64, d Decimal(12, 3), s String, fs FixedString(4),
    day Date, ts DateTime, ts_tz DateTime('Asia/Kolkata'), u UUID, ns Nullable(String),
    arr Array(Int32), e Enum8('a' = 1, 'b' = 2)
) ENGINE = MergeTree ORDER BY id
"""


def _mixed_rows() -> list[tuple[Any, ...]]:
    rows = []
    for i in range(50):
        rows.append(
            (
                i,
                -i % 128 - 64,
                2**63 + i,
                i / 7,
                decimal.Decimal(f"{i}.125"),
                f"str{i}\u00e9" if i % 3 else "",
                b"ab\x00c"[: 1 + i % 4].decode("latin-1"),
                dt.date(2020, 1, 1) + dt.timedelta(days=i),
                dt.datetime(2021, 5, 6, 7, 8, 9) + dt.timedelta(hours=i),
                dt.datetime(2022, 1, 1, 12, 0, 0) + dt.timedelta(minutes=i),
                uuid.UUID(int=i * 7919),
                None if i % 2 else f"n{i}",
                list(range(i % 5)),
                "a" if i % 2 else "b",
            )
        )
    return rows


def test_results_equal_bare_driver(
    clickhouse: Any, mgr: ClickHouseConnectionManager, client: Client
) -> None:
    table = f"mixed_{uuid.uuid4().hex[:8]}"
    mgr.execute(MIXED_DDL.format(name=table))
    try:
        inserted = mgr.execute(f"INSERT INTO {table} VALUES", _mixed_rows())
        assert inserted == 50
        query = f"SELECT * FROM {table} WHERE id >= %(low)s ORDER BY id"
        params = {"low": 3}
        for kwargs in (
            {},
            {"with_column_types": True},
            {"columnar": True},
            {"columnar": True, "with_column_types": True},
        ):
            ours = mgr.execute(query, params, **kwargs)
            bare = client.execute(query, params, **kwargs)
            assert ours == bare, kwargs
        assert list(mgr.execute_iter(query, params)) == client.execute(query, params)
        drop_in = chresilient.ResilientClient(mgr)
        assert drop_in.execute(query, params, True) == client.execute(query, params, True)
    finally:
        mgr.execute(f"DROP TABLE {table}")


def test_pool_reuses_connections_under_load(clickhouse: Any) -> None:
    cfg = make_config(clickhouse, pool=ConnectionPoolConfig(pool_size=5, max_connections=10))
    mgr = ClickHouseConnectionManager(cfg)
    observer = Client(clickhouse.host, port=clickhouse.port)
    baseline = server_tcp_connections(observer)  # includes the observer itself
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server_tcp_connections(observer) - baseline)
            stop.wait(0.01)

    errors: list[BaseException] = []
    wrong: list[tuple[int, Any]] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                value = n * 1000 + i
                got = mgr.execute("SELECT %(v)s", {"v": value})
                if got != [(value,)]:
                    wrong.append((value, got))
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    sampler.join(timeout=5)
    try:
        assert not any(t.is_alive() for t in threads), "worker stuck"
        assert errors == []
        assert wrong == []
        assert 1 <= peak[0] <= 10, f"server saw {peak[0]} connections from the pool"
        metrics = mgr.metrics()
        assert metrics["queries_total"] == 32 * 200
        assert metrics["pool_hits"] > 32 * 200 * 0.9  # the sockets were really reused
        assert metrics["checked_out"] == 0
    finally:
        mgr.close()
        observer.disconnect()


def test_execute_iter_closed_early_discards_connection(
    mgr: ClickHouseConnectionManager,
) -> None:
    assert list(mgr.execute_iter("SELECT number FROM system.numbers LIMIT 10")) == [
        (i,) for i in range(10)
    ]
    before = mgr.metrics()["pool_invalidations"]
    rows = mgr.execute_iter("SELECT number FROM system.numbers LIMIT 1000000")
    assert next(rows) == (0,)
    rows.close()  # type: ignore[attr-defined]
    assert mgr.metrics()["pool_invalidations"] == before + 1
    assert mgr.metrics()["checked_out"] == 0
    assert mgr.execute("SELECT 3") == [(3,)]


def test_use_after_close_is_a_clear_error(clickhouse: Any) -> None:
    mgr = ClickHouseConnectionManager(make_config(clickhouse))
    try:
        assert mgr.execute("SELECT 1") == [(1,)]
        mgr.close()
        mgr.close()  # harmless
        with pytest.raises(ClientClosedError, match="closed"):
            mgr.execute("SELECT 1")
    finally:
        mgr.close()


def test_get_clickhouse_client_from_env(
    clickhouse: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CLICKHOUSE_HOST", clickhouse.host)
    monkeypatch.setenv("CLICKHOUSE_PORT", str(clickhouse.port))
    monkeypatch.setenv("CLICKHOUSE_SPOOL_DIR", str(tmp_path / "spool"))
    chresilient.reset_clickhouse_client()
    try:
        client = chresilient.get_clickhouse_client()
        assert client is chresilient.get_clickhouse_client()
        assert isinstance(client.manager, ClickHouseConnectionManager)
        assert client.execute("SELECT %(a)s + 1", {"a": 41}) == [(42,)]
        rows, columns = client.execute("SELECT 'x' AS s", None, True)
        assert rows == [("x",)] and columns == [("s", "String")]
        assert list(client.execute_iter("SELECT number FROM system.numbers LIMIT 3")) == [
            (0,),
            (1,),
            (2,),
        ]
        client.disconnect()
        assert client.execute("SELECT 1") == [(1,)]
    finally:
        chresilient.reset_clickhouse_client()


def test_a_caught_error_discards_one_connection_not_the_pool(clickhouse: Any) -> None:
    mgr = ClickHouseConnectionManager(make_config(clickhouse))
    try:
        barrier = threading.Barrier(3)

        def hold() -> None:
            barrier.wait(timeout=10)
            mgr.execute("SELECT sleep(0.2)")

        def three_at_once() -> None:
            threads = [threading.Thread(target=hold) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=20)

        three_at_once()  # three pooled connections
        host = mgr.hosts[0].pool
        before = host.stats.connects
        # Like a probe that catches its own error and returns the connection normally.
        with host.connection(5.0) as conn, pytest.raises(ServerException):
            conn.client.execute("SELEC 1")
        three_at_once()  # needs three again: the two kept, and one new for the discarded
        assert host.stats.connects - before == 1
    finally:
        mgr.close()


def _local_port(mgr: ClickHouseConnectionManager) -> int:
    with mgr.hosts[0].pool.connection(5.0) as conn:
        return int(conn.connection.socket.getsockname()[1])


def test_forked_child_uses_its_own_sockets_and_leaves_the_parents(clickhouse: Any) -> None:
    import json
    import os

    mgr = ClickHouseConnectionManager(make_config(clickhouse))
    try:
        mgr.start(wait=True, timeout=10)
        parent_port = _local_port(mgr)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: gunicorn's worker after --preload
            code = 1
            try:
                os.close(read_end)
                rows = mgr.execute("SELECT 42")
                assert mgr.spool is not None
                report = {
                    "rows": rows,
                    "port": _local_port(mgr),
                    "monitor": mgr.monitor.running,
                    "replayer": mgr.spool.replayer.running,
                }
                mgr.close()
                os.write(write_end, json.dumps(report).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            report = json.loads(pipe.read() or "{}")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert report["rows"] == [[42]]
        assert report["port"] != parent_port  # a socket of its own
        assert report["monitor"]  # the child's health monitor runs
        assert report["replayer"]  # and its spool replayer
        # The parent's pooled socket survived the child's close() and exit.
        assert mgr.execute("SELECT 7") == [(7,)]
        assert _local_port(mgr) == parent_port
        assert mgr.metrics()["query_errors_total"] == 0
    finally:
        mgr.close()
