"""The spool as the manager, the CLI and the health report see it: ``mgr.spool``."""

from __future__ import annotations

from typing import Any, Callable

from ..metrics import utc_iso
from .records import BatchState, SpoolTotals
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

    def status(self) -> dict[str, Any]:
        """Everything about the spool, without any row contents."""
        out = self.store.status()
        out.update(self._replay_state())
        return out

    def health(self) -> dict[str, Any]:
        """The spool section of ``mgr.health()``: cheap (two small index scans)."""
        pending = self.store.totals()
        failed = self.store.totals(state=BatchState.SET_ASIDE)
        used = self.store.totals(all_targets=True)
        return {
            "pending_batches": pending.batches,
            "pending_rows": pending.rows,
            "pending_bytes": pending.bytes,
            "failed_batches": failed.batches,
            "used_bytes": used.bytes,
            "max_bytes": self.store.max_bytes,
            "full_policy": self.store.full_policy,
            "directory": self.store.directory,
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

    def requeue_failed(self) -> int:
        """Retry set-aside batches (after fixing the table they were rejected by)."""
        count = self.store.requeue_failed()
        if count:
            self.wake()
        return count

    def wake(self) -> None:
        self.replayer.wake()

