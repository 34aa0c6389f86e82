"""Counters and gauges of one manager, as a plain dict."""

from __future__ import annotations

import threading
import time
from typing import Any


class Metrics:
    """Thread-safe counters; gauges are read from their owners when a snapshot is taken."""

    COUNTERS = (
        "queries_total",
        "query_errors_total",
        "retry_attempts",
        "retry_budget_exhausted",
        "inserts_total",
        "rows_inserted",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(self.COUNTERS, 0)
        self._errors_by_kind: dict[str, int] = {}
        self.last_success_wall: float | None = None
        self.started_wall = time.time()

    def incr(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + value

    def error(self, kind: str) -> None:
        with self._lock:
            self._counters["query_errors_total"] += 1
            self._errors_by_kind[kind] = self._errors_by_kind.get(kind, 0) + 1

    def success(self) -> None:
        self.last_success_wall = time.time()

    def counters(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            out["errors_by_kind"] = dict(self._errors_by_kind)
        return out
