"""The spool on its own: exact encoding, durable store, limits, leases, bad directories.

Faults here are real too: a port nothing listens on (refused), a spool path under a
regular file, several processes writing one SQLite file at once.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import ipaddress
import itertools
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
import zoneinfo
from pathlib import Path
from typing import Any

import pytest
import pytz
import structlog

from chresilient import (
    CircuitBreakerConfig,
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    Config,
    ConfigError,
    InvalidBatchError,
    RetryConfig,
    SpoolError,
    SpoolFullError,
)
from chresilient.observability.prometheus import exposition
from chresilient.spool import SpoolStore
from chresilient.spool.codec import SpoolEncodeError, decode_rows, encode_rows
from chresilient.statement import quote_identifier, quote_table


class Color(enum.Enum):
    red = "r"


class Level(enum.IntEnum):
    high = 3


KOLKATA = zoneinfo.ZoneInfo("Asia/Kolkata")
NEW_YORK = pytz.timezone("America/New_York")

EVERY_TYPE: list[Any] = [
    0,
    -(2**63),
    2**64 - 1,
    2**255 + 17,  # UInt256-sized
    -(2**200),
    True,
    False,
    None,
    0.1,
    -0.0,
    1e-320,  # subnormal
    float("inf"),
    float("-inf"),
    "",
    "plain",
    "\x00\x01\n\r\t'\"`\\ {}[]$",
    "\u00e9\u4e2d\U0001f600",
    "\udc80 lone surrogate",
    b"",
    b"\x00\xff\xfe binary",
    bytearray(b"\x01\x02"),
    dt.date(1970, 1, 1),
    dt.date(2106, 2, 7),
    dt.datetime(2021, 5, 6, 7, 8, 9),
    dt.datetime(2021, 5, 6, 7, 8, 9, 123456),
    dt.datetime(2021, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc),
    dt.datetime(2021, 5, 6, 7, 8, 9, tzinfo=KOLKATA),
    dt.datetime(2021, 11, 7, 1, 30, tzinfo=zoneinfo.ZoneInfo("America/New_York"), fold=1),
    NEW_YORK.localize(dt.datetime(2021, 11, 7, 1, 30), is_dst=False),
    NEW_YORK.localize(dt.datetime(2021, 7, 1, 12, 0)),
    dt.datetime(2021, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-3, minutes=-30))),
    dt.datetime(2021, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2), "CEST-ish")),
    decimal.Decimal("0"),
    decimal.Decimal("-0.0001"),
    decimal.Decimal("1.2300"),  # trailing zeros are part of the value's identity
    decimal.Decimal("123456789012345678901234567.8901234567"),
    decimal.Decimal("1E+5"),
    decimal.Decimal("Infinity"),
    uuid.UUID("00000000-0000-0000-0000-000000000000"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    ipaddress.IPv4Address("192.168.0.1"),
    ipaddress.IPv6Address("2001:db8::1"),
    [],
    [1, 2, 3],
    [[None, "a"], [], ["b"]],
    (1, "x", (2.5, None)),
    [(1, "a"), (2, "b")],
    {"k": 1, "j": [1, 2]},
    {1: dt.date(2020, 1, 1), (1, 2): None},
    dt.timedelta(days=-1, seconds=5, microseconds=7),
    dt.time(23, 59, 59, 999999),
    "r",  # Enum8 columns take the name as a str
]


def _same(a: Any, b: Any) -> bool:
    """Equal, of the same type, and (datetimes) in the same zone with the same offset."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)  # Decimal('1.2300') == Decimal('1.23') is not enough
    if isinstance(a, dt.datetime):
        return (
            a == b
            and a.fold == b.fold
            and a.utcoffset() == b.utcoffset()
            and str(a.tzinfo) == str(b.tzinfo)
            and a.replace(tzinfo=None) == b.replace(tzinfo=None)
        )
    return bool(a == b)


def test_codec_round_trip_of_every_supported_type_is_exact() -> None:
    rows = [tuple(EVERY_TYPE), tuple(reversed(EVERY_TYPE)), (float("nan"), [float("nan")])]
    decoded = decode_rows(encode_rows(rows))
    assert len(decoded) == len(rows)
    for row, back in zip(rows, decoded):
        assert type(back) is tuple
        for value, got in zip(row, back):
            assert _same(value, got), (value, got)


