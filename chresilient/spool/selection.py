"""Which stored batch goes next, and which to evict: the two queue decisions, in SQL.

Order is per table: a table's oldest pending batch is its head, and nothing of that table
is taken while its head is leased by another replayer or waits for its retry time.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from .records import BatchState

# A wait before retrying a batch longer than this means the clock went back.
LONGEST_RETRY_WAIT = 3600.0


def next_batch(
    conn: sqlite3.Connection,
    where: str,
    keys: Sequence[str],
    *,
    owner: str,
    lease_seconds: float,
    skip_tables: Sequence[str],
    steal: bool,
) -> int | None:
    """The ``seq`` of the oldest pending batch (among ``where``/``keys``) that is the head
    of its table and free to take, or None. Leases of other owners count until they
    expire, unless ``steal``."""
    now = time.time()
    blocked = set(skip_tables)
    cur = conn.execute(
        f"SELECT seq, tbl, lease_owner, lease_until FROM batches "
        f"WHERE {where} AND state = ? ORDER BY seq",
        (*keys, BatchState.PENDING),
    )
    try:
        # Usually the very first row: the oldest batch is the head of its table.
        for seq, tbl, holder, until in cur:
            if tbl in blocked:
                continue
            if holder is None:  # waiting for its retry time, or free
                free = until <= now or until > now + LONGEST_RETRY_WAIT
            else:
                free = (
                    steal
                    or holder == owner
                    or until < now
                    or until > now + 2 * lease_seconds  # the clock went back
                )
            if free:
                return int(seq)
            blocked.add(tbl)  # keep the table's order
    finally:
        cur.close()
    return None


def drop_oldest(conn: sqlite3.Connection, needed: int) -> list[tuple[str, str, int]]:
    """Delete the oldest pending batches not being replayed right now, ``needed`` bytes'
    worth (set-aside ones are kept for the operator): ``(table, batch_id, rows)`` of each
    one dropped, or [] (nothing deleted) if that is not enough."""
    now = time.time()
    victims: list[tuple[int, str, str, int]] = []
    freed = 0
    for seq, tbl, batch_id, nbytes, nrows in conn.execute(
        "SELECT seq, tbl, batch_id, nbytes, nrows FROM batches "
        "WHERE state = ? AND (lease_owner IS NULL OR lease_until < ?) ORDER BY seq",
        (BatchState.PENDING, now),
    ):
        victims.append((seq, tbl, batch_id, nrows))
        freed += nbytes
        if freed >= needed:
            break
    if freed < needed:
        return []
    conn.executemany("DELETE FROM batches WHERE seq = ?", [(v[0],) for v in victims])
    return [(tbl, batch_id, nrows) for _, tbl, batch_id, nrows in victims]
