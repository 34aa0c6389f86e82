"""The spool queue's own logic, on a real SQLite file: target identity, poison batches,
set-aside batches, and deletes that cannot be written. No server: the replayer's
``deliver`` and ``probe`` are plain functions here (the integration tests drive them
through a real ClickHouse)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import errors as driver_errors

import chresilient.spool.replay as replay_module
import chresilient.spool.sqlite as spool_sqlite
from chresilient import ClickHouseUnavailableError, SpoolError, SpoolFullError
from chresilient.metrics import Metrics
from chresilient.spool import SpoolReplayer, SpoolStore
from chresilient.spool.records import SpooledBatch
from chresilient.spool.target import Target, canonical, target_of


def _store(path: Path, target: str = "127.0.0.1:9000/default", **kwargs: Any) -> SpoolStore:
    kwargs.setdefault("max_bytes", 10_000_000)
    return SpoolStore(str(path), target=target, **kwargs)


# -- target identity ---------------------------------------------------------------------
def test_endpoint_spellings_of_one_server_are_one_endpoint() -> None:
    assert canonical("localhost:9000") == canonical("127.0.0.1:9000") == "loopback:9000"
    assert canonical("[::1]:9000") == canonical("LOCALHOST.:9000") == "loopback:9000"
    assert canonical("[2001:DB8:0:0::1]:9000") == "[2001:db8::1]:9000"
    assert canonical("CH-1.Example.COM:9000") == "ch-1.example.com:9000"
    assert canonical("127.0.0.1:9001") != canonical("127.0.0.1:9000")
    # Other 127/8 addresses may be other servers (one per address, same port).
    assert canonical("127.0.0.2:9000") == "127.0.0.2:9000" != canonical("127.0.0.3:9000")


def test_targets_match_across_spelling_order_and_added_replicas() -> None:
    written = target_of([("127.0.0.1", 9000), ("ch-2.invalid", 9000)], "db")
    for hosts in (
        [("localhost", 9000)],  # spelled differently
        [("ch-2.invalid", 9000), ("127.0.0.1", 9000)],  # reordered
        [("127.0.0.1", 9000), ("ch-2.invalid", 9000), ("ch-3.invalid", 9000)],  # a replica added
    ):
        assert target_of(hosts, "db").matches(Target.parse(written.key))
    assert not target_of([("127.0.0.1", 9000)], "other").matches(written)
    assert not target_of([("127.0.0.1", 9001)], "db").matches(written)
    # The key of an older release (one host, as spelled) still matches.
    assert target_of([("localhost", 9000)], "db").matches(Target.parse("127.0.0.1:9000/db"))


def test_one_replayer_per_directory_and_database(tmp_path: Path) -> None:
    """The replay lock is per directory and database (not per target): two servers with
    the same database name share it; another database does not wait."""
    first = _store(tmp_path, "127.0.0.1:9000/db")
    with first.replay_lock() as held:
        assert held is True
        with _store(tmp_path, "127.0.0.1:9555/db").replay_lock() as other_server:
            assert other_server is False
        with _store(tmp_path, "127.0.0.1:9000/other").replay_lock() as other_database:
            assert other_database is True


def test_a_store_claims_batches_of_matching_targets_only(tmp_path: Path) -> None:
    _store(tmp_path, "127.0.0.1:9000/default").put("`t`", None, [(1,)], batch_id="mine")
    _store(tmp_path, "127.0.0.1:9555/default").put("`t`", None, [(2,)], batch_id="other")
    reader = SpoolStore(
        str(tmp_path),
        target=target_of([("localhost", 9000), ("127.0.0.1", 9777)], "default"),
        max_bytes=10_000_000,
    )
    assert reader.totals().batches == 1
    batch = reader.claim(lease_seconds=60)
    assert batch is not None and batch.batch_id == "mine"
    assert reader.ack(batch) and reader.claim(lease_seconds=60) is None
    assert reader.status()["other_targets"] == {"loopback:9555/default": {"batches": 1, "rows": 1}}


# -- attempts and set-aside batches ------------------------------------------------------
def test_a_batch_waiting_to_retry_holds_its_table_back_only(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for name in ("a0", "a1"):
        store.put("`a`", None, [(1,)], batch_id=name)
    store.put("`b`", None, [(1,)], batch_id="b0")
    head = store.claim(lease_seconds=60)
    assert head is not None and head.batch_id == "a0"
    store.retry_later(head, "boom", delay=600)
    nxt = store.claim(lease_seconds=60)
    assert nxt is not None and nxt.batch_id == "b0"  # table a waits, in order
    assert store.ack(nxt) and store.claim(lease_seconds=60) is None
    store.retry_later(head, "ignored: no longer leased", delay=0)  # not ours any more
    (again,) = store.batches(ids=[head.seq])
    assert again.attempts == 1 and again.last_error == "boom"


def test_requeue_discard_and_eviction_respect_set_aside_batches(tmp_path: Path) -> None:
    store = _store(tmp_path, max_bytes=1_000, full_policy="drop_oldest")
    store.put("`a`", None, [(1,)], batch_id="poison")
    batch = store.claim(lease_seconds=60)
    assert batch is not None
    store.set_aside(batch, "rejected")
    (aside,) = store.batches()
    assert (aside.batch_id, aside.attempts, aside.last_error) == ("poison", 1, "rejected")
    # drop_oldest evicts pending batches only: the set-aside one is the operator's.
    dropped = sum(
        store.put("`b`", None, [(n,)], batch_id=f"b{n}").dropped_batches for n in range(40)
    )
    assert dropped > 0 and [b.batch_id for b in store.batches()] == ["poison"]
    pending = store.claim(lease_seconds=60)
    assert pending is not None
    assert store.discard([pending.seq]).batches == 0  # never a pending batch by id
    assert store.requeue([aside.seq]) == 1
    (back,) = store.batches(ids=[aside.seq])
    assert back.attempts == 0 and not store.batches()
    assert store.discard([aside.seq]).batches == 0  # pending again: not discardable


# -- the replayer: poison batches ---------------------------------------------------------
class _Server:
    """What the replayer's deliver/probe see: a server that is up or down, and batches
    it drops the connection on."""

    def __init__(self) -> None:
        self.up = True
        self.poison: set[str] = set()
        self.delivered: list[str] = []
        self.probes = 0

    def deliver(self, batch: SpooledBatch) -> None:
        if not self.up or batch.batch_id in self.poison:
            raise ClickHouseUnavailableError(
                "insert failed", last_error=driver_errors.NetworkError("connection reset")
            )
        self.delivered.append(batch.batch_id)

    def probe(self) -> bool:
        self.probes += 1
        return self.up


def _replayer(store: SpoolStore, server: _Server, **kwargs: Any) -> SpoolReplayer:
    return SpoolReplayer(
        store,
        server.deliver,
        metrics=Metrics(),
        interval=60,
        lease_seconds=60,
        probe=server.probe,
        pause=0,
        **kwargs,
    )


def test_a_poison_batch_is_set_aside_after_its_attempts_while_others_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay_module, "FIRST_BACKOFF", 0.0)  # retry at the next pass
    store, server = _store(tmp_path), _Server()
    store.put("`a`", None, [(0,)], batch_id="poison")
    for n in range(5):
        store.put("`a`" if n % 2 else "`b`", None, [(n,)], batch_id=f"ok{n}")
    server.poison.add("poison")
    replayer = _replayer(store, server, max_attempts=3)
    for attempt in (1, 2):
        report = replayer.replay()
        assert report.outcome == "retrying" and report.skipped_tables == ["`a`"]
        assert server.delivered == ["ok0", "ok2", "ok4"]  # table b flowed; a waits in order
        (waiting,) = store.batches(ids=[1])
        assert waiting.attempts == attempt and waiting.last_error is not None
    report = replayer.replay()
    assert (report.set_aside, report.batches, report.outcome) == (1, 2, "drained")
    assert server.delivered == ["ok0", "ok2", "ok4", "ok1", "ok3"]
    (aside,) = store.batches()
    assert aside.batch_id == "poison" and aside.attempts == 3
    assert aside.last_error is not None and aside.last_error.startswith("3 attempts")


def test_an_unavailable_server_ends_the_pass_and_counts_no_attempt(tmp_path: Path) -> None:
    store, server = _store(tmp_path), _Server()
    store.put("`a`", None, [(0,)], batch_id="b0")
    server.up = False
    replayer = _replayer(store, server, max_attempts=1)
    for _ in range(3):
        assert replayer.replay().outcome == "unavailable"
    (batch,) = store.batches(ids=[1])
    assert batch.attempts == 0 and server.probes == 3 and not store.batches()
    server.up = True
    assert replayer.replay().batches == 1 and server.delivered == ["b0"]


# -- deletes that cannot be written -------------------------------------------------------
def test_a_delivered_batch_whose_delete_fails_is_never_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_sqlite, "BUSY_TIMEOUT", 0.1)
    store, server = _store(tmp_path), _Server()
    for n in range(3):
        store.put("`a`", None, [(n,)], batch_id=f"b{n}")
    blocker = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    lock_taken = threading.Event()

    def deliver(batch: SpooledBatch) -> None:
        server.deliver(batch)
        if not lock_taken.is_set():  # another process takes the write lock meanwhile
            blocker.execute("BEGIN IMMEDIATE")
            lock_taken.set()
            threading.Timer(1.0, lambda: blocker.execute("ROLLBACK")).start()

    failed_acks: list[str] = []
    ack = store.ack

    def counted_ack(batch: SpooledBatch) -> bool:
        try:
            return ack(batch)
        except SpoolError:
            failed_acks.append(batch.batch_id)
            raise

    monkeypatch.setattr(store, "ack", counted_ack)
    replayer = SpoolReplayer(
        store, deliver, metrics=Metrics(), interval=60, lease_seconds=60, pause=0
    )
    report = replayer.replay()
    blocker.close()
    assert failed_acks and set(failed_acks) == {"b0"}  # the delete failed, was retried
    assert report.outcome == "drained" and report.batches == 3
    assert server.delivered == ["b0", "b1", "b2"]  # b0 once, although its delete failed
    assert store.totals().batches == 0


def test_spool_errors_name_cause_path_and_free_space(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put("`a`", None, [(1,)], batch_id="b0")
    store.close()
    for name in ("spool.sqlite3-wal", "spool.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / "spool.sqlite3").write_bytes(b"not a database " * 512)
    with pytest.raises(SpoolError) as info:
        store.put("`a`", None, [(2,)], batch_id="b1")
    err = info.value
    assert err.cause == "corrupt" and err.path == str(tmp_path)
    assert err.free_bytes is not None and err.free_bytes > 0
    assert f"({err.free_bytes} bytes free)" in str(err) and str(tmp_path) in str(err)
    assert isinstance(err.__cause__, sqlite3.DatabaseError)
    assert store.state == "unwritable"


def test_an_outage_resets_the_attempts_a_batch_had_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay_module, "FIRST_BACKOFF", 0.0)
    store, server = _store(tmp_path), _Server()
    store.put("`a`", None, [(0,)], batch_id="b0")
    server.poison.add("b0")
    replayer = _replayer(store, server, max_attempts=3)
    assert replayer.replay().outcome == "retrying"
    assert store.batches(ids=[1])[0].attempts == 1  # ClickHouse answered: counted
    server.up = False  # then an outage: that failure may have been its start
    assert replayer.replay().outcome == "unavailable"
    assert store.batches(ids=[1])[0].attempts == 0


def test_a_batch_delivered_but_not_deleted_is_not_sent_by_the_next_manager_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_sqlite, "BUSY_TIMEOUT", 0.1)
    monkeypatch.setattr(replay_module, "ACK_WAIT", 0.3)
    store, server = _store(tmp_path), _Server()
    store.put("`a`", None, [(0,)], batch_id="b0")
    blocker = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)

    def deliver(batch: SpooledBatch) -> None:
        server.deliver(batch)
        blocker.execute("BEGIN IMMEDIATE")  # the delete cannot be written now

    first = SpoolReplayer(store, deliver, metrics=Metrics(), interval=60, lease_seconds=60)
    with pytest.raises(SpoolError):  # a manual replay gives up waiting for the delete
        first.replay()
    first.stop(1.0)
    blocker.execute("ROLLBACK")
    blocker.close()
    # A new manager (store, replayer) in the same process: the batch is in ClickHouse.
    second_store = _store(tmp_path)
    second = SpoolReplayer(
        second_store, server.deliver, metrics=Metrics(), interval=60, lease_seconds=60
    )
    report = second.replay()
    assert server.delivered == ["b0"] and report.batches == 0
    assert second_store.totals().batches == 0


def test_a_silent_server_is_not_taken_for_a_poison_batch(tmp_path: Path) -> None:
    """A timeout (a frozen server or ZooKeeper) says nothing against the rows."""
    store = _store(tmp_path)
    store.put("`a`", None, [(0,)], batch_id="b0")

    def deliver(batch: SpooledBatch) -> None:
        raise ClickHouseUnavailableError("insert failed", last_error=TimeoutError("timed out"))

    replayer = SpoolReplayer(
        store, deliver, metrics=Metrics(), interval=60, lease_seconds=60,
        probe=lambda: True, max_attempts=2, pause=0,
    )  # fmt: skip
    for _ in range(3):
        assert replayer.replay().outcome == "unavailable"
    (batch,) = store.batches(ids=[1])
    assert batch.attempts == 0 and not store.batches()


def test_a_poison_batch_waits_longer_after_each_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spool.md: a failing batch waits 0.5 s, 1 s, 2 s, ... (at most 60 s); its table
    waits behind it."""
    store, server = _store(tmp_path), _Server()
    store.put("`a`", None, [(0,)], batch_id="poison")
    store.put("`b`", None, [(1,)], batch_id="ok")
    server.poison.add("poison")
    delays: list[float] = []
    retry_later = store.retry_later

    def record(batch: SpooledBatch, error: str, delay: float) -> None:
        """The first wait is kept; later ones are cut to 0 to keep the test short."""
        delays.append(delay)
        retry_later(batch, error, delay if len(delays) == 1 else 0.0)

    monkeypatch.setattr(store, "retry_later", record)
    replayer = _replayer(store, server, max_attempts=10)
    failed_at = time.monotonic()
    assert replayer.replay().skipped_tables == ["`a`"] and server.delivered == ["ok"]
    probes = server.probes
    assert replayer.replay().outcome == "retrying"  # at once: its table waits
    assert server.probes == probes and store.batches(ids=[1])[0].attempts == 1
    deadline = time.monotonic() + 10
    while store.batches(ids=[1])[0].attempts < 2:  # tried again once its wait is over
        assert time.monotonic() < deadline, "the batch was never tried again"
        replayer.replay()
        time.sleep(0.02)
    assert time.monotonic() - failed_at >= 0.5
    for _ in range(10):
        replayer.replay()
    # attempts 1 to 9 wait; the 10th sets it aside
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    (aside,) = store.batches()
    assert aside.attempts == 10