def test_codec_batches_of_plain_values_round_trip_exactly() -> None:
    # Rows of plain values only (the common batch) are stored without a walk per value;
    # the same row with one value that needs a tag takes the tagged path.
    plain = (0, -1, 2**70, 1.5, float("inf"), True, False, None, "", "\udc80 é")
    for rows in ([plain, list(plain)], (plain,), [plain, (*plain, (1, 2))[1:]]):
        decoded = decode_rows(encode_rows(rows))
        assert len(decoded) == len(rows)
        for row, back in zip(rows, decoded):
            assert type(back) is tuple and all(_same(v, g) for v, g in zip(row, back))
    assert decode_rows(encode_rows([(Level.high, 2)]))[0][0].name == "high"  # an int subclass


def test_codec_enum_members_travel_as_the_driver_sends_them() -> None:
    (row,) = decode_rows(encode_rows([(Color.red, Level.high)]))
    assert row[0] == "red"  # a plain Enum: the driver sends its name
    assert row[1] == 3 and row[1].name == "high" and isinstance(row[1], int)


def test_codec_refuses_what_it_cannot_store_exactly(tmp_path: Path) -> None:
    with pytest.raises(SpoolEncodeError, match="object"):
        encode_rows([(1, object())])
    # Through insert() during an outage: a SpoolError caused by the SpoolEncodeError (a
    # TypeError) when it would be spooled; nothing kept, the caller still has the rows.
    mgr = ClickHouseConnectionManager(_refusing_config(tmp_path))
    try:
        with pytest.raises(SpoolError) as info:
            mgr.insert("t", [(1, object())], ["id", "x"])
        assert isinstance(info.value.__cause__, SpoolEncodeError)
        assert isinstance(info.value.__cause__, TypeError)
        assert isinstance(info.value.clickhouse_error, ClickHouseUnavailableError)
        assert mgr.metrics()["connection_attempts"] > 0  # it was an outage, not a refusal
        assert mgr.spool is not None and mgr.spool.pending().batches == 0
    finally:
        mgr.close()


def test_quoting_escapes_backticks_and_backslashes() -> None:
    assert quote_identifier("a`b\\c") == "`a\\`b\\\\c`"
    assert quote_table("db.events") == "`db`.`events`"
    assert quote_table(("db", "with.dot")) == "`db`.`with.dot`"
    assert quote_table("t") == "`t`"
    for bad in ("", "a\x00b"):
        with pytest.raises(InvalidBatchError):
            quote_identifier(bad)


def _store(path: Path, **kwargs: Any) -> SpoolStore:
    kwargs.setdefault("target", "127.0.0.1:9000/default")
    kwargs.setdefault("max_bytes", 10_000_000)
    return SpoolStore(str(path), **kwargs)


