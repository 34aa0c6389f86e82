"""SQLite plumbing of the spool: opening the database in WAL mode, and the replay lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import uuid
from collections.abc import Iterator

from .records import SCHEMA, SCHEMA_VERSION

# SQLite waits this long for another process's write lock before giving up.
BUSY_TIMEOUT = 10.0
WAL_RESERVE = 1 << 20


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode, usable from any thread under the caller's lock."""
    return sqlite3.connect(
        path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )


def open_database(path: str) -> sqlite3.Connection:
    """The writer's connection: WAL, ``synchronous=FULL``, schema created or checked."""
    conn = connect(path)
    try:
        # auto_vacuum only takes effect before the first table exists.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        # After a checkpoint the WAL keeps at most this much: reused from its start by the
        # next writes, so a delete can still be written when the disk is full.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_RESERVE}")
        # Checkpoint at about that size too (SQLite's default waits for 4 MiB).
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_RESERVE // 4096}")
        conn.executescript(SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if int(version) > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"spool schema {version} is newer than this release understands"
            )
        _build_totals(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _build_totals(conn: sqlite3.Connection) -> None:
    """Fill ``totals`` once for a spool written before the triggers existed."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT 1 FROM meta WHERE key = 'totals_built'").fetchone() is None:
            conn.execute("DELETE FROM totals")
            conn.execute(
                "INSERT INTO totals SELECT target, state, count(*), total(nrows), "
                "total(nbytes) FROM batches GROUP BY target, state"
            )
            conn.execute("INSERT INTO meta (key, value) VALUES ('totals_built', '1')")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def exclusive_flock(path: str) -> Iterator[bool | None]:
    """Hold an exclusive ``flock`` on ``path``: True if held, False if another process
    has it, None if the file system has no ``flock``. The kernel drops it the moment its
    holder dies, so a dead owner never blocks the next one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:
            yield None
            return
        yield True
    finally:
        # Unlock explicitly: a child forked meanwhile shares the open file description,
        # and closing only our descriptor would leave the lock held until it exits.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_disk_full(err: sqlite3.Error) -> bool:
    """SQLITE_FULL: the disk (or its quota) holding the database is full."""
    code = getattr(err, "sqlite_errorcode", None)
    return code == getattr(sqlite3, "SQLITE_FULL", 13) or "full" in str(err).lower()


def owner_id() -> str:
    """Who holds a lease: host, process and a random part (a pid can be reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
