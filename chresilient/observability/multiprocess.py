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
        with _writes.held():  # creating a gauge takes prometheus_client's lock too
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

    def publish(self, metrics: dict[str, Any]) -> None:
        """Write this process's current values (from ``mgr.metrics()``)."""
        with _writes.held():
            for key, gauge in self._gauges.items():
                gauge.set(float(metrics.get(key, 0) or 0))
            self._healthy.set(1.0 if metrics.get("connection_state") == "healthy" else 0.0)


class _Writes:
    """The one lock every use of prometheus_client's multiprocess values here takes, held
    across ``fork()``.

    prometheus_client guards all multiprocess values of a process with one lock of its
    own that a child inherits as it was: a parent thread inside it at fork time (writing
    a value, or creating a gauge, as a monitor's first round may do while gunicorn forks
    its workers) would leave it held for good in the child. Holding ours across fork
    means no thread of ours is inside theirs then.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held_at_fork = False
        fork.register(self)

    def held(self) -> threading.Lock:
        return self._lock

    def before_fork(self) -> None:
        self._held_at_fork = self._lock.acquire(timeout=5.0)

    def after_fork_in_parent(self) -> None:
        if self._held_at_fork:
            self._held_at_fork = False
            self._lock.release()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._held_at_fork = False


_writes = _Writes()
_process_totals: WorkerTotals | None = None


def process_totals() -> WorkerTotals:
    """The one :class:`WorkerTotals` of this process (gauge names are per process)."""
    global _process_totals
    if _process_totals is None:
        created = WorkerTotals()
        with _writes.held():
            if _process_totals is None:
                _process_totals = created
    return _process_totals
