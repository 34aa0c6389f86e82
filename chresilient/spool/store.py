"""The durable insert spool: batches ClickHouse could not take, kept until delivered.

Storage is SQLite in WAL mode from the standard library: every write is an atomic,
fsynced transaction (``synchronous=FULL``), so a batch is either wholly in the spool or
not at all, even if the process or the machine dies mid-write; several processes
(gunicorn workers) can share one directory, SQLite's locks serialise their writes, and
readers never block writers. A directory of one file per batch would need the same
fsync/rename dance plus a hand-made index for ordering and size accounting.

Each batch is one row: table, column names, insert settings, a stable ``batch_id`` (the
dedup token on replay), the rows encoded by :mod:`chresilient.spool.codec`, and a *lease*
(owner, expiry) written inside ``BEGIN IMMEDIATE`` when a replayer claims it. Replayers
of one target also take an exclusive ``flock`` on a lock file for the length of a replay
pass: the kernel drops it the moment its holder dies, so a new replayer may take over a
dead owner's lease at once instead of waiting for it to expire.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import structlog

from .. import fork
from ..errors import ConfigError, SpoolFullError
from . import codec
from .records import (
    BATCH_COLUMNS,
    BatchState,
    PutResult,
    SpooledBatch,
    SpoolTotals,
    batch_from_row,
    summarize,
)
from .sqlite import (
    BUSY_TIMEOUT,
    connect,
    exclusive_flock,
    is_disk_full,
    open_database,
    owner_id,
)

PENDING, SET_ASIDE = BatchState.PENDING, BatchState.SET_ASIDE

log = structlog.get_logger("chresilient.spool")

DB_NAME = "spool.sqlite3"
# Bytes counted per batch on top of its payload: the row's own SQLite overhead.
BATCH_OVERHEAD = 128
# Longest single wait while the 'block' policy waits for space.
BLOCK_STEP = 0.25


class SpoolStore:
    """The SQLite spool of one directory, seen from one target (``user@host:port/db``).

    Only batches of ``target`` are claimed, so two applications sharing a directory
    never replay into each other's ClickHouse. The size limit covers the whole
    directory. Thread-safe; safe after ``fork()`` (the child opens its own connection).
    """

    def __init__(
        self,
        directory: str,
        *,
        target: str,
        max_bytes: int,
        full_policy: str = "raise",
        block_timeout: float = 30.0,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, DB_NAME)
        self.target = target
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self.block_timeout = block_timeout
        self._lock_path = os.path.join(
            self.directory, f"replay-{hashlib.sha1(target.encode()).hexdigest()[:12]}.lock"
        )
        self._reset()
        fork.register(self)
        self._open_checked()

    def _reset(self) -> None:
        """Fresh locks and no connections: at construction, and in a forked child (the
        parent's SQLite handles and possibly-held locks must not be used there)."""
        self._lock = threading.RLock()  # the writer connection
        self._read_lock = threading.Lock()  # the reader: gauges never queue behind a write
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self.owner = owner_id()
        self._fork_held: list[Any] = []  # locks held from before_fork to after_fork

    def before_fork(self) -> None:
        """Quiesce: no thread of this process may be inside SQLite at fork time (the child
        would inherit SQLite's own mutexes locked), and no connection may be open (the
        child would inherit SQLite's file-lock bookkeeping without the locks). Both
        connections are closed under their locks; they reopen on the next use."""
        wait = BUSY_TIMEOUT + 1.0
        self._fork_held = [
            lock for lock in (self._lock, self._read_lock) if lock.acquire(timeout=wait)
        ]
        if len(self._fork_held) < 2:
            log.warning("spool_busy_at_fork", directory=self.directory, waited=wait)
            return
        for conn in (self._conn, self._reader):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._conn = self._reader = None

    def after_fork_in_parent(self) -> None:
        for lock in reversed(self._fork_held):
            lock.release()
        self._fork_held = []

    def after_fork_in_child(self) -> None:
        self._reset()

    # -- connection -------------------------------------------------------------------
    def _open_checked(self) -> None:
        """Create and open the spool now, so a bad directory fails at construction."""
        hint = (
            "set CLICKHOUSE_SPOOL_DIR (Config.spool_dir) to a writable directory, or "
            "disable the spool with CLICKHOUSE_SPOOL_ENABLED=false"
        )
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                "spool_dir", f"cannot create {self.directory!r}: {err.strerror or err}; {hint}"
            ) from None
        if not os.path.isdir(self.directory) or not os.access(self.directory, os.W_OK | os.X_OK):
            raise ConfigError(
                "spool_dir", f"{self.directory!r} is not a writable directory; {hint}"
            )
        try:
            with self._locked() as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
        except (sqlite3.Error, OSError) as err:
            raise ConfigError(
                "spool_dir", f"cannot write the spool in {self.directory!r}: {err}; {hint}"
            ) from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                self._conn = open_database(self.path)
            yield self._conn

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            if self._reader is None:  # the schema exists: __init__ opened the writer
                self._reader = connect(self.path)
            yield self._reader

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: takes the write lock up front, so read-then-write is atomic."""
        with self._locked() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connections (they reopen on the next use)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
            self._reader = None

    # -- writing ------------------------------------------------------------------------
    def put(
        self,
        table: str,
        columns: Sequence[str] | None,
        rows: Sequence[Sequence[Any]],
        *,
        batch_id: str,
        settings: Mapping[str, Any] | None = None,
        on_full: Callable[[], None] | None = None,
    ) -> PutResult:
        """Store one whole batch durably, or raise :class:`SpoolFullError`.

        Raises :class:`chresilient.codec.SpoolEncodeError` for a value that cannot be
        stored exactly. ``on_full`` is called while the ``block`` policy waits for space
        (to wake the replayer).
        """
        payload = codec.encode_rows(rows)
        cols = None if columns is None else codec.encode_json(list(columns))
        sets = codec.encode_json(dict(settings)) if settings else None
        size = len(payload) + len(cols or "") + len(sets or "") + len(table) + BATCH_OVERHEAD
        record = (batch_id, self.target, table, cols, sets, codec.CODEC_VERSION, len(rows), size)
        if size > self.max_bytes:
            raise SpoolFullError(
                f"batch of {size} bytes is larger than the whole spool "
                f"(spool_max_bytes={self.max_bytes}); split it into smaller batches"
            )
        deadline = time.monotonic() + self.block_timeout
        while True:
            try:
                result = self._put_once(record, payload)
            except sqlite3.Error as err:
                if is_disk_full(err):
                    raise SpoolFullError(
                        f"the disk holding the spool {self.directory!r} is full: {err}"
                    ) from err
                raise
            if result is not None:
                return result
            used = self.totals(all_targets=True).bytes
            message = (
                f"spool is full: {used} of {self.max_bytes} bytes used, a batch of "
                f"{size} bytes does not fit (spool_full_policy={self.full_policy!r})"
            )
            remaining = deadline - time.monotonic()
            if self.full_policy != "block" or remaining <= 0:
                raise SpoolFullError(message)
            if on_full is not None:
                on_full()
            time.sleep(min(BLOCK_STEP, remaining))

    def _put_once(self, record: tuple[Any, ...], payload: bytes) -> PutResult | None:
        size = record[-1]
        with self._transaction() as conn:
            (used,) = conn.execute("SELECT total(nbytes) FROM totals").fetchone()
            dropped = (0, 0)
            if used + size > self.max_bytes:
                if self.full_policy != "drop_oldest":
                    return None
                dropped = self._drop_oldest(conn, int(used) + size - self.max_bytes)
                if dropped[0] < 0:
                    return None
            conn.execute(
                "INSERT INTO batches (batch_id, target, tbl, columns, settings, codec, nrows, "
                "nbytes, created, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*record, time.time(), payload),
            )
        if dropped[0]:
            log.warning(
                "spool_dropped_oldest",
                dropped_batches=dropped[0],
                dropped_rows=dropped[1],
                reason="spool full, spool_full_policy='drop_oldest'",
            )
        return PutResult(size, dropped[0], dropped[1])

    def _drop_oldest(self, conn: sqlite3.Connection, needed: int) -> tuple[int, int]:
        """Delete the oldest batches not being replayed right now; (-1, 0) if not enough."""
        now = time.time()
        victims: list[int] = []
        freed = rows = 0
        for seq, nbytes, nrows in conn.execute(
            "SELECT seq, nbytes, nrows FROM batches WHERE lease_until < ? ORDER BY seq", (now,)
        ):
            victims.append(seq)
            freed += nbytes
            rows += nrows
            if freed >= needed:
                break
        if freed < needed:
            return -1, 0
        conn.executemany("DELETE FROM batches WHERE seq = ?", [(s,) for s in victims])
        return len(victims), rows

    # -- replaying ----------------------------------------------------------------------
    def claim(
        self,
        *,
        lease_seconds: float,
        skip_tables: Sequence[str] = (),
        steal: bool = False,
    ) -> SpooledBatch | None:
        """Lease the oldest pending batch of a table whose earlier batches are all done.

        A batch leased by another owner is skipped until its lease expires, unless
        ``steal`` (the caller holds the replay lock, which proves that owner is gone).
        """
        now = time.time()
        blocked = set(skip_tables)
        with self._transaction() as conn:
            chosen = None
            cur = conn.execute(
                "SELECT seq, tbl, lease_owner, lease_until FROM batches "
                "WHERE target = ? AND state = ? ORDER BY seq",
                (self.target, PENDING),
            )
            try:
                # Usually the very first row: the oldest batch is the head of its table.
                for seq, tbl, owner, until in cur:
                    if tbl in blocked:
                        continue
                    if (
                        steal
                        or owner is None
                        or owner == self.owner
                        or until < now
                        or until > now + 2 * lease_seconds  # the clock went back
                    ):
                        chosen = seq
                        break
                    blocked.add(tbl)  # its head is someone else's: keep the table's order
            finally:
                cur.close()
            if chosen is None:
                return None
            conn.execute(
                "UPDATE batches SET lease_owner = ?, lease_until = ?, attempts = attempts + 1 "
                "WHERE seq = ?",
                (self.owner, now + lease_seconds, chosen),
            )
            row = conn.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches WHERE seq = ?", (chosen,)
            ).fetchone()
        return batch_from_row(row)

    def ack(self, batch: SpooledBatch) -> bool:
        """Delete a delivered batch; False if another owner had taken it over meanwhile."""
        with self._transaction() as conn:
            cur = conn.execute(
                "DELETE FROM batches WHERE seq = ? AND lease_owner = ?", (batch.seq, self.owner)
            )
            return cur.rowcount == 1

    def release(self, batch: SpooledBatch, error: str | None) -> None:
        """Give a claimed batch back (delivery failed, try later)."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE batches SET lease_owner = NULL, lease_until = 0, last_error = ? "
                "WHERE seq = ? AND lease_owner = ?",
                (error, batch.seq, self.owner),
            )

    def set_aside(self, batch: SpooledBatch, error: str) -> None:
        """Mark a batch the server rejected for good; it stays until purged or requeued."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE batches SET state = ?, lease_owner = NULL, lease_until = 0, "
                "last_error = ? WHERE seq = ? AND lease_owner = ?",
                (SET_ASIDE, error, batch.seq, self.owner),
            )

    def requeue_failed(self) -> int:
        """Put set-aside batches of this target back in the queue (e.g. after a fix)."""
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE batches SET state = ? WHERE target = ? AND state = ?",
                (PENDING, self.target, SET_ASIDE),
            )
            return cur.rowcount

    def replay_lock(self) -> contextlib.AbstractContextManager[bool | None]:
        """Hold this target's replay lock: True if held, False if another replayer has it,
        None if the file system has no ``flock`` (then only leases protect batches)."""
        return exclusive_flock(self._lock_path)

    # -- reading and housekeeping -------------------------------------------------------------
    def totals(
        self, *, all_targets: bool = False, state: BatchState = PENDING
    ) -> SpoolTotals:
        """Batches, rows and bytes of this target in ``state`` (or of the whole spool)."""
        query = "SELECT total(batches), total(nrows), total(nbytes) FROM totals"
        with self._reading() as conn:
            if all_targets:
                row = conn.execute(query).fetchone()
            else:
                row = conn.execute(
                    query + " WHERE target = ? AND state = ?", (self.target, int(state))
                ).fetchone()
        return SpoolTotals(int(row[0]), int(row[1]), int(row[2]))

    def status(self) -> dict[str, Any]:
        """What is in the spool, per table, without any row contents."""
        now = time.time()
        with self._reading() as conn:
            tables = conn.execute(
                "SELECT tbl, state, count(*), total(nrows), total(nbytes), min(created), "
                "sum(lease_until > ?) FROM batches WHERE target = ? GROUP BY tbl, state "
                "ORDER BY tbl, state",
                (now, self.target),
            ).fetchall()
            others = conn.execute(
                "SELECT target, count(*), total(nrows) FROM batches WHERE target != ? "
                "GROUP BY target",
                (self.target,),
            ).fetchall()
            (errors,) = conn.execute(
                "SELECT last_error FROM batches WHERE target = ? AND last_error IS NOT NULL "
                "ORDER BY seq DESC LIMIT 1",
                (self.target,),
            ).fetchone() or (None,)
        return summarize(
            tables,
            others,
            now=now,
            header={"directory": self.directory, "target": self.target},
            footer={
                "used_bytes": self.totals(all_targets=True).bytes,
                "max_bytes": self.max_bytes,
                "full_policy": self.full_policy,
                "last_error": errors,
            },
        )

    def purge(self, *, confirm: bool = False, failed_only: bool = False) -> SpoolTotals:
        """Delete this target's batches (all, or only the set-aside ones). Needs ``confirm``."""
        if confirm is not True:
            raise ValueError("purge deletes undelivered rows; call purge(confirm=True)")
        where = "target = ?" + (" AND state = ?" if failed_only else "")
        params: tuple[Any, ...] = (self.target, SET_ASIDE) if failed_only else (self.target,)
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT count(*), total(nrows), total(nbytes) FROM batches WHERE {where}",
                params,
            ).fetchone()
            conn.execute(f"DELETE FROM batches WHERE {where}", params)
        purged = SpoolTotals(int(row[0]), int(row[1]), int(row[2]))
        log.warning("spool_purged", batches=purged.batches, rows=purged.rows, target=self.target)
        self.compact()
        return purged

    def compact(self) -> None:
        """Give disk space back once the spool is empty (the file never shrinks by itself)."""
        with self._locked() as conn:
            (count,) = conn.execute("SELECT total(batches) FROM totals").fetchone()
            if count:
                return
            conn.execute("PRAGMA incremental_vacuum")
            with contextlib.suppress(sqlite3.OperationalError):  # busy readers: next time
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
