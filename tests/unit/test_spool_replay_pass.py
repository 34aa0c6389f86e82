"""A replay pass: one batch leased at a time, every batch once and in order per table, a
failed batch holds its table back, a limited pass leaves the rest unleased; a claim's
lease is the only write not fsynced. Real SQLite, no server: ``deliver`` is a plain
function here."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import errors as driver_errors

import chresilient.spool.sqlite as spool_sqlite
from chresilient import ClickHouseUnavailableError, SpoolError
from chresilient.metrics import Metrics
from chresilient.spool import SpoolReplayer, SpoolStore
from chresilient.spool.records import SpooledBatch


def _store(path: Path) -> SpoolStore:
    return SpoolStore(str(path), target="127.0.0.1:9000/default", max_bytes=10_000_000)


def _fill(store: SpoolStore, tables: list[str]) -> None:
    for i, table in enumerate(tables):
        store.put(table, ["n"], [(i,)], batch_id=f"b{i}")


def _leased(store: SpoolStore) -> int:
    return int(store.status()["in_flight_batches"])


def test_a_replay_pass_delivers_every_batch_once_in_order(tmp_path: Path) -> None:
    store = _store(tmp_path)
    tables = ["t", "u", "t", "t", "u", "v", "t", "u", "t"]
    _fill(store, tables)
    sent: list[str] = []
    leased: list[int] = []

    def deliver(batch: SpooledBatch) -> None:
        assert batch.decode_rows() == [(int(batch.batch_id[1:]),)]
        leased.append(_leased(store))
        sent.append(batch.batch_id)

    replayer = SpoolReplayer(
        store, deliver, metrics=Metrics(), interval=60, lease_seconds=60, pause=0
    )
    report = replayer.replay()
    assert report.outcome == "drained" and report.batches == len(tables)
    assert sorted(sent) == sorted(f"b{i}" for i in range(len(tables)))  # once each
    for table in set(tables):  # in order per table
        mine = [b for b in sent if tables[int(b[1:])] == table]
        assert mine == sorted(mine, key=lambda b: int(b[1:]))
    assert set(leased) == {1}  # one batch leased at a time: the one being sent
    assert store.totals().batches == 0


def test_a_failed_batch_holds_back_its_table(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _fill(store, ["t", "t", "u"])
    sent: list[str] = []

    def deliver(batch: SpooledBatch) -> None:
        if batch.batch_id == "b0":  # ClickHouse answers (probe), so it is the batch
            raise ClickHouseUnavailableError(
                "insert failed", last_error=driver_errors.NetworkError("connection reset")
            )
        sent.append(batch.batch_id)

    replayer = SpoolReplayer(
        store, deliver, metrics=Metrics(), interval=60, lease_seconds=60, pause=0,
        probe=lambda: True,
    )
    report = replayer.replay()
    assert sent == ["b2"]  # b1 waits for b0
    assert report.outcome == "retrying" and report.skipped_tables == ["t"]


def test_a_limited_pass_leaves_the_rest_unleased(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _fill(store, ["t"] * 5)
    sent: list[Any] = []
    replayer = SpoolReplayer(
        store, sent.append, metrics=Metrics(), interval=60, lease_seconds=600, pause=0
    )
    assert replayer.replay(limit=2).outcome == "partial"
    assert [b.batch_id for b in sent] == ["b0", "b1"]
    assert store.totals().batches == 3 and _leased(store) == 0


def test_a_claim_that_could_not_start_leaves_every_later_write_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_sqlite, "BUSY_TIMEOUT", 0.1)
    store = _store(tmp_path)
    _fill(store, ["t"])
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(SpoolError, match="busy"):
            store.claim(lease_seconds=60)  # its BEGIN fails after the busy timeout
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with store.db.locked() as conn:
        (level,) = conn.execute("PRAGMA synchronous").fetchone()
    assert level == 2  # FULL: puts and deletes are fsynced again
