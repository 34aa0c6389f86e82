"""Claims of the README and docs that no other test proved, each against a real server."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client
from helpers import make_config, subprocess_env
from test_cli import run_cli

from chresilient import (
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    ConnectionPoolConfig,
    RetryConfig,
    StartupError,
    StartupTimeoutError,
)
from chresilient.testing.faultproxy import FaultProxy


def test_pool_exhausted_sends_the_batch_to_the_spool(clickhouse: Any, client: Client) -> None:
    table = f"exhausted_{uuid.uuid4().hex[:8]}"
    client.execute(f"CREATE TABLE {table} (id UInt8) ENGINE = Memory")
    cfg = make_config(
        clickhouse,
        retry=RetryConfig(timeout_per_attempt=3.0, total_timeout=1.0),
        pool=ConnectionPoolConfig(pool_size=1, max_connections=1, connection_timeout=0.5),
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        held = mgr.execute_iter("SELECT number FROM system.numbers LIMIT 2")
        assert next(held) == (0,)  # the only connection is busy
        result = mgr.insert(table, [(1,)], ["id"])
        assert result.spooled and "PoolTimeoutError" in (result.error or "")
        assert list(held) == [(1,)]
        assert mgr.spool is not None and mgr.spool.replay().batches == 1
    assert client.execute(f"SELECT id FROM {table}") == [(1,)]


def test_without_a_spool_an_insert_during_an_outage_raises(
    clickhouse: Any, fault_proxy: FaultProxy
) -> None:
    cfg = make_config(fault_proxy, auth=clickhouse, spool_enabled=False)
    with ClickHouseConnectionManager(cfg) as mgr:
        fault_proxy.refuse()
        with pytest.raises(ClickHouseUnavailableError):
            mgr.insert("anything", [(1,)], ["id"])
        assert mgr.spool is None and mgr.spool_health()["enabled"] is False


def test_start_raises_startup_timeout_in_process(fault_proxy: FaultProxy, clickhouse: Any) -> None:
    fault_proxy.refuse()
    with ClickHouseConnectionManager(make_config(fault_proxy, auth=clickhouse)) as mgr:
        with pytest.raises(StartupTimeoutError):
            mgr.start(wait=True, timeout=1.0)
        assert not mgr.started


def test_an_unknown_database_is_a_startup_error_and_cli_exit_3(
    clickhouse: Any, tmp_path: Path
) -> None:
    with ClickHouseConnectionManager(make_config(clickhouse, database="no_such_db")) as mgr:
        with pytest.raises(StartupError) as info:
            mgr.start(wait=True, timeout=20)
        assert "CLICKHOUSE_DB" in str(info.value) and not mgr.started
    env = subprocess_env(clickhouse, tmp_path, CLICKHOUSE_DB="no_such_db")
    result = run_cli(["wait", "--timeout", "20"], env, timeout=60)
    assert result.returncode == 3 and "CLICKHOUSE_DB" in result.stderr


def test_spool_replay_limit_and_purging_set_aside_batches(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    table, missing = (f"{p}_{uuid.uuid4().hex[:8]}" for p in ("verbs", "missing"))
    client.execute(f"CREATE TABLE {table} (id UInt8) ENGINE = Memory")
    cfg = make_config(fault_proxy, auth=clickhouse, spool_dir=str(tmp_path / "spool"))
    with ClickHouseConnectionManager(cfg) as mgr:
        fault_proxy.refuse()
        for n in range(3):
            assert mgr.insert(table, [(n,)], ["id"]).spooled
        assert mgr.insert(missing, [(9,)], ["id"]).spooled
    fault_proxy.pass_through()
    env = subprocess_env(
        clickhouse,
        tmp_path,
        CLICKHOUSE_HOST=fault_proxy.host,
        CLICKHOUSE_PORT=str(fault_proxy.port),
    )
    first = run_cli(["spool", "replay", "--limit", "1"], env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["batches"] == 1
    assert client.execute(f"SELECT count() FROM {table}") == [(1,)]
    rest = run_cli(["spool", "replay"], env)
    assert rest.returncode == 0, rest.stderr
    report = json.loads(rest.stdout)
    assert (report["batches"], report["set_aside"]) == (2, 1)
    with ClickHouseConnectionManager(cfg) as mgr:
        assert mgr.spool is not None
        purged = mgr.spool.purge(confirm=True, failed_only=True)
        assert (purged.batches, purged.rows) == (1, 1) and mgr.spool.set_aside() == []
    assert client.execute(f"SELECT id FROM {table} ORDER BY id") == [(0,), (1,), (2,)]
