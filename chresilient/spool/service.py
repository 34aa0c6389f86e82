"""The spool as the manager, the CLI and the health report see it: ``mgr.spool``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from ..errors import SpoolError
from ..metrics import utc_iso
from .records import BatchState, SpooledBatch, SpoolTotals
from .replay import ReplayReport, SpoolReplayer
from .store import SpoolStore


class Spool:
    """The insert spool of one manager: ``mgr.spool``.

    ``status()``, ``replay(limit)``, ``purge(confirm=True)`` are the API the CLI uses;
    ``wake()`` is for the health monitor; ``health()`` is the section ``health()`` shows.
    """

    def __init__(
        self,
        store: SpoolStore,
        replayer: SpoolReplayer,
        guarantee: Callable[[], str],
    ) -> None:
        self.store = store
        self.replayer = replayer
        self._guarantee = guarantee

    @property
    def directory(self) -> str:
        return self.store.directory

    def pending(self) -> SpoolTotals:
        """Undelivered batches of this target (set-aside ones excluded)."""
        return self.store.totals()

    @property
    def state(self) -> str:
        """``ok``, ``full`` (the disk is full) or ``unwritable``."""
        return self.store.state

    def status(self) -> dict[str, Any]:
        """Everything about the spool, without any row contents."""
        out = self.store.status()
        out.update(self._replay_state())
        return out

    def gauges(self) -> dict[str, Any]:
        """The spool's gauges for ``metrics()``; zeros (and the state) when unreadable."""
        try:
            pending = self.store.totals()
            aside = self.store.totals(state=BatchState.SET_ASIDE)
        except SpoolError:
            pending = aside = SpoolTotals(0, 0, 0)
        return {
            "pending_batches": pending.batches,
            "pending_rows": pending.rows,
            "pending_bytes": pending.bytes,
            "set_aside_batches": aside.batches,
            "set_aside_rows": aside.rows,
            "spool_state": self.state,
        }

    def health(self) -> dict[str, Any]:
        """The spool section of ``mgr.health()``: cheap (small index scans); a spool that
        cannot be read is reported (``state``, ``error``), never raised."""
        state = self.state
        section: dict[str, Any] = {"state": state, "directory": self.store.directory}
        try:
            pending = self.store.totals()
            failed = self.store.totals(state=BatchState.SET_ASIDE)
            used = self.store.totals(all_targets=True)
        except SpoolError as err:
            section.update(state="unwritable" if state == "ok" else state, error=str(err))
        else:
            section.update(
                pending_batches=pending.batches,
                pending_rows=pending.rows,
                pending_bytes=pending.bytes,
                failed_batches=failed.batches,
                failed_rows=failed.rows,
                used_bytes=used.bytes,
            )
        if self.store.db.problem is not None and "error" not in section:
            section["error"] = str(self.store.db.problem)
        return {
            **section,
            "max_bytes": self.store.max_bytes,
            "full_policy": self.store.full_policy,
            **self._replay_state(),
        }

    def _replay_state(self) -> dict[str, Any]:
        r = self.replayer
        return {
            "delivery_guarantee": self._guarantee(),
            "replayer_running": r.running,
            "last_replay_error": r.last_error,
            "last_replay_error_at": utc_iso(r.last_error_wall),
            "last_replay_delivery_at": utc_iso(r.last_delivery_wall),
        }

    def replay(self, limit: int | None = None) -> ReplayReport:
        """Replay now, in this thread (the CLI's ``spool replay``)."""
        return self.replayer.replay(limit)

    def purge(self, confirm: bool = False, *, failed_only: bool = False) -> SpoolTotals:
        """Delete undelivered batches of this target; ``confirm=True`` is required."""
        return self.store.purge(confirm=confirm, failed_only=failed_only)

    def requeue_failed(self, ids: Sequence[int] | None = None) -> int:
        """Retry set-aside batches (all, or these ``seq``), attempts counted from 0: after
        fixing the table they were rejected by."""
        count = self.store.requeue(ids)
        if count:
            self.wake()
        return count

    def set_aside(self, ids: Sequence[int] | None = None) -> list[SpooledBatch]:
        """The batches set aside (or those with these ``seq``), oldest first."""
        return self.store.batches(ids=ids)

    def discard(self, ids: Sequence[int], confirm: bool = False) -> SpoolTotals:
        """Delete set-aside batches for good; ``confirm=True`` is required."""
        if confirm is not True:
            raise ValueError("discard deletes undelivered rows; call discard(ids, confirm=True)")
        return self.store.discard(ids)

    def wake(self) -> None:
        self.replayer.wake()
