"""Prometheus exposition of a manager's metrics through a custom collector.

The collector reads ``metrics()`` when scraped (a pure function of that dict), so the
query path pays nothing for Prometheus and the JSON and text views never disagree.
Register it in your own registry (``register_collector(mgr)``) or serve
:func:`exposition` (the health WSGI app does, at ``/health/clickhouse/metrics``).

gunicorn multiprocess mode: the manager, its pool and its breaker live in each worker, so
a scrape through the shared port sees the worker that answered. With
``PROMETHEUS_MULTIPROC_DIR`` set, :func:`exposition` adds the app's own multiprocess
metrics (``MultiProcessCollector``, aggregated over workers) and labels chresilient's
series with ``pid``; aggregate with ``sum without (pid)``/``max without (pid)`` and expect
the series of one worker per scrape. Scrape each worker (``chresilient serve`` next to
it, or one port per worker) when every worker's pool must be watched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector

from ..metrics import SPOOL_COUNTERS
from .multiprocess import SettledFilesCollector, process_totals

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
CONNECTION_STATES = ("connecting", "healthy", "degraded", "unhealthy", "closed")
MULTIPROC_ENV = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


# metrics() key -> help: the spool's gauges, exported as chresilient_spool_<key>.
SPOOL_GAUGES = {
    "pending_bytes": "Bytes of undelivered batches in the local spool.",
    "pending_rows": "Rows in the local spool awaiting delivery.",
    "pending_batches": "Batches in the local spool awaiting delivery.",
    "set_aside_batches": "Spooled batches set aside for the operator (chresilient spool list).",
    "set_aside_rows": "Rows in spooled batches set aside for the operator.",
}

class MetricsSource(Protocol):
    """Anything with ``metrics()`` in the shape of ``mgr.metrics()`` (a manager is one)."""

    def metrics(self) -> dict[str, Any]: ...


class ManagerCollector(Collector):
    """Reads one source at scrape time; ``const_labels`` are added to every series."""

    def __init__(self, source: MetricsSource, const_labels: dict[str, str] | None = None) -> None:
        self._source = source
        self._const = dict(const_labels or {})

    def describe(self) -> Iterable[Metric]:
        return []  # no scrape at registration time

    def collect(self) -> Iterator[Metric]:
        m = self._source.metrics()
        yield from self._process_metrics(m)
        yield from self._host_metrics(m)
        yield from self._health_metrics(m)

    # -- helpers ------------------------------------------------------------------------
    def _family(self, kind: type[Any], name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        return kind(name, doc, labels=(*self._const, *labels))

    def _add(self, family: Any, values: tuple[str, ...], value: float) -> None:
        family.add_metric((*self._const.values(), *values), value)

    def _counter(self, name: str, doc: str, value: float) -> Metric:
        family = self._family(CounterMetricFamily, name, doc)
        self._add(family, (), value)
        return family  # type: ignore[no-any-return]

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        family = self._family(GaugeMetricFamily, name, doc)
        self._add(family, (), value)
        return family  # type: ignore[no-any-return]

    def _process_metrics(self, m: dict[str, Any]) -> Iterator[Metric]:
        yield self._counter(
            "chresilient_queries_total", "Calls through the manager.", m["queries_total"]
        )
        errors = self._family(
            CounterMetricFamily,
            "chresilient_query_errors_total",
            "Failed calls by error kind.",
            ("kind",),
        )
        for kind, count in sorted(m.get("errors_by_kind", {}).items()):
            self._add(errors, (kind,), count)
        yield errors
        yield self._counter(
            "chresilient_retry_attempts_total",
            "Retries (attempts after the first).",
            m["retry_attempts"],
        )
        yield self._counter(
            "chresilient_failovers_total",
            "Retries sent to another host than the attempt that failed.",
            m.get("failovers_total", 0),
        )
        yield self._counter(
            "chresilient_retry_budget_exhausted_total",
            "Retries refused because the retry budget was spent.",
            m.get("retry_budget_exhausted", 0),
        )
        durations = m["query_duration_seconds"]
        buckets, total = durations["buckets"], durations["sum"]
        histogram = self._family(
            HistogramMetricFamily,
            "chresilient_query_duration_seconds",
            "Call duration including retries and backoff (to the first row for streams).",
        )
        histogram.add_metric(
            list(self._const.values()),
            [("+Inf" if b == float("inf") else repr(b), c) for b, c in buckets],
            total,
        )
        yield histogram
        for key in ("inserts_total", "rows_inserted"):
            if key in m:
                name = key if key.endswith("_total") else f"{key}_total"
                yield self._counter(f"chresilient_{name}", f"{key} counter.", m[key])
        for key, text in SPOOL_COUNTERS.items():
            yield self._counter(f"chresilient_{key}_total", text, m.get(key, 0) or 0)
        for key, text in SPOOL_GAUGES.items():
            yield self._gauge(f"chresilient_spool_{key}", text, m.get(key, 0) or 0)
        yield self._gauge(
            "chresilient_spool_usable",
            "1 while the spool can be written; 0 when its disk is full or it is unwritable.",
            1 if m.get("spool_state", "ok") == "ok" else 0,
        )
        state = self._family(
            GaugeMetricFamily,
            "chresilient_connection_state",
            "1 for the manager's current connection state.",
            ("state",),
        )
        for name in CONNECTION_STATES:
            self._add(state, (name,), 1.0 if m["connection_state"] == name else 0.0)
        yield state
        last = m.get("last_success_timestamp")
        if last is not None:
            yield self._gauge(
                "chresilient_last_success_timestamp_seconds",
                "Unix time of the last successful call or probe.",
                last,
            )

    def _host_metrics(self, m: dict[str, Any]) -> Iterator[Metric]:
        breaker = self._family(
            GaugeMetricFamily,
            "chresilient_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ("host",),
        )
        opens = self._family(
            CounterMetricFamily,
            "chresilient_circuit_breaker_opens_total",
            "Transitions into the open state.",
            ("host",),
        )
        pool = self._family(
            GaugeMetricFamily,
            "chresilient_pool_connections",
            "Open pooled connections by state (the states partition them).",
            ("host", "state"),
        )
        overflow = self._family(
            GaugeMetricFamily,
            "chresilient_pool_overflow_connections",
            "Open connections beyond pool_size (also counted in chresilient_pool_connections).",
            ("host",),
        )
        checkouts = self._family(
            CounterMetricFamily,
            "chresilient_pool_checkouts_total",
            "Checkouts: hit reused a pooled connection, miss made a new one.",
            ("host", "result"),
        )
        connects = self._family(
            CounterMetricFamily,
            "chresilient_connection_attempts_total",
            "Connection attempts by outcome.",
            ("host", "outcome"),
        )
        discarded = self._family(
            CounterMetricFamily,
            "chresilient_pool_discarded_total",
            "Connections discarded: invalidated after an error or pruned while idle.",
            ("host", "reason"),
        )
        queries = self._family(
            CounterMetricFamily,
            "chresilient_host_queries_total",
            "Attempts sent to the host (each attempt of a retried call counts).",
            ("host",),
        )
        query_errors = self._family(
            CounterMetricFamily,
            "chresilient_host_query_errors_total",
            "Attempts on the host that failed.",
            ("host",),
        )
        delay = self._family(
            GaugeMetricFamily,
            "chresilient_replica_delay_seconds",
            "Largest system.replicas absolute_delay the monitor last read on the host.",
            ("host",),
        )
        lagging = self._family(
            GaugeMetricFamily,
            "chresilient_replica_lagging",
            "1 while the host's replica delay exceeds max_replica_delay (used last).",
            ("host",),
        )
        for label, host in m["hosts"].items():
            self._add(queries, (label,), host["queries_total"])
            self._add(query_errors, (label,), host["errors_total"])
            if host["replica_delay"] is not None:
                self._add(delay, (label,), host["replica_delay"])
            self._add(lagging, (label,), 1.0 if host["lagging"] else 0.0)
            self._add(breaker, (label,), BREAKER_STATES.get(host["circuit_breaker_state"], 2))
            self._add(opens, (label,), host["circuit_breaker_opens"])
            for state in ("checked_out", "idle"):
                self._add(pool, (label, state), host[state])
            self._add(overflow, (label,), host["overflow"])
            self._add(checkouts, (label, "hit"), host["pool_hits"])
            self._add(checkouts, (label, "miss"), host["pool_misses"])
            self._add(connects, (label, "success"), host["pool_connects"])
            self._add(connects, (label, "failure"), host["pool_connect_failures"])
            self._add(discarded, (label, "invalidated"), host["pool_invalidations"])
            self._add(discarded, (label, "pruned"), host["pool_pruned"])
        yield from (breaker, opens, pool, overflow, checkouts, connects, discarded)
        yield from (queries, query_errors, delay, lagging)

    def _health_metrics(self, m: dict[str, Any]) -> Iterator[Metric]:
        yield self._counter(
            "chresilient_health_probes_total",
            "Health monitor probes sent.",
            m["health_probes_total"],
        )
        yield self._counter(
            "chresilient_health_probe_failures_total",
            "Health monitor probes that failed.",
            m["health_probe_failures_total"],
        )
        probed = {label: h for label, h in m["hosts"].items() if "probe_ok" in h}
        if not probed:
            return
        up = self._family(
            GaugeMetricFamily,
            "chresilient_health_probe_up",
            "1 if the latest probe of the host succeeded.",
            ("host",),
        )
        latency = self._family(
            GaugeMetricFamily,
            "chresilient_health_probe_duration_seconds",
            "Duration of the latest probe.",
            ("host",),
        )
        for label, host in probed.items():
            self._add(up, (label,), 1.0 if host["probe_ok"] else 0.0)
            if host.get("probe_latency_ms") is not None:
                self._add(latency, (label,), host["probe_latency_ms"] / 1000)
        yield from (up, latency)


def multiprocess_dir() -> str | None:
    """The prometheus_client multiprocess directory, if that mode is on."""
    for name in MULTIPROC_ENV:
        value = os.environ.get(name)
        if value:
            return value
    return None


def exposition(source: MetricsSource) -> tuple[bytes, str]:
    """The text format body and its content type (see the module docstring)."""
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path is not None:
        SettledFilesCollector(registry, path)
        metrics = source.metrics()
        process_totals().publish(metrics)  # so the sums include this worker's latest
        registry.register(ManagerCollector(_Fixed(metrics), {"pid": str(os.getpid())}))
    else:
        registry.register(ManagerCollector(source))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Fixed:
    """A source that answers with metrics already read (one read per scrape)."""

    def __init__(self, metrics: dict[str, Any]) -> None:
        self._metrics = metrics

    def metrics(self) -> dict[str, Any]:
        return self._metrics


def register_collector(
    source: MetricsSource, registry: CollectorRegistry = REGISTRY
) -> ManagerCollector:
    """Add the manager's metrics to an existing registry (the default one if not given)."""
    collector = ManagerCollector(source)
    registry.register(collector)
    return collector
