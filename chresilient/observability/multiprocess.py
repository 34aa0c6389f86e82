"""Totals over all worker processes (gunicorn with ``PROMETHEUS_MULTIPROC_DIR``).

Each worker's manager lives in that worker, so a scrape sees the counters of the worker
that answered. Here every process that runs a manager also writes its current totals into
prometheus_client's multiprocess files as ``livesum`` gauges (``chresilient_all_processes_*``):
``MultiProcessCollector`` then sums the live processes at every scrape, whichever worker
answers. A process publishes at each of its monitor's rounds and at each scrape it serves;
call ``prometheus_client.multiprocess.mark_process_dead(pid)`` in gunicorn's ``child_exit``
hook so that a dead worker's values leave the sums.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from .. import fork

# metrics() key -> (family suffix, help, multiprocess mode). The spool is shared by the
# workers of one directory, so its pending rows are the same for all: the largest live
# value, not a sum. "Processes": every process that runs a manager (with --preload, the
# master that built the app counts too).
TOTALS = {
    "queries_total": ("queries_total", "Calls through the managers of all workers.", "livesum"),
    "query_errors_total": ("query_errors_total", "Failed calls, all workers.", "livesum"),
    "retry_attempts": ("retry_attempts_total", "Retries, all workers.", "livesum"),
    "rows_inserted": ("rows_inserted_total", "Rows inserted, all workers.", "livesum"),
    "spool_rows_written": ("spool_rows_written_total", "Rows spooled, all workers.", "livesum"),
    "spool_rows_replayed": (
        "spool_rows_replayed_total", "Spooled rows delivered, all workers.", "livesum"
    ),
    "spool_dropped_rows": ("spool_dropped_rows_total", "Rows dropped, all workers.", "livesum"),
    "checked_out": ("checked_out_connections", "Connections in use, all workers.", "livesum"),
    "pending_rows": ("spool_pending_rows", "Rows waiting in the shared spool.", "livemax"),
}


class WorkerTotals:
    """This process's share of the all-workers totals (one per process)."""

    def __init__(self) -> None:
        registry = CollectorRegistry()  # holds the gauges; their values live in the files
        self._lock = threading.Lock()
        self._gauges = {
            key: Gauge(
                f"chresilient_all_processes_{suffix}", text, registry=registry,
                multiprocess_mode=mode,  # type: ignore[arg-type]
            )
            for key, (suffix, text, mode) in TOTALS.items()
        }
        self._healthy = Gauge(
            "chresilient_all_processes_healthy",
            "Processes whose connection state is healthy.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._held_at_fork = False
        fork.register(self)

    def before_fork(self) -> None:
        """Every write to the multiprocess files happens under ``_lock``: holding it across
        fork() means no thread of ours is inside prometheus_client's own lock (one per
        process, not reset in a child) when the process is copied."""
        self._held_at_fork = self._lock.acquire(timeout=5.0)

    def after_fork_in_parent(self) -> None:
        if self._held_at_fork:
            self._held_at_fork = False
            self._lock.release()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._held_at_fork = False

    def publish(self, metrics: dict[str, Any]) -> None:
        """Write this process's current values (from ``mgr.metrics()``)."""
        with self._lock:
            for key, gauge in self._gauges.items():
                gauge.set(float(metrics.get(key, 0) or 0))
            self._healthy.set(1.0 if metrics.get("connection_state") == "healthy" else 0.0)


_process_totals: WorkerTotals | None = None
_create_lock = threading.Lock()


class _CreateLock:
    """Re-creates the module's lock in a forked child (see chresilient.fork)."""

    def after_fork_in_child(self) -> None:
        global _create_lock
        _create_lock = threading.Lock()


_FORK_HOOK = _CreateLock()
fork.register(_FORK_HOOK)


def process_totals() -> WorkerTotals:
    """The one :class:`WorkerTotals` of this process (gauge names are per process)."""
    global _process_totals
    with _create_lock:
        if _process_totals is None:
            _process_totals = WorkerTotals()
        return _process_totals
