"""Counters and gauges of one manager, as a plain dict."""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any

from . import fork

# Upper bounds (seconds) of the query duration histogram, Prometheus' defaults stretched
# to the retry deadlines a call can reach.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


# The spool's counters in metrics() and their Prometheus help: dropped rows must be alertable.
SPOOL_COUNTERS = {
    "spool_batches_written": "Batches written to the spool because ClickHouse was unavailable.",
    "spool_rows_written": "Rows written to the spool because ClickHouse was unavailable.",
    "spool_batches_replayed": "Spooled batches delivered to ClickHouse.",
    "spool_rows_replayed": "Spooled rows delivered to ClickHouse.",
    "spool_batches_set_aside": "Spooled batches set aside (rejected, or out of attempts).",
    "spool_rows_set_aside": "Rows in spooled batches set aside for the operator.",
    "spool_dropped_batches": "Batches evicted by the drop_oldest policy: data lost.",
    "spool_dropped_rows": "Rows evicted by the drop_oldest policy: data lost.",
}


class Metrics:
    """Thread-safe counters; gauges are read from their owners when a snapshot is taken."""

    COUNTERS = (
        "queries_total",
        "query_errors_total",
        "retry_attempts",
        "retry_budget_exhausted",
        "inserts_total",
        "rows_inserted",
        "failovers_total",  # retries that went to another host than the failed attempt
    )

    def __init__(self) -> None:
        self._start()
        fork.register(self)

    def _start(self) -> None:
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(self.COUNTERS, 0)
        self._errors_by_kind: dict[str, int] = {}
        self.started_wall = time.time()
        # One slot per bucket plus +Inf; not cumulative (the exposition sums them).
        self._duration_counts = [0] * (len(DURATION_BUCKETS) + 1)
        self._duration_sum = 0.0

    def incr(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + value

    def error(self, kind: str) -> None:
        with self._lock:
            self._counters["query_errors_total"] += 1
            self._errors_by_kind[kind] = self._errors_by_kind.get(kind, 0) + 1

    def record_call(self, seconds: float, retries: int = 0, error: str | None = None) -> None:
        """One call through the executor: counted, timed, its retries and its error kind
        (None: it succeeded), under one lock."""
        slot = bisect.bisect_left(DURATION_BUCKETS, seconds)
        with self._lock:
            counters = self._counters
            counters["queries_total"] += 1
            self._duration_counts[slot] += 1
            self._duration_sum += seconds
            if retries:
                counters["retry_attempts"] += retries
            if error is not None:
                counters["query_errors_total"] += 1
                self._errors_by_kind[error] = self._errors_by_kind.get(error, 0) + 1

    def durations(self) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative ``(upper_bound, count)`` buckets ending with +Inf, the sum, the count."""
        with self._lock:
            counts, total = list(self._duration_counts), self._duration_sum
        buckets, running = [], 0
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), counts):
            running += count
            buckets.append((bound, running))
        return buckets, total, running

    def after_fork_in_child(self) -> None:
        """A forked child counts from zero: what the parent did stays the parent's (the
        all-processes totals add every live process's counters)."""
        self._start()

    def counters(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            out["errors_by_kind"] = dict(self._errors_by_kind)
        return out


def utc_iso(wall: float | None) -> str | None:
    """A wall-clock time as ISO 8601 UTC with milliseconds (None stays None)."""
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"
