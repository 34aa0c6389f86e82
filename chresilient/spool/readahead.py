"""Decoding the next spooled batch while the current one is delivered.

A replayed batch is claimed, decoded, sent, and deleted after ClickHouse acknowledged it,
one after the other. While an INSERT is in flight the replayer only waits for the server,
so a helper thread reads the batch that comes next (a read: nothing is leased, nothing
changes in the spool) and decodes its rows meanwhile. When the replayer then claims a
batch, it uses those rows if it is the same one; otherwise (another replayer took it, a
failure changed the order) it decodes as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from .records import SpooledBatch
from .store import SpoolStore


class ReadAhead:
    """The decoded rows of the batch after the one in flight (one pass; see above)."""

    def __init__(self, store: SpoolStore, *, lease_seconds: float, steal: bool) -> None:
        self._store, self._lease_seconds, self._steal = store, lease_seconds, steal
        self._helper: ThreadPoolExecutor | None = None
        self._ahead: Future[SpooledBatch | None] | None = None

    def after(self, current: SpooledBatch, skip_tables: Sequence[str]) -> None:
        """Start reading and decoding the batch that follows ``current``."""
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="chresilient-spool-read")
        self._ahead = self._helper.submit(self._decode_next, current.seq, tuple(skip_tables))

    def decoded(self, claimed: SpooledBatch) -> SpooledBatch:
        """``claimed`` with its rows if they were decoded ahead, else as it is."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return claimed
        try:
            early = ahead.result()
        except Exception:  # a read that failed: the delivery decodes (and reports) itself
            return claimed
        if early is None or (early.seq, early.batch_id) != (claimed.seq, claimed.batch_id):
            return claimed
        return replace(claimed, decoded=early.decoded)

    def close(self) -> None:
        """Stop the helper thread (after the read in progress, if any)."""
        self._ahead = None
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None

    def _decode_next(self, in_flight: int, skip_tables: Sequence[str]) -> SpooledBatch | None:
        batch = self._store.peek(
            lease_seconds=self._lease_seconds,
            skip_tables=skip_tables,
            steal=self._steal,
            in_flight=(in_flight,),
        )
        return None if batch is None else replace(batch, decoded=batch.decode_rows())
