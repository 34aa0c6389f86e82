"""The spool under a full disk and poison batches, against a real server.

The disk is a real small tmpfs the test mounts (root is required: the suite fails, not
skips, without it); outages are a real TCP fault proxy refusing connections; the poison
batches are a 20,000-row batch the proxy resets the connection on (a request too large
for a middlebox) and a batch for a table dropped meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client
from helpers import free_port, make_config, subprocess_env, wait_for_recovery, wait_until
from test_cli import run_cli

from chresilient import ClickHouseConnectionManager, SpoolFullError
from chresilient.testing.faultproxy import FaultProxy

ROWS = 20  # per small batch


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full tests (root needed): {done.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk``; returns the filler file (delete it to free)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def _table(client: Client, name: str) -> str:
    table = f"{name}_{uuid.uuid4().hex[:8]}"
    client.execute(f"CREATE TABLE {table} (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
    return table


def _exactly(client: Client, table: str) -> tuple[int, int]:
    (row,) = client.execute(f"SELECT count(), uniqExact(id) FROM {table}")
    return int(row[0]), int(row[1])


def _rows(batch: int, size: int = ROWS) -> list[tuple[int, str]]:
    return [(batch * 100_000 + i, f"row-{batch}-{i}") for i in range(size)]


def test_disk_full_during_replay_then_freed_stores_every_row_once(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, small_disk: Path
) -> None:
    table = _table(client, "full")
    cfg = make_config(
        fault_proxy,
        auth=clickhouse,
        spool_dir=str(small_disk / "spool"),
        spool_replay_interval=0.2,
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        assert mgr.spool is not None
        fault_proxy.refuse()
        batches = 40
        for n in range(batches):
            assert mgr.insert(table, _rows(n), ["id", "s"]).spooled
        mgr.start(wait=False)
        filler = fill(small_disk)
        fault_proxy.pass_through()
        # With the disk full the replayer may deliver (the WAL's reserve holds the deletes)
        # or stall; either way it must not send a batch twice, and nothing may be lost.
        wait_until(lambda: _exactly(client, table)[0] > 0, 30, what="replay to start")
        count, unique = _exactly(client, table)
        assert count == unique
        assert mgr.health()["spool"]["state"] in ("ok", "full")
        filler.unlink()
        wait_until(
            lambda: mgr.spool is not None and mgr.spool.pending().batches == 0,
            60,
            what="the spool to drain",
        )
        assert _exactly(client, table) == (batches * ROWS, batches * ROWS)
        assert mgr.health()["spool"]["state"] == "ok"


def test_a_manager_starts_on_a_full_spool_disk_and_serves_queries(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, small_disk: Path
) -> None:
    table = _table(client, "fullstart")
    spool_dir = small_disk / "spool"
    cfg = make_config(fault_proxy, auth=clickhouse, spool_dir=str(spool_dir))
    fault_proxy.refuse()
    with ClickHouseConnectionManager(cfg) as first:
        assert first.insert(table, _rows(0), ["id", "s"]).spooled
    filler = fill(small_disk)
    fault_proxy.pass_through()
    with ClickHouseConnectionManager(cfg) as mgr:
        assert mgr.execute("SELECT 1") == [(1,)]
        assert mgr.insert(table, _rows(1), ["id", "s"]).delivered  # live inserts work too
        assert _exactly(client, table) == (ROWS, ROWS)
        health = mgr.health()
        assert health["status"] == "degraded"
        assert health["spool"]["state"] == "full" and "spool: full" in health["reasons"]
        assert mgr.metrics()["spool_state"] == "full"
        fault_proxy.refuse()
        fault_proxy.reset_active()  # the pooled connection too
        big = [(i, os.urandom(32).hex()) for i in range(40_000)]  # over the WAL's reserve
        with pytest.raises(SpoolFullError) as info:
            mgr.insert(table, big, ["id", "s"])
        assert info.value.cause == "disk full" and info.value.path == str(spool_dir)
        assert "free space" in str(info.value)
        # A full disk is never worked around by evicting, whatever the policy.
        with ClickHouseConnectionManager(cfg.replace(spool_full_policy="drop_oldest")) as evicts:
            with pytest.raises(SpoolFullError) as info:
                evicts.insert(table, big, ["id", "s"])
            assert info.value.cause == "disk full"
            assert evicts.metrics()["spool_dropped_batches"] == 0
        fault_proxy.pass_through()
        filler.unlink()
        assert mgr.health()["spool"]["state"] == "ok"  # freed: no write needed to see it
        wait_for_recovery(mgr)  # the refused calls left it unhealthy
        health = mgr.health()
        assert health["status"] == "degraded"  # still: the first batch waits
        assert f"spool holds {ROWS} rows waiting for delivery" in health["reasons"]
        assert mgr.spool is not None and mgr.spool.pending().batches == 1  # not evicted
        mgr.start(wait=True, timeout=30)
        wait_until(lambda: _exactly(client, table) == (2 * ROWS, 2 * ROWS), 30, what="replay")


def test_poison_batches_are_set_aside_while_the_rest_flows(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    ta, tb, gone = (_table(client, n) for n in ("pa", "pb", "pgone"))
    cfg = make_config(
        fault_proxy,
        auth=clickhouse,
        spool_dir=str(tmp_path / "spool"),
        spool_replay_interval=0.2,
        spool_max_attempts=3,
    )
    big = [(900_000_000 + i, "y" * 60) for i in range(20_000)]
    with ClickHouseConnectionManager(cfg) as mgr:
        fault_proxy.refuse()
        for n in range(100):
            assert mgr.insert(ta if n % 2 else tb, _rows(n, 5), ["id", "s"]).spooled
            if n == 10:
                assert mgr.insert(ta, big, ["id", "s"]).spooled  # dropped on the wire
                assert mgr.insert(gone, _rows(n, 5), ["id", "s"]).spooled
        client.execute(f"DROP TABLE {gone}")  # rejected for good on replay
        opens = mgr.metrics()["circuit_breaker_opens"]
        fault_proxy.reset_large_requests(200_000)
        fault_proxy.pass_through()
        mgr.start(wait=True, timeout=30)
        assert mgr.spool is not None
        spool = mgr.spool
        wait_until(
            lambda: spool.pending().batches == 0 and len(spool.set_aside()) == 2,
            90,
            what="100 batches delivered and 2 set aside",
        )
        assert _exactly(client, ta) == (250, 250) and _exactly(client, tb) == (250, 250)
        assert mgr.metrics()["circuit_breaker_opens"] == opens  # replay never opened it
        assert mgr.execute("SELECT 1") == [(1,)]  # live traffic was never refused
        poison, rejected = sorted(spool.set_aside(), key=lambda b: b.table != ta)
        assert poison.rows == 20_000 and poison.attempts == 3
        assert fault_proxy.oversized_resets_total >= 3
        assert rejected.attempts == 1 and "60" in (rejected.last_error or "")  # UNKNOWN_TABLE
        health = mgr.health()
        assert health["spool"]["failed_batches"] == 2
        assert health["spool"]["failed_rows"] == 20_005
        assert health["status"] == "degraded"
        assert "spool: 2 batches (20005 rows) set aside for the operator" in health["reasons"]
        metrics = mgr.metrics()
        assert (metrics["set_aside_batches"], metrics["set_aside_rows"]) == (2, 20_005)
        assert (metrics["spool_batches_set_aside"], metrics["spool_rows_set_aside"]) == (2, 20_005)
        assert (metrics["spool_batches_written"], metrics["spool_rows_written"]) == (102, 20_505)
        assert (metrics["spool_batches_replayed"], metrics["spool_rows_replayed"]) == (100, 500)
        fault_proxy.reset_large_requests(None)

    # The operator: list, export and load the poison batch, retry the other.
    env = subprocess_env(
        clickhouse,
        tmp_path,
        CLICKHOUSE_HOST=fault_proxy.host,
        CLICKHOUSE_PORT=str(fault_proxy.port),
        CLICKHOUSE_SPOOL_MAX_ATTEMPTS="3",
    )
    listed = run_cli(["spool", "list"], env)
    assert listed.returncode == 0, listed.stderr
    seqs = {b["table"].strip("`"): b["seq"] for b in json.loads(listed.stdout)}
    assert set(seqs) == {ta, gone} and "y" * 60 not in listed.stdout  # no row contents
    export = tmp_path / "poison.jsonl"
    done = run_cli(["spool", "export", str(seqs[ta]), "--output", str(export)], env)
    assert done.returncode == 0, done.stderr
    _load_as_printed(done.stderr, clickhouse)
    assert _exactly(client, ta) == (20_250, 20_250)
    assert run_cli(["spool", "discard", str(seqs[ta]), "--yes"], env).returncode == 0
    client.execute(f"CREATE TABLE {gone} (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
    assert run_cli(["spool", "retry", str(seqs[gone])], env).returncode == 0
    replayed = run_cli(["spool", "replay"], env)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["batches"] == 1
    assert _exactly(client, gone) == (5, 5)
    assert json.loads(run_cli(["spool", "list"], env).stdout) == []


def test_a_spool_is_replayed_by_a_manager_spelling_its_hosts_differently(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    table = _table(client, "spelled")
    spool_dir = str(tmp_path / "spool")
    with contextlib.closing(FaultProxy(("127.0.0.1", fault_proxy.port))) as other:
        other.start()  # another ClickHouse address, also in the spool directory
        fault_proxy.refuse()
        other.refuse()
        for host, port, n in (("127.0.0.1", fault_proxy.port, 0), ("127.0.0.1", other.port, 1)):
            cfg = make_config(clickhouse, host=host, port=port, spool_dir=spool_dir)
            with ClickHouseConnectionManager(cfg) as writer:
                assert writer.insert(table, _rows(n), ["id", "s"]).spooled
        fault_proxy.pass_through()
        # localhost instead of 127.0.0.1, and a replica added to the list.
        reader_cfg = make_config(
            clickhouse,
            host="localhost",
            port=fault_proxy.port,
            alt_hosts=(f"127.0.0.1:{free_port()}",),
            spool_dir=spool_dir,
        )
        with ClickHouseConnectionManager(reader_cfg) as reader:
            assert reader.spool is not None
            assert reader.spool.pending().batches == 1  # its own; not the other address's
            report = reader.spool.replay()
            assert (report.outcome, report.batches) == ("drained", 1)
        assert _exactly(client, table) == (ROWS, ROWS)
        (row,) = client.execute(f"SELECT min(id) FROM {table}")
        assert row[0] == 0  # batch 0: the one spooled for this address


def _load_as_printed(stderr: str, server: Any) -> None:
    """Run the load command ``spool export`` printed, in a shell, as an operator would."""
    (line,) = [x for x in stderr.splitlines() if "clickhouse-client --query" in x]
    command = line[line.index("clickhouse-client") :]
    conn = shlex.join(
        ["--host", server.host, "--port", str(server.port), "--user", server.user,
         "--password", server.password, "--database", server.database]
    )  # fmt: skip
    command = command.replace("clickhouse-client", f"clickhouse-client {conn}", 1)
    subprocess.run(["bash", "-c", command], check=True, timeout=60, capture_output=True)


def test_a_spool_that_fills_its_own_disk_still_drains(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, small_disk: Path
) -> None:
    table = _table(client, "wedge")
    cfg = make_config(
        fault_proxy,
        auth=clickhouse,
        spool_dir=str(small_disk / "spool"),
        spool_replay_interval=0.2,
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        fault_proxy.refuse()
        spooled = 0
        for n in range(2_000):  # until the spool refuses: it must keep room to drain
            rows = [(n * 1_000 + i, os.urandom(16).hex()) for i in range(200)]
            try:
                mgr.insert(table, rows, ["id", "s"])
            except SpoolFullError as err:
                assert err.cause == "disk full" and "to drain" in str(err)
                break
            spooled += len(rows)
        else:
            pytest.fail("the spool never said its disk was full")
        assert spooled > 0 and mgr.health()["spool"]["state"] == "full"
        fault_proxy.pass_through()
        mgr.start(wait=True, timeout=30)
        assert mgr.spool is not None
        spool = mgr.spool
        wait_until(lambda: spool.pending().batches == 0, 90, what="the full spool to drain")
        assert _exactly(client, table) == (spooled, spooled)
        assert mgr.health()["spool"]["state"] == "ok"


def test_set_aside_batches_never_show_their_values(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, tmp_path: Path, capsys: Any
) -> None:
    secret = "ROWSECRET42"
    table = f"enum_{uuid.uuid4().hex[:8]}"
    client.execute(f"CREATE TABLE {table} (e Enum8('a' = 1)) ENGINE = Memory")
    cfg = make_config(
        fault_proxy,
        auth=clickhouse,
        spool_dir=str(tmp_path / "spool"),
        spool_replay_interval=0.2,
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        fault_proxy.refuse()
        assert mgr.insert(table, [(secret,)], ["e"]).spooled  # only ClickHouse knows it is bad
        fault_proxy.pass_through()
        mgr.start(wait=True, timeout=30)
        assert mgr.spool is not None
        spool = mgr.spool
        wait_until(lambda: len(spool.set_aside()) == 1, 30, what="the batch set aside")
        (aside,) = spool.set_aside()
        assert aside.last_error is not None and "withheld" in aside.last_error
        seen = json.dumps([mgr.health(), mgr.metrics(), spool.status()], default=str)
    env = subprocess_env(
        clickhouse,
        tmp_path,
        CLICKHOUSE_HOST=fault_proxy.host,
        CLICKHOUSE_PORT=str(fault_proxy.port),
    )
    cli = [run_cli(["spool", verb, *extra], env) for verb, extra in
           (("list", []), ("show", [str(aside.seq)]), ("status", []))]  # fmt: skip
    out = capsys.readouterr()
    for text in (seen, out.out, out.err, *(c.stdout + c.stderr for c in cli)):
        assert secret not in text


def test_exported_batches_load_back_as_the_same_rows(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    import datetime as dt
    import decimal

    columns = "id UInt32, d Decimal(12, 3), t DateTime, tags Array(String), n Nullable(String)"
    names = ["id", "d", "t", "tags", "n"]
    reference, target = (f"{p}_{uuid.uuid4().hex[:8]}" for p in ("ref", "exp"))
    for name in (reference, target):
        client.execute(f"CREATE TABLE {name} ({columns}) ENGINE = MergeTree ORDER BY id")
    aware = dt.datetime(2020, 1, 1, 22, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    rows = [
        (1, decimal.Decimal("1.50"), aware, ["it's", "é", 'q"x', "back\\slash"], None),
        (2, decimal.Decimal("-12345.678"), dt.datetime(2021, 6, 1, 0, 0, 1), [], "plain"),
        (3, decimal.Decimal("0"), dt.datetime(2021, 6, 1), ["\\N"], "\\N"),  # text, not NULL
    ]
    client.execute(f"INSERT INTO {reference} ({', '.join(names)}) VALUES", rows)
    cfg = make_config(fault_proxy, auth=clickhouse, spool_dir=str(tmp_path / "spool"))
    with ClickHouseConnectionManager(cfg) as mgr:
        fault_proxy.refuse()
        assert mgr.insert(target, rows, names).spooled
        client.execute(f"RENAME TABLE {target} TO {target}_away")  # rejected on replay
        fault_proxy.pass_through()
        wait_for_recovery(mgr)  # the refused connects opened the breaker
        assert mgr.spool is not None  # replayed here, in this thread (no replayer started)
        report = mgr.spool.replay()
        assert report.set_aside == 1
        (aside,) = mgr.spool.set_aside()
    client.execute(f"RENAME TABLE {target}_away TO {target}")
    env = subprocess_env(
        clickhouse,
        tmp_path,
        CLICKHOUSE_HOST=fault_proxy.host,
        CLICKHOUSE_PORT=str(fault_proxy.port),
    )
    want = client.execute(f"SELECT {', '.join(names)} FROM {reference} ORDER BY id")
    for fmt in ("jsonl", "csv"):
        client.execute(f"TRUNCATE TABLE {target}")
        path = tmp_path / f"batch.{fmt}"
        done = run_cli(
            ["spool", "export", str(aside.seq), "--format", fmt, "--output", str(path)], env
        )
        assert done.returncode == 0, done.stderr
        _load_as_printed(done.stderr, clickhouse)
        got = client.execute(f"SELECT {', '.join(names)} FROM {target} ORDER BY id")
        assert got == want, fmt
