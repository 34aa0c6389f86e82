"""``mgr.metrics()``: one dict of counters and gauges, built from snapshots.

Everything Prometheus exposes is in this dict too, so the collector is a pure function of
it and a JSON scrape and a Prometheus scrape never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..hosts import HostSnapshot
from ..metrics import Metrics, utc_iso
from ..state import ConnectionState

Report = dict[str, Any]


def metrics_snapshot(
    *,
    registry: Metrics,
    hosts: Sequence[HostSnapshot],
    state: ConnectionState,
    consecutive_failures: int,
    last_success_wall: float | None,
    budget: Report,
    spool_pending: Report,
    monitor: Report,
    probe: Report | None,
) -> Report:
    """The metrics dict (keys: design.md, plus per-host detail and the probe)."""
    out: Report = registry.counters()
    counters = [h.pool_counters for h in hosts]
    buckets, total, count = registry.durations()
    out.update(
        connection_attempts=sum(c["connect_attempts"] for c in counters),
        successful_connections=sum(c["connects"] for c in counters),
        failed_connections=sum(c["connect_failures"] for c in counters),
        pool_hits=sum(c["hits"] for c in counters),
        pool_misses=sum(c["misses"] for c in counters),
        pool_invalidations=sum(c["invalidations"] for c in counters),
        circuit_breaker_opens=sum(h.breaker["opens_total"] for h in hosts),
        circuit_breaker_state=hosts[0].breaker["state"],
        connection_state=state.value,
        consecutive_failures=consecutive_failures,
        last_successful_connection=utc_iso(last_success_wall),
        last_success_timestamp=last_success_wall,
        checked_out=sum(h.pool["checked_out"] for h in hosts),
        idle=sum(h.pool["idle"] for h in hosts),
        overflow=sum(h.pool["overflow"] for h in hosts),
        **budget,
        **spool_pending,
        query_duration_seconds={"buckets": buckets, "sum": total, "count": count},
        health_probes_total=monitor["probes_total"],
        health_probe_failures_total=monitor["probe_failures_total"],
        hosts={h.label: _host(h, probe) for h in hosts},
    )
    return out


def _host(host: HostSnapshot, probe: Report | None) -> Report:
    out: Report = {
        **host.traffic(),
        "circuit_breaker_opens": host.breaker["opens_total"],
        **{f"pool_{key}": value for key, value in host.pool_counters.items()},
    }
    result = None if probe is None else probe["hosts"].get(host.label)
    if result is not None:
        out["probe_ok"] = bool(result["ok"])
        out["probe_latency_ms"] = result.get("latency_ms")
    return out
