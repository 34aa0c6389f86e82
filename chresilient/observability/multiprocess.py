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

import glob
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.multiprocess import MultiProcessCollector

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


# Every use of prometheus_client's multiprocess values here (creating a gauge, setting it)
# happens under this lock, held across fork(): prometheus_client guards all multiprocess
# values of a process with one lock of its own, which a child inherits as it was, and a
# parent thread inside it at fork time (a monitor's first round creating the gauges while
# gunicorn forks its workers) would leave it held for good in the child.
_writes = fork.QuiescingLock()
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


class SettledFilesCollector(MultiProcessCollector):
    """``MultiProcessCollector`` over the files whose process has finished creating them.

    prometheus_client creates a process's file empty and sizes it a moment later
    (prometheus/client_python#1199): a scrape that met such a file (a worker starting, a
    respawn) failed whole. An empty file holds no value yet, so it is left out.
    """

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        self.directory = path
        super().__init__(registry, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Any]:
        files = [f for f in glob.glob(os.path.join(self.directory, "*.db")) if _has_data(f)]
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call,no-any-return]


def _has_data(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:  # removed meanwhile (a dead worker's, by mark_process_dead)
        return False
