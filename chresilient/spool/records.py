"""What the spool stores: the SQLite schema, batch states and the records read back."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import codec

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    target TEXT NOT NULL,
    tbl TEXT NOT NULL,
    columns TEXT,
    settings TEXT,
    codec INTEGER NOT NULL,
    nrows INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    created REAL NOT NULL,
    state INTEGER NOT NULL DEFAULT 0, -- BatchState.PENDING
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_order ON batches (target, state, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- Running totals, kept by triggers in the same transaction as every change: the size
-- check of each put() and the metrics gauges cost one tiny read, not a scan.
CREATE TABLE IF NOT EXISTS totals (
    target TEXT NOT NULL,
    state INTEGER NOT NULL,
    batches INTEGER NOT NULL,
    nrows INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    PRIMARY KEY (target, state)
);
CREATE TRIGGER IF NOT EXISTS batches_added AFTER INSERT ON batches BEGIN
    INSERT INTO totals (target, state, batches, nrows, nbytes)
    VALUES (NEW.target, NEW.state, 1, NEW.nrows, NEW.nbytes)
    ON CONFLICT (target, state) DO UPDATE SET batches = batches + 1,
        nrows = nrows + excluded.nrows, nbytes = nbytes + excluded.nbytes;
END;
CREATE TRIGGER IF NOT EXISTS batches_removed AFTER DELETE ON batches BEGIN
    UPDATE totals SET batches = batches - 1, nrows = nrows - OLD.nrows,
        nbytes = nbytes - OLD.nbytes
    WHERE target = OLD.target AND state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS batches_moved AFTER UPDATE OF state ON batches
WHEN OLD.state != NEW.state BEGIN
    UPDATE totals SET batches = batches - 1, nrows = nrows - OLD.nrows,
        nbytes = nbytes - OLD.nbytes
    WHERE target = OLD.target AND state = OLD.state;
    INSERT INTO totals (target, state, batches, nrows, nbytes)
    VALUES (NEW.target, NEW.state, 1, NEW.nrows, NEW.nbytes)
    ON CONFLICT (target, state) DO UPDATE SET batches = batches + 1,
        nrows = nrows + excluded.nrows, nbytes = nbytes + excluded.nbytes;
END;
"""


class BatchState(enum.IntEnum):
    """A stored batch's state; passed to SQL as a parameter, never written as a literal."""

    PENDING = 0  # waiting for delivery
    SET_ASIDE = 1  # the server rejected it for good (e.g. the table is gone)


BATCH_COLUMNS = (
    "seq, batch_id, tbl, columns, settings, codec, nrows, nbytes, created, attempts, "
    "last_error, payload"
)


@dataclass(frozen=True)
class SpooledBatch:
    """One claimed batch, as stored."""

    seq: int
    batch_id: str
    table: str
    columns: tuple[str, ...] | None
    settings: dict[str, Any] | None
    codec: int
    rows: int
    size: int
    created: float
    attempts: int
    last_error: str | None
    payload: bytes = field(repr=False)
    # False: chosen without writing a lease (the disk was full; the caller's replay lock
    # alone keeps other replayers away).
    leased: bool = True

    def decode_rows(self) -> list[tuple[Any, ...]]:
        return codec.decode_rows(self.payload, self.codec)


@dataclass(frozen=True)
class PutResult:
    """What storing one batch cost: its size and what ``drop_oldest`` evicted for it."""

    bytes: int
    dropped_batches: int = 0
    dropped_rows: int = 0


@dataclass(frozen=True)
class SpoolTotals:
    batches: int
    rows: int
    bytes: int


def batch_from_row(row: Sequence[Any]) -> SpooledBatch:
    (seq, batch_id, tbl, cols, sets, version, nrows, nbytes, created, attempts, err, payload) = row
    return SpooledBatch(
        seq=seq,
        batch_id=batch_id,
        table=tbl,
        columns=None if cols is None else tuple(codec.decode_json(cols)),
        settings=None if sets is None else dict(codec.decode_json(sets)),
        codec=version,
        rows=nrows,
        size=nbytes,
        created=created,
        attempts=attempts,
        last_error=err,
        payload=bytes(payload),
    )


def summarize(
    tables: Sequence[Sequence[Any]],
    others: Sequence[Sequence[Any]],
    *,
    now: float,
    header: dict[str, Any],
    footer: dict[str, Any],
) -> dict[str, Any]:
    """The spool status report from per-(table, state) rows
    ``(tbl, state, batches, rows, bytes, oldest created, leased)`` and other targets'
    ``(target, batches, rows)``: counts only, never row contents."""
    per_table: dict[str, dict[str, Any]] = {}
    pending = failed = SpoolTotals(0, 0, 0)
    oldest: float | None = None
    in_flight = 0
    for tbl, state, count, nrows, nbytes, created, leased in tables:
        entry = per_table.setdefault(
            tbl, {"pending_batches": 0, "pending_rows": 0, "failed_batches": 0}
        )
        if state == BatchState.PENDING:
            entry.update(pending_batches=count, pending_rows=int(nrows))
            pending = SpoolTotals(
                pending.batches + count, pending.rows + int(nrows), pending.bytes + int(nbytes)
            )
            oldest = created if oldest is None else min(oldest, created)
            in_flight += int(leased or 0)
        else:
            entry["failed_batches"] = count
            failed = SpoolTotals(
                failed.batches + count, failed.rows + int(nrows), failed.bytes + int(nbytes)
            )
    return {
        **header,
        "pending_batches": pending.batches,
        "pending_rows": pending.rows,
        "pending_bytes": pending.bytes,
        "failed_batches": failed.batches,
        "failed_rows": failed.rows,
        "in_flight_batches": in_flight,
        "oldest_pending_age": None if oldest is None else round(max(now - oldest, 0.0), 3),
        **footer,
        "tables": per_table,
        "other_targets": {t: {"batches": c, "rows": int(r)} for t, c, r in others},
    }
