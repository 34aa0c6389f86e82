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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import structlog

from .. import fork
from ..errors import SpoolFullError
from . import codec
from .database import SpoolDatabase
from .records import (
    BATCH_COLUMNS,
    BatchState,
    PutResult,
    SpooledBatch,
    SpoolTotals,
    batch_from_row,
    summarize,
)
from .selection import drop_oldest, next_batch
from .sqlite import exclusive_flock, owner_id
from .target import Target

PENDING, SET_ASIDE = BatchState.PENDING, BatchState.SET_ASIDE

log = structlog.get_logger("chresilient.spool")

# Bytes counted per batch on top of its payload: the row's own SQLite overhead.
BATCH_OVERHEAD = 128
# Longest single wait while the 'block' policy waits for space.
BLOCK_STEP = 0.25
# A batch is ours to change: we hold its lease, or took it unleased under the replay lock.
OURS = "(lease_owner = ? OR ?)"


class SpoolStore:
    """The SQLite spool of one directory, seen from one :class:`Target`.

    Only batches of a matching target are claimed, so two applications sharing a
    directory never replay into each other's ClickHouse. The size limit bounds the batches
    stored in the directory, every target's together (the files take a little more).
    Thread-safe; safe after ``fork()``. A directory that cannot be written
    does not stop construction: :attr:`state` says ``unwritable`` or ``full`` and every
    write raises a :class:`SpoolError` naming the problem, until it is fixed.
    """

    def __init__(
        self,
        directory: str,
        *,
        target: Target | str,
        max_bytes: int,
        full_policy: str = "raise",
        block_timeout: float = 30.0,
    ) -> None:
        self.db = SpoolDatabase(directory)
        self.directory, self.path = self.db.directory, self.db.path
        self.target = target if isinstance(target, Target) else Target.parse(target)
        self.key = self.target.key
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self.block_timeout = block_timeout
        self._matches: dict[str, bool] = {self.key: True}
        digest = hashlib.sha1(self.target.database.encode()).hexdigest()[:12]
        self._lock_path = os.path.join(self.directory, f"replay-{digest}.lock")
        self.owner = owner_id()
        fork.register(self)
        problem = self.db.check()
        if problem is not None:
            log.error("spool_unusable", cause=problem.cause, error=str(problem))

    def after_fork_in_child(self) -> None:
        self.owner = owner_id()  # leases of the parent are not the child's

    @property
    def state(self) -> str:
        """``ok``, ``full`` or ``unwritable`` (see :class:`SpoolDatabase`)."""
        if self.db.state == "unwritable":
            self.db.check()  # fixed by the operator since? (cheap: one lock round)
        return self.db.state

    def targets(self, conn: sqlite3.Connection) -> list[str]:
        """The stored target keys this store replays (its own spelling always first)."""
        keys = [self.key]
        for (key,) in conn.execute("SELECT DISTINCT target FROM totals"):
            match = self._matches.get(key)
            if match is None:
                match = self._matches[key] = self.target.matches(Target.parse(key))
            if match and key != self.key:
                keys.append(key)
        return keys

    def _mine(self, conn: sqlite3.Connection) -> tuple[str, list[str]]:
        """``target IN (?, ...)`` and its parameters."""
        keys = self.targets(conn)
        return f"target IN ({', '.join('?' * len(keys))})", keys

    def close(self) -> None:
        self.db.close()

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
        """Store one whole batch durably, or raise :class:`SpoolError` (``SpoolFullError``
        when the limit or the disk is full, after the ``block`` policy's wait), or
        ``SpoolEncodeError`` for a value that cannot be stored exactly. ``on_full`` is
        called while the ``block`` policy waits for space (to wake the replayer)."""
        payload = codec.encode_rows(rows)
        cols = None if columns is None else codec.encode_json(list(columns))
        sets = codec.encode_json(dict(settings)) if settings else None
        size = len(payload) + len(cols or "") + len(sets or "") + len(table) + BATCH_OVERHEAD
        record = (batch_id, self.key, table, cols, sets, codec.CODEC_VERSION, len(rows), size)
        if size > self.max_bytes:
            raise SpoolFullError(
                f"batch of {size} bytes is larger than the whole spool "
                f"(spool_max_bytes={self.max_bytes}); split it into smaller batches",
                cause="limit",
                path=self.directory,
            )
        deadline = time.monotonic() + self.block_timeout
        while True:
            full: SpoolFullError
            try:
                self.db.check_room(size)
                result = self._put_once(record, payload)
                if result is not None:
                    return result
                used = self.totals(all_targets=True).bytes
                full = SpoolFullError(
                    f"spool is full: {used} of {self.max_bytes} bytes used, a batch of "
                    f"{size} bytes does not fit (spool_full_policy={self.full_policy!r}); "
                    "set-aside batches are never evicted: see `chresilient spool list`",
                    cause="limit",
                    path=self.directory,
                )
            except SpoolFullError as err:  # the disk itself is full
                full = err
            remaining = deadline - time.monotonic()
            if self.full_policy != "block" or remaining <= 0:
                raise full
            if on_full is not None:
                on_full()
            time.sleep(min(BLOCK_STEP, remaining))

    def _put_once(self, record: tuple[Any, ...], payload: bytes) -> PutResult | None:
        size = record[-1]
        dropped: list[tuple[str, str, int]] = []
        with self.db.write("put") as conn:
            (used,) = conn.execute("SELECT total(nbytes) FROM totals").fetchone()
            if used + size > self.max_bytes:
                if self.full_policy != "drop_oldest":
                    return None
                dropped = drop_oldest(conn, int(used) + size - self.max_bytes)
                if not dropped:
                    return None
            conn.execute(
                "INSERT INTO batches (batch_id, target, tbl, columns, settings, codec, nrows, "
                "nbytes, created, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*record, time.time(), payload),
            )
        rows = sum(n for _, _, n in dropped)
        for table, batch_id, nrows in dropped:
            log.warning(
                "spool_dropped_oldest",
                table=table,
                batch_id=batch_id,
                rows=nrows,
                reason="spool full, spool_full_policy='drop_oldest'",
            )
        return PutResult(size, len(dropped), rows)

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
        ``steal`` (the caller holds the replay lock, which proves that owner is gone); a
        batch waiting for its retry time (:meth:`retry_later`) holds its table back. When
        the disk is too full to write the lease, a caller holding the replay lock still
        gets the batch (``leased=False``), so a full disk does not stop the spool draining.
        """
        try:
            with self.db.write("claim", durable=False) as conn:
                chosen = self._next(conn, lease_seconds, skip_tables, steal)
                if chosen is None:
                    return None
                conn.execute(
                    "UPDATE batches SET lease_owner = ?, lease_until = ? WHERE seq = ?",
                    (self.owner, time.time() + lease_seconds, chosen),
                )
                row = conn.execute(
                    f"SELECT {BATCH_COLUMNS} FROM batches WHERE seq = ?", (chosen,)
                ).fetchone()
            return batch_from_row(row)
        except SpoolFullError:
            if not steal:
                raise
        batch = self.peek(lease_seconds=lease_seconds, skip_tables=skip_tables, steal=steal)
        return None if batch is None else replace(batch, leased=False)

    def peek(
        self, *, lease_seconds: float, skip_tables: Sequence[str] = (), steal: bool = False
    ) -> SpooledBatch | None:
        """The batch :meth:`claim` would take, without leasing it (a read)."""
        with self.db.read() as conn:
            chosen = self._next(conn, lease_seconds, skip_tables, steal)
            if chosen is None:
                return None
            row = conn.execute(f"SELECT {BATCH_COLUMNS} FROM batches WHERE seq = ?", (chosen,))
            found = row.fetchone()
        return None if found is None else batch_from_row(found)

    def _next(
        self,
        conn: sqlite3.Connection,
        lease_seconds: float,
        skip_tables: Sequence[str],
        steal: bool,
    ) -> int | None:
        where, keys = self._mine(conn)
        return next_batch(conn, where, keys, owner=self.owner, lease_seconds=lease_seconds,
                          skip_tables=skip_tables, steal=steal)

    def ack(self, batch: SpooledBatch) -> bool:
        """Delete a delivered batch; False if another owner had taken it over meanwhile.
        Raises :class:`SpoolError` if the delete cannot be written (e.g. disk full)."""
        with self.db.write("ack") as conn:
            cur = conn.execute(
                f"DELETE FROM batches WHERE seq = ? AND {OURS}",
                (batch.seq, self.owner, not batch.leased),
            )
            return cur.rowcount == 1

    def forget(self, batch: SpooledBatch) -> None:
        """Delete a batch this process delivered, whoever holds its lease now."""
        with self.db.write("ack") as conn:
            conn.execute(
                "DELETE FROM batches WHERE seq = ? AND batch_id = ?", (batch.seq, batch.batch_id)
            )

    def release(self, batch: SpooledBatch, error: str | None, *, outage: bool = False) -> None:
        """Give a claimed batch back uncounted; ``outage``: ClickHouse was unavailable, so
        its earlier failed attempts may have been the outage too: they count from 0."""
        reset = "attempts = 0, " if outage else ""
        self._update(batch, f"{reset}lease_owner = NULL, lease_until = 0, last_error = ?", error)

    def retry_later(self, batch: SpooledBatch, error: str, delay: float) -> None:
        """Count a failed attempt of this batch and hold its table back ``delay`` s."""
        self._update(
            batch,
            "attempts = attempts + 1, lease_owner = NULL, lease_until = ?, last_error = ?",
            time.time() + delay,
            error,
        )

    def set_aside(self, batch: SpooledBatch, error: str) -> None:
        """Take a batch out of the queue (rejected for good, or out of attempts); it stays
        until the operator retries, exports or discards it."""
        self._update(
            batch,
            "state = ?, attempts = attempts + 1, lease_owner = NULL, lease_until = 0, "
            "last_error = ?",
            SET_ASIDE,
            error,
        )

    def _update(self, batch: SpooledBatch, assignments: str, *values: Any) -> None:
        with self.db.write("update") as conn:
            conn.execute(
                f"UPDATE batches SET {assignments} WHERE seq = ? AND {OURS}",
                (*values, batch.seq, self.owner, not batch.leased),
            )

    def replay_lock(self) -> contextlib.AbstractContextManager[bool | None]:
        """Hold this database's replay lock: True if held, False if another replayer has
        it, None if the file system has no ``flock`` (then only leases protect batches)."""
        return exclusive_flock(self._lock_path)

    # -- operator ------------------------------------------------------------------------
    def batches(
        self, state: BatchState = SET_ASIDE, ids: Sequence[int] | None = None
    ) -> list[SpooledBatch]:
        """This target's batches in ``state`` (or those with these ``seq`` numbers)."""
        with self.db.read() as conn:
            where, keys = self._mine(conn)
            sql = f"SELECT {BATCH_COLUMNS} FROM batches WHERE {where}"
            params: list[Any] = list(keys)
            if ids is None:
                sql += " AND state = ?"
                params.append(state)
            else:
                sql += f" AND seq IN ({', '.join('?' * len(ids))})"
                params.extend(ids)
            rows = conn.execute(sql + " ORDER BY seq", params).fetchall()
        return [batch_from_row(r) for r in rows]

    def requeue(self, ids: Sequence[int] | None = None) -> int:
        """Put set-aside batches (all, or these ``seq``) back in the queue, attempts at 0."""
        with self.db.write("requeue") as conn:
            where, keys = self._mine(conn)
            picked = "" if ids is None else f" AND seq IN ({', '.join('?' * len(ids))})"
            cur = conn.execute(
                "UPDATE batches SET state = ?, attempts = 0, lease_owner = NULL, "
                f"lease_until = 0 WHERE {where} AND state = ?{picked}",
                (PENDING, *keys, SET_ASIDE, *(ids or ())),
            )
            return cur.rowcount

    def discard(self, ids: Sequence[int]) -> SpoolTotals:
        """Delete these set-aside batches (pending ones are never discarded by id)."""
        marks = ", ".join("?" * len(ids))
        with self.db.write("discard") as conn:
            where, keys = self._mine(conn)
            sql = f"FROM batches WHERE {where} AND state = ? AND seq IN ({marks})"
            params = (*keys, SET_ASIDE, *ids)
            row = conn.execute(f"SELECT count(*), total(nrows), total(nbytes) {sql}", params)
            found = row.fetchone()
            conn.execute(f"DELETE {sql}", params)
        gone = SpoolTotals(int(found[0]), int(found[1]), int(found[2]))
        log.warning("spool_discarded", batches=gone.batches, rows=gone.rows, ids=list(ids))
        return gone

    # -- reading and housekeeping -------------------------------------------------------------
    def totals(self, *, all_targets: bool = False, state: BatchState = PENDING) -> SpoolTotals:
        """Batches, rows and bytes of this target in ``state`` (or of the whole spool)."""
        query = "SELECT total(batches), total(nrows), total(nbytes) FROM totals"
        with self.db.read() as conn:
            if all_targets:
                row = conn.execute(query).fetchone()
            else:
                where, keys = self._mine(conn)
                row = conn.execute(
                    f"{query} WHERE {where} AND state = ?", (*keys, int(state))
                ).fetchone()
        return SpoolTotals(int(row[0]), int(row[1]), int(row[2]))

    def status(self) -> dict[str, Any]:
        """What is in the spool, per table, without any row contents."""
        now = time.time()
        with self.db.read() as conn:
            where, keys = self._mine(conn)
            tables = conn.execute(
                "SELECT tbl, state, count(*), total(nrows), total(nbytes), min(created), "
                f"sum(lease_owner IS NOT NULL AND lease_until > ?) FROM batches WHERE {where} "
                "GROUP BY tbl, state ORDER BY tbl, state",
                (now, *keys),
            ).fetchall()
            others = conn.execute(
                "SELECT target, count(*), total(nrows) FROM batches "
                f"WHERE NOT ({where}) GROUP BY target",
                keys,
            ).fetchall()
            (errors,) = conn.execute(
                f"SELECT last_error FROM batches WHERE {where} AND last_error IS NOT NULL "
                "ORDER BY seq DESC LIMIT 1",
                keys,
            ).fetchone() or (None,)
        return summarize(
            tables,
            others,
            now=now,
            header={"directory": self.directory, "target": self.key, "state": self.state},
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
        with self.db.write("purge") as conn:
            where, keys = self._mine(conn)
            params: tuple[Any, ...] = tuple(keys)
            if failed_only:
                where, params = f"{where} AND state = ?", (*keys, SET_ASIDE)
            row = conn.execute(
                f"SELECT count(*), total(nrows), total(nbytes) FROM batches WHERE {where}",
                params,
            ).fetchone()
            conn.execute(f"DELETE FROM batches WHERE {where}", params)
        purged = SpoolTotals(int(row[0]), int(row[1]), int(row[2]))
        log.warning("spool_purged", batches=purged.batches, rows=purged.rows, target=self.key)
        self.compact()
        return purged

    def compact(self) -> None:
        """Give disk space back: the WAL after every pass, the file once the spool is
        empty (it never shrinks by itself)."""
        empty = False
        with contextlib.suppress(sqlite3.Error, OSError), self.db.locked() as conn:
            (count,) = conn.execute("SELECT total(batches) FROM totals").fetchone()
            if not count:
                conn.execute("PRAGMA incremental_vacuum")
                empty = True
        self.db.checkpoint(truncate=empty)
