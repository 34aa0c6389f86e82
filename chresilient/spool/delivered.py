"""Batches delivered to ClickHouse whose delete from the spool could not be written yet."""

from __future__ import annotations

import threading

from .. import fork
from .records import SpooledBatch


class DeliveredBatches:
    """Batches this process delivered whose delete could not be written yet (a full
    disk), per spool file. One per process, shared by its replayers: a manager closed and
    built again in the same process must not send them again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: dict[str, dict[int, SpooledBatch]] = {}
        fork.register(self)

    def add(self, path: str, batch: SpooledBatch) -> None:
        with self._lock:
            self._by_path.setdefault(path, {})[batch.seq] = batch

    def waiting(self, path: str) -> list[SpooledBatch]:
        with self._lock:
            return list(self._by_path.get(path, {}).values())

    def done(self, path: str, batch: SpooledBatch) -> None:
        with self._lock:
            self._by_path.get(path, {}).pop(batch.seq, None)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._by_path = {}  # the parent deletes its own


DELIVERED = DeliveredBatches()