def test_on_a_full_disk_the_lock_holder_claims_without_a_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path)
    store.put("`a`", None, [(0,)], batch_id="b0")
    write = store.db.write

    def full(action: str = "write", durable: bool = True) -> Any:
        if action == "claim":  # the lease cannot be written
            raise SpoolFullError("disk full", cause="disk full", path=str(tmp_path))
        return write(action)

    monkeypatch.setattr(store.db, "write", full)
    with pytest.raises(SpoolFullError):
        store.claim(lease_seconds=60)  # not holding the replay lock: no batch
    with store.replay_lock() as locked:
        assert locked is True
        batch = store.claim(lease_seconds=60, steal=True)
    assert batch is not None and batch.batch_id == "b0" and batch.leased is False


def test_the_replayer_backs_off_while_down_and_yields_to_a_busy_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spool.md's cadence: while ClickHouse is down the passes back off (doubling); while
    the pool is fully busy it waits longer between batches."""
    monkeypatch.setattr(replay_module, "FIRST_BACKOFF", 0.05)
    store, server = _store(tmp_path), _Server()
    store.put("`a`", None, [(0,)], batch_id="b0")
    server.up = False
    tried: list[float] = []

    def deliver(batch: SpooledBatch) -> None:
        tried.append(time.monotonic())
        server.deliver(batch)

    down = SpoolReplayer(
        store, deliver, metrics=Metrics(), interval=60, lease_seconds=60,
        probe=server.probe, pause=0,
    )  # fmt: skip
    down.start()
    try:
        deadline = time.monotonic() + 20
        while len(tried) < 5:
            assert time.monotonic() < deadline, f"only {len(tried)} passes"
            time.sleep(0.01)
    finally:
        down.stop(5)
    gaps = [b - a for a, b in zip(tried, tried[1:])]
    for n, gap in enumerate(gaps[:4]):  # 0.05, 0.1, 0.2, 0.4 s at least
        assert gap >= 0.9 * 0.05 * 2**n, gaps

    for n in range(3):
        store.put("`b`", None, [(n,)], batch_id=f"busy{n}")
    server.up = True
    checks: list[bool] = []

    def busy() -> bool:
        checks.append(True)
        return True

    monkeypatch.setattr(replay_module, "BUSY_WAIT", 0.02)
    patient = SpoolReplayer(
        store, server.deliver, metrics=Metrics(), interval=60, lease_seconds=60,
        busy=busy, pause=0,
    )  # fmt: skip
    started = time.monotonic()
    assert patient.replay().batches == 4
    took = time.monotonic() - started
    # After each batch it checks the pool up to BUSY_WAITS_MAX times, waiting in between.
    assert len(checks) == 4 * replay_module.BUSY_WAITS_MAX
    assert took >= 4 * replay_module.BUSY_WAITS_MAX * 0.02 * 0.9
