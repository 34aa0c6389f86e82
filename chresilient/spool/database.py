"""One spool file: its connections, fork safety, and every SQLite error as a SpoolError.

Every write is one ``BEGIN IMMEDIATE`` transaction that is rolled back on any failure,
the ``COMMIT`` included (a ``COMMIT`` that fails on a full disk leaves the transaction
open, and the next write would fail forever). The outcome of the last write is the
spool's health: ``ok``, ``full`` (the disk or its quota is full) or ``unwritable``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import structlog

from .. import fork
from ..errors import SpoolError, SpoolFullError
from .sqlite import BUSY_TIMEOUT, connect, is_disk_full, open_database

log = structlog.get_logger("chresilient.spool")

DB_NAME = "spool.sqlite3"
# An I/O error with less than this free is a full disk (SQLite says "disk I/O error" when
# it cannot create its shared-memory file).
LOW_FREE_BYTES = 64 << 10
# Kept free (beyond the WAL's size) by every write of a batch: room to drain.
DRAIN_RESERVE_BYTES = 512 << 10
HINT = (
    "set CLICKHOUSE_SPOOL_DIR (Config.spool_dir) to a writable directory, or disable the "
    "spool with CLICKHOUSE_SPOOL_ENABLED=false"
)


class SpoolDatabase:
    """The SQLite database of one spool directory. Thread-safe; safe across ``fork()``:
    connections are closed before it and reopened on the next use."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, DB_NAME)
        self.problem: SpoolError | None = None
        self._reset()
        fork.register(self)

    def _reset(self) -> None:
        self._lock = threading.RLock()  # the writer connection
        self._read_lock = threading.Lock()  # the reader: gauges never queue behind a write
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._fork_held: list[Any] = []

    # -- health -------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``ok``, ``full`` (less free than the spool needs to drain) or ``unwritable``
        (the last write failed for another reason than space or a busy lock)."""
        problem = self.problem
        if problem is not None and problem.cause not in ("busy", "disk full"):
            return "unwritable"
        free = self.free_bytes()
        if free is not None and free < self.drain_room():
            return "full"
        if problem is not None and problem.cause == "disk full":
            self.problem = None  # space was freed
        return "ok"

    def drain_room(self) -> int:
        """Bytes the spool keeps free: a checkpoint of the whole WAL, and a margin."""
        try:
            wal = os.path.getsize(self.path + "-wal")
        except OSError:
            wal = 0
        return wal + DRAIN_RESERVE_BYTES

    def check(self) -> SpoolError | None:
        """Create the directory and database if needed and take the write lock once;
        the problem found (also kept in :attr:`problem`), or None."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(13, "no write permission", self.directory)
            with self.write():
                pass
        except SpoolError as err:
            return err
        except OSError as err:
            self.problem = self.error(err, "open")
            return self.problem
        return None

    def free_bytes(self) -> int | None:
        """Bytes free to this user on the spool's file system (None if unknown)."""
        path = self.directory
        while path != os.path.dirname(path) and not os.path.isdir(path):
            path = os.path.dirname(path)  # not created yet: its file system is the parent's
        try:
            st = os.statvfs(path)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def check_room(self, size: int) -> None:
        """Raise :class:`SpoolFullError` unless a write of ``size`` bytes leaves the room
        the spool needs to drain: a checkpoint moves the WAL into the database file (which
        grows by up to the WAL's size), and deleting a delivered batch is a write too. A
        spool that filled its disk to the last byte could never drain."""
        free = self.free_bytes()
        if free is None:
            return
        need = 2 * size + self.drain_room()
        if free < need:
            self.problem = SpoolFullError(
                f"spool write refused: disk full at {self.directory!r} ({free} bytes free): "
                f"the spool keeps {need - size} bytes free to drain; free space on its file "
                f"system, or {HINT}",
                cause="disk full",
                path=self.directory,
                free_bytes=free,
            )
            raise self.problem

    def error(self, err: BaseException, action: str) -> SpoolError:
        """``err`` (SQLite or OS) as a SpoolError that names cause, path and free space."""
        free = self.free_bytes()
        cause = failure_cause(err)
        if cause in ("unwritable", "error") and free is not None and free < LOW_FREE_BYTES:
            cause = "disk full"  # e.g. SQLite's "disk I/O error" creating its -shm file
        text = getattr(err, "strerror", None) or str(err)
        fix = f"free space on its file system, or {HINT}" if cause == "disk full" else HINT
        message = (
            f"spool {action} failed: {cause} at {self.directory!r} "
            f"({'unknown' if free is None else free} bytes free): {text}; {fix}"
        )
        kind = SpoolFullError if cause == "disk full" else SpoolError
        return kind(message, cause=cause, path=self.directory, free_bytes=free)

    # -- connections --------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[sqlite3.Connection]:
        """The writer connection, outside any transaction (for pragmas)."""
        with self._lock:
            if self._conn is None:
                os.makedirs(self.directory, exist_ok=True)  # e.g. fixed since construction
                self._conn = open_database(self.path)
            yield self._conn

    @contextlib.contextmanager
    def write(self, action: str = "write", *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: read-then-write is atomic; any failure
        (the ``COMMIT`` included) rolls back and raises :class:`SpoolError`.

        ``durable=False`` commits without waiting for the disk (``synchronous=NORMAL``): for
        writes a power cut may undo harmlessly (a replay lease dies with its owner anyway);
        other processes see them at once all the same.
        """
        with self._lock:
            conn: sqlite3.Connection | None = None
            try:
                with self.locked() as conn:
                    if not durable:
                        conn.execute("PRAGMA synchronous = NORMAL")
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                        try:
                            yield conn
                            conn.execute("COMMIT")
                        finally:
                            if conn.in_transaction:
                                with contextlib.suppress(sqlite3.Error):
                                    conn.execute("ROLLBACK")
                    finally:
                        if not durable:  # whatever happened, the next write is durable
                            self._durable_again(conn)
            except (sqlite3.Error, OSError) as err:
                self.problem = self.error(err, action)
                if conn is None or self.problem.cause == "corrupt":
                    self._drop_writer()
                raise self.problem from err
            self.problem = None

    def _durable_again(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error:
            self._drop_writer()  # reopened with synchronous=FULL

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The reader connection. Reads never queue behind a write (the writer's lock may
        be held while SQLite waits for another process); only a spool file without its
        tables yet (e.g. created on a full disk) is completed by the writer first."""
        with self._read_lock:
            try:
                if self._reader is None:
                    if not self._has_schema():
                        with self.locked():  # open_database() creates the tables
                            pass
                    self._reader = connect(self.path)
                yield self._reader
            except (sqlite3.Error, OSError) as err:
                raise self.error(err, "read") from err

    def _has_schema(self) -> bool:
        if not os.path.exists(self.path):
            return False
        probe = connect(self.path)
        try:
            found = probe.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'totals'"
            ).fetchone()
        finally:
            probe.close()
        return found is not None

    def _drop_writer(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None

    def checkpoint(self, *, truncate: bool = False) -> None:
        """Move the WAL into the database, so the next writes reuse the WAL from its start
        (cut back to ``journal_size_limit``: a reserve that lets a delete succeed on a
        full disk); ``truncate`` gives all of it back. Skipped while readers are busy."""
        mode = "TRUNCATE" if truncate else "RESTART"
        with contextlib.suppress(sqlite3.Error, OSError), self.locked() as conn:
            conn.execute(f"PRAGMA wal_checkpoint({mode})")

    def close(self) -> None:
        """Close the connections (they reopen on the next use)."""
        with self._lock:
            self._drop_writer()
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
            self._reader = None

    # -- fork -------------------------------------------------------------------------
    def before_fork(self) -> None:
        """Quiesce: no thread of this process may be inside SQLite at fork time (the child
        would inherit SQLite's own mutexes locked), and no connection may be open (the
        child would inherit SQLite's file-lock bookkeeping without the locks)."""
        wait = BUSY_TIMEOUT + 1.0
        # The order read() takes them in (a reader may open the writer first).
        self._fork_held = [
            lock for lock in (self._read_lock, self._lock) if lock.acquire(timeout=wait)
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


def failure_cause(err: BaseException) -> str:
    """``disk full``, ``unwritable``, ``busy``, ``corrupt`` or ``error``."""
    text = str(err).lower()
    if isinstance(err, OSError):
        return "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "unwritable"
    if isinstance(err, sqlite3.Error) and is_disk_full(err):
        return "disk full"
    if isinstance(err, sqlite3.OperationalError):
        if "locked" in text or "busy" in text:
            return "busy"
        if any(w in text for w in ("readonly", "unable to open", "i/o error", "read-only")):
            return "unwritable"
        return "error"
    return "corrupt" if isinstance(err, sqlite3.DatabaseError) else "error"