def test_store_keeps_batches_whole_and_in_order_per_table(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for n in range(3):
        for table in ("`a`", "`b`"):
            rows = [(n, f"{table}-{i}") for i in range(10)]
            store.put(table, ["n", "s"], rows, batch_id=f"{table}{n}", settings={"x": 1})
    seen = []
    while (batch := store.claim(lease_seconds=60)) is not None:
        assert batch.columns == ("n", "s") and batch.settings == {"x": 1}
        assert batch.decode_rows() == [
            (int(batch.batch_id[-1]), f"{batch.table}-{i}") for i in range(10)
        ]
        seen.append(batch.batch_id)
        assert store.ack(batch)
    assert seen == ["`a`0", "`b`0", "`a`1", "`b`1", "`a`2", "`b`2"]
    assert store.totals().batches == 0


def test_a_leased_batch_blocks_its_table_for_other_owners(tmp_path: Path) -> None:
    first, second = _store(tmp_path), _store(tmp_path)
    for n in range(2):
        first.put("`a`", None, [(n,)], batch_id=f"a{n}")
    first.put("`b`", None, [(9,)], batch_id="b0")
    held = first.claim(lease_seconds=60)
    assert held is not None and held.batch_id == "a0"
    # The other owner may neither take a0 nor overtake it with a1; table b is free.
    other = second.claim(lease_seconds=60)
    assert other is not None and other.batch_id == "b0"
    assert second.ack(other)
    assert second.claim(lease_seconds=60) is None
    assert not second.ack(held)  # not its lease
    # Holding the replay lock proves the first owner stopped replaying: take over.
    with second.replay_lock() as locked:
        assert locked is True
        with first.replay_lock() as busy:
            assert busy is False
        stolen = second.claim(lease_seconds=60, steal=True)
    assert stolen is not None and stolen.batch_id == "a0"
    assert second.ack(stolen) and not first.ack(held)


def test_spool_full_raises_and_keeps_what_it_has(tmp_path: Path) -> None:
    # A real outage: nothing listens on the port, every insert is refused.
    cfg = _refusing_config(tmp_path, spool_max_bytes=6_000)
    mgr = ClickHouseConnectionManager(cfg)
    accepted: list[list[tuple[int, str]]] = []
    try:
        with pytest.raises(SpoolFullError, match="spool is full") as info:
            for n in range(100):
                rows = [(n * 100 + i, f"row {i} " + "x" * 30) for i in range(20)]
                result = mgr.insert("t", rows, ["id", "s"])
                assert result.spooled and not result.delivered
                accepted.append(rows)
        assert 3 <= len(accepted) < 100
        assert "of 6000 bytes used" in str(info.value)
        status = mgr.spool.status()  # type: ignore[union-attr]
        assert status["pending_batches"] == len(accepted)
        assert status["pending_rows"] == 20 * len(accepted)
        assert status["used_bytes"] <= 6_000
        # Everything accepted before is intact, in order.
        store = mgr.spool.store  # type: ignore[union-attr]
        got = []
        while (batch := store.claim(lease_seconds=60)) is not None:
            got.append([tuple(r) for r in batch.decode_rows()])
            store.set_aside(batch, "inspected")  # so the next claim moves on
        assert got == [[tuple(r) for r in rows] for rows in accepted]
    finally:
        mgr.close()


def test_drop_oldest_policy_evicts_and_counts(tmp_path: Path) -> None:
    mgr = ClickHouseConnectionManager(
        _refusing_config(tmp_path, spool_max_bytes=3_000, spool_full_policy="drop_oldest")
    )
    try:
        with structlog.testing.capture_logs() as logs:
            results = [
                mgr.insert("t", [(n, "y" * 40) for _ in range(10)], ["id", "s"]) for n in range(40)
            ]
        assert all(r.spooled for r in results)
        metrics = mgr.metrics()
        assert metrics["spool_dropped_batches"] > 0
        assert metrics["spool_dropped_rows"] == 10 * metrics["spool_dropped_batches"]
        assert metrics["pending_batches"] == 40 - metrics["spool_dropped_batches"]
        # Each eviction is logged with its table, batch id and rows: the oldest ones.
        dropped = [e for e in logs if e["event"] == "spool_dropped_oldest"]
        assert len(dropped) == metrics["spool_dropped_batches"]
        evicted = [r.batch_id for r in results[: len(dropped)]]
        assert [e["batch_id"] for e in dropped] == evicted
        assert all(e["table"] == "`t`" and e["rows"] == 10 for e in dropped)
        first = mgr.spool.store.claim(lease_seconds=60)  # type: ignore[union-attr]
        assert first is not None and first.decode_rows()[0][0] == metrics["spool_dropped_batches"]
    finally:
        mgr.close()


def test_block_policy_waits_for_space_then_gives_up(tmp_path: Path) -> None:
    mgr = ClickHouseConnectionManager(
        _refusing_config(
            tmp_path, spool_max_bytes=1_000, spool_full_policy="block", spool_block_timeout=0.6
        )
    )
    spool = mgr.spool
    assert spool is not None
    rows = [(1, "z" * 200)]
    try:
        assert mgr.insert("t", rows, ["id", "s"]).spooled
        size = spool.store.totals(all_targets=True).bytes
        while spool.store.totals(all_targets=True).bytes + size <= 1_000:
            assert mgr.insert("t", rows, ["id", "s"]).spooled
        started = time.monotonic()
        with pytest.raises(SpoolFullError):
            mgr.insert("t", rows, ["id", "s"])
        assert 0.5 < time.monotonic() - started < 10.0  # waited its 0.6 s; hang guard
        # Space freed while it waits (here: a purge) lets the insert through.
        threading.Timer(0.2, lambda: spool.purge(confirm=True)).start()
        assert mgr.insert("t", rows, ["id", "s"]).spooled
    finally:
        mgr.close()


def test_purge_needs_confirmation(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put("`t`", None, [(1,)], batch_id="x")
    with pytest.raises(ValueError, match="confirm=True"):
        store.purge()
    assert store.purge(confirm=True).batches == 1
    assert store.totals().batches == 0


def test_bad_rows_fail_before_anything_is_sent_or_spooled(tmp_path: Path) -> None:
    mgr = ClickHouseConnectionManager(_refusing_config(tmp_path))
    try:
        with pytest.raises(InvalidBatchError, match=r"row 2 has 1 values, expected 2 columns"):
            mgr.insert("t", [(1, "a"), (2, "b"), (3,)], ["id", "s"])
        with pytest.raises(InvalidBatchError, match="row 1 has 3 values"):
            mgr.insert("t", [(1, "a"), (2, "b", "c")])
        with pytest.raises(InvalidBatchError, match="row 0 is a int"):
            mgr.insert("t", [1, 2])
        with pytest.raises(InvalidBatchError, match="row 1 has no column 's'"):
            mgr.insert("t", [{"id": 1, "s": "a"}, {"id": 2, "x": "b"}])
        assert mgr.metrics()["connection_attempts"] == 0  # nothing was even tried
        with pytest.raises(InvalidBatchError, match=r"batch 1: row 3 has 1 values"):
            mgr.insert_batches("t", iter([(1, "a"), (2, "b"), (3, "c"), (4,)]), batch_size=2)
        # Only the good first batch was tried (its connects refused: nothing sent, so
        # retried like a read), then spooled.
        assert mgr.metrics()["connection_attempts"] == mgr.config.retry.max_attempts
        assert mgr.spool is not None and mgr.spool.pending().batches == 1
    finally:
        mgr.close()


def test_unwritable_spool_dir_starts_degraded_and_names_the_problem(tmp_path: Path) -> None:
    from chresilient import SpoolError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for bad in (blocker / "spool", blocker):
        with structlog.testing.capture_logs() as logs:
            mgr = ClickHouseConnectionManager(_refusing_config(tmp_path, spool_dir=str(bad)))
        try:
            assert mgr.spool is not None and mgr.spool.state == "unwritable"
            (unusable,) = [e for e in logs if e["event"] == "spool_unusable"]
            assert unusable["cause"] == "unwritable" and str(bad) in unusable["error"]
            assert "CLICKHOUSE_SPOOL_DIR" in unusable["error"]  # the fix
            health = mgr.health()
            assert health["spool"]["state"] == "unwritable"
            assert mgr.metrics()["spool_state"] == "unwritable"
            assert b"chresilient_spool_usable 0.0" in exposition(mgr)[0]
            with pytest.raises(SpoolError) as info:  # an outage: the batch cannot be kept
                mgr.insert("t", [(1, "a")], ["id", "s"])
            assert info.value.cause == "unwritable" and info.value.path == str(bad)
            assert str(bad) in str(info.value) and "CLICKHOUSE_SPOOL_DIR" in str(info.value)
            assert info.value.clickhouse_error is not None
        finally:
            mgr.close()
    # Fixed by the operator: the spool works again without a restart.
    fixed = tmp_path / "fixed"
    fixed.write_text("in the way")
    mgr = ClickHouseConnectionManager(_refusing_config(tmp_path, spool_dir=str(fixed / "s")))
    try:
        assert mgr.spool is not None and mgr.spool.state == "unwritable"
        fixed.unlink()
        assert mgr.insert("t", [(1, "a")], ["id", "s"]).spooled
        assert mgr.spool.state == "ok"
    finally:
        mgr.close()
    # Disabled spool: no directory needed, and insert() raises instead of spooling.
    mgr = ClickHouseConnectionManager(
        Config(host="127.0.0.1", port=1, spool_dir=str(blocker / "spool"), spool_enabled=False)
    )
    assert mgr.spool is None and mgr.spool_health()["enabled"] is False
    mgr.close()


def test_spool_settings_are_validated_and_read_from_env() -> None:
    for field, value in (
        ("spool_full_policy", "panic"),
        ("spool_block_timeout", -1),
        ("spool_replay_interval", 0),
        ("spool_enabled", "yes"),
        ("spool_dir", ""),
        ("spool_max_attempts", 1),  # at least 2: one failure may be an outage ending
    ):
        with pytest.raises(ConfigError) as info:
            Config(**{field: value})
        assert info.value.field == field
    assert Config(spool_max_attempts=2).spool_max_attempts == 2
    cfg = Config.from_env(
        {
            "CLICKHOUSE_SPOOL_FULL_POLICY": "drop_oldest",
            "CLICKHOUSE_SPOOL_ENABLED": "false",
            "CLICKHOUSE_SPOOL_BLOCK_TIMEOUT": "2.5",
            "CLICKHOUSE_SPOOL_MAX_ATTEMPTS": "3",
            "CLICKHOUSE_SPOOL_MAX_BYTES": "1048576",
        }
    )
    assert (cfg.spool_full_policy, cfg.spool_enabled, cfg.spool_block_timeout) == (
        "drop_oldest",
        False,
        2.5,
    )
    assert (cfg.spool_max_attempts, cfg.spool_max_bytes) == (3, 1048576)
    with pytest.raises(ConfigError) as info:
        Config.from_env({"CLICKHOUSE_SPOOL_MAX_ATTEMPTS": "1"})
    assert info.value.field == "CLICKHOUSE_SPOOL_MAX_ATTEMPTS"
    with pytest.raises(ConfigError) as info:
        Config.from_env({"CLICKHOUSE_SPOOL_FULL_POLICY": "panic"})
    assert info.value.field == "CLICKHOUSE_SPOOL_FULL_POLICY"


def _writer(directory: str, worker: int, count: int) -> None:
    store = SpoolStore(directory, target="127.0.0.1:9000/default", max_bytes=50_000_000)
    for n in range(count):
        store.put("`t`", ["w", "n"], [(worker, n)] * 5, batch_id=f"{worker}-{n}")


def test_processes_sharing_a_spool_dir_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = _store(tmp_path)
    assert store.totals().batches == 160
    order: dict[int, list[int]] = {}
    while (batch := store.claim(lease_seconds=60)) is not None:
        ((worker, n),) = set(batch.decode_rows())
        order.setdefault(worker, []).append(n)
        store.ack(batch)
    assert order == {w: list(range(40)) for w in range(4)}


def _endless_writer(directory: str) -> None:
    store = SpoolStore(directory, target="127.0.0.1:9000/default", max_bytes=500_000_000)
    for n in itertools.count():
        store.put("`t`", ["n", "s"], [(n, "x" * 50)] * 7, batch_id=f"b{n}")


def test_a_batch_is_whole_or_absent_after_a_kill(tmp_path: Path) -> None:
    """spool.md: each write is one transaction, so a SIGKILL mid-write leaves no part."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_endless_writer, args=(str(tmp_path),))
    proc.start()
    try:
        store = _store(tmp_path)
        deadline = time.monotonic() + 60
        while store.totals().batches < 30:  # the child is writing in a loop
            assert time.monotonic() < deadline and proc.is_alive(), "the writer did not write"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    store = _store(tmp_path)  # reopened after the crash
    totals = store.totals()
    assert totals.batches >= 30 and totals.rows == 7 * totals.batches
    seen = []
    while (batch := store.claim(lease_seconds=60)) is not None:
        rows = batch.decode_rows()
        assert len(rows) == 7 and {r[0] for r in rows} == {int(batch.batch_id[1:])}
        seen.append(int(batch.batch_id[1:]))
        assert store.ack(batch)
    assert seen == list(range(totals.batches))  # in order, none missing in between


def _refusing_config(tmp_path: Path, **changes: Any) -> Config:
    """A config whose server refuses every connection (nothing listens on the port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Config(
        host="127.0.0.1",
        port=port,
        retry=RetryConfig(
            initial_delay=0.02, max_delay=0.2, timeout_per_attempt=3.0, total_timeout=20.0
        ),
        breaker=CircuitBreakerConfig(failure_threshold=5, recovery_timeout=1.0),
        **{"spool_dir": str(tmp_path / "spool"), **changes},
    )


def test_fork_safe_store_reopens_in_child(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put("`t`", None, [(1,)], batch_id="parent")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            store.put("`t`", None, [(2,)], batch_id="child")
            os._exit(0 if store.totals().batches == 2 else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.totals().batches == 2


def test_unwritable_spool_at_outage_raises_a_named_spool_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from clickhouse_driver.errors import Error as DriverError

    import chresilient.spool.sqlite as spool_module
    from chresilient import SpoolError

    monkeypatch.setattr(spool_module, "BUSY_TIMEOUT", 0.2)  # don't wait 10 s for the lock
    mgr = ClickHouseConnectionManager(_refusing_config(tmp_path))
    assert mgr.spool is not None
    blocker = sqlite3.connect(mgr.spool.store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(SpoolError) as info:
            mgr.insert("t", [(1, "a")], ["id", "s"])
        assert info.value.cause == "busy" and info.value.path == str(tmp_path / "spool")
        assert isinstance(info.value.free_bytes, int) and info.value.free_bytes > 0
        assert isinstance(info.value, DriverError)  # callers' except clauses still work
        assert str(tmp_path / "spool") in str(info.value)
        assert info.value.clickhouse_error is not None
        blocker.execute("ROLLBACK")
        assert mgr.insert("t", [(1, "a")], ["id", "s"]).spooled
    finally:
        blocker.close()
        mgr.close()
