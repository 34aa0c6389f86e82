"""``health()`` and the connection report, built from a snapshot of the manager.

Nothing here talks to ClickHouse or holds the manager: the manager gathers a
:class:`HealthInputs` (the monitor's latest probe round, refreshed first when stale and
shared by concurrent callers; host snapshots; cached check reports) and these functions
turn it into the documented shape (docs/health.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..hosts import HostSnapshot
from ..metrics import utc_iso
from ..state import ConnectionState
from .common import Report, ReportCache


@dataclass(frozen=True)
class CheckSummary:
    """The latest report of a cached check and its age."""

    latest: Report | None
    age: float | None

    @classmethod
    def of(cls, cache: ReportCache) -> CheckSummary:
        age = cache.age()
        return cls(cache.latest, None if age is None else round(age, 1))


@dataclass(frozen=True)
class HealthInputs:
    """Everything ``health()`` reports, read once."""

    closed: bool
    state: ConnectionState
    target: str
    hosts: Sequence[HostSnapshot]
    probe: Report | None
    monitor: Report
    dependencies: CheckSummary
    consistency: CheckSummary
    analytics_configured: bool
    max_replica_delay: float | None
    spool: Report | None


def build_health(inputs: HealthInputs) -> Report:
    """The health summary; see docs/health.md for the shape."""
    consistency = analytics_summary(inputs.consistency, inputs.analytics_configured)
    status, reasons = _status(inputs, consistency)
    report: Report = {
        "status": status,
        "timestamp": utc_iso(time.time()),
        "connection_state": inputs.state.value,
        "target": inputs.target,
        "reasons": reasons,
        "probe": inputs.probe,
        "server": {h.label: h.server_section() for h in inputs.hosts},
        "dependency_validation": dependency_summary(inputs.dependencies),
        "analytics_consistency": consistency,
        "breaker": {h.label: h.breaker for h in inputs.hosts},
        "pool": {h.label: pool_section(h) for h in inputs.hosts},
        "hosts": {h.label: h.traffic() for h in inputs.hosts},
        "monitor": inputs.monitor,
    }
    if inputs.spool is not None:
        report["spool"] = inputs.spool
    return report


def _status(inputs: HealthInputs, consistency: Report) -> tuple[str, list[str]]:
    if inputs.closed:
        return "unhealthy", ["the manager is closed"]
    reasons: list[str] = []
    probes = (inputs.probe or {}).get("hosts", {})
    for label, result in probes.items():
        if not result["ok"]:
            reasons.append(f"{label}: probe failed: {result['error']}")
        elif result.get("read_only_tables"):
            tables = result["read_only_tables"]
            reasons.append(
                f"{label}: {len(tables)} replicated tables cannot take writes (ZooKeeper away "
                f"or its session expired): {', '.join(tables[:5])}"
            )
    states = {h.label: h.breaker["state"] for h in inputs.hosts}
    for label, breaker_state in states.items():
        if breaker_state != "closed":
            reasons.append(f"{label}: circuit breaker {breaker_state}")
    state = inputs.state
    down = bool(probes) and not any(r["ok"] for r in probes.values())
    never_reached = state is ConnectionState.CONNECTING and not any(
        r["ok"] for r in probes.values()
    )
    if (
        state is ConnectionState.UNHEALTHY
        or down
        or never_reached
        or all(s == "open" for s in states.values())
    ):
        return "unhealthy", reasons or [f"connection_state is {state.value}"]
    if state is not ConnectionState.HEALTHY:
        reasons.append(f"connection_state is {state.value}")
    for host in inputs.hosts:
        if host.lagging:
            reasons.append(
                f"{host.label}: replica delay {host.replica_delay:.0f}s over "
                f"max_replica_delay ({inputs.max_replica_delay:.0f}s)"
            )
    spool = inputs.spool or {}
    pending = _pending(spool)
    if pending:
        reasons.append(f"spool holds {pending} rows waiting for delivery")
    if spool.get("state", "ok") != "ok":
        reasons.append(f"spool: {spool['state']}")
    if spool.get("failed_batches"):
        reasons.append(
            f"spool: {spool['failed_batches']} batches ({spool.get('failed_rows', 0)} rows) "
            "set aside for the operator"
        )
    if consistency.get("overall_consistent") is False:
        reasons.append("analytics consistency: " + "; ".join(consistency["problems"][:5]))
    return ("degraded" if reasons else "healthy"), reasons


def _pending(spool: Report) -> int:
    for key in ("pending_rows", "pending_batches"):
        value = spool.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def pool_section(host: HostSnapshot) -> Report:
    """Pool gauges and the counters behind them."""
    counters = host.pool_counters
    return {
        **host.pool,
        **{
            key: counters[key]
            for key in ("connects", "connect_failures", "hits", "misses", "invalidations", "pruned")
        },
    }


def dependency_summary(summary: CheckSummary) -> Report:
    report = summary.latest
    if report is None:
        return {"overall_status": "not_run", "checked_at": None}
    return {
        "overall_status": report["overall_status"],
        "checked_at": report["checked_at"],
        "age_seconds": summary.age,
        "failed_checks": report["failed_checks"],
        "recommendations": report["recommendations"],
    }


def analytics_summary(summary: CheckSummary, configured: bool) -> Report:
    report = summary.latest
    if report is None:
        note = "not checked yet" if configured else "no analytics tables configured"
        return {"overall_consistent": None, "checked_at": None, "note": note}
    return {
        "overall_consistent": report["overall_consistent"],
        "checked_at": report["checked_at"],
        "age_seconds": summary.age,
        "tables_checked": len(report["tables"]),
        "write_probe": report["write_probe"]["status"],
        "problems": report["problems"],
    }


def connection_report(health: Report) -> Report:
    """Per-host detail for ``/health/clickhouse/connection``, from a health report."""
    probe = health["probe"] or {}
    return {
        "status": health["status"],
        "connection_state": health["connection_state"],
        "target": health["target"],
        "checked_at": probe.get("checked_at"),
        "hosts": {
            label: {
                "probe": probe.get("hosts", {}).get(label),
                "breaker": health["breaker"][label],
                "pool": health["pool"][label],
                "server": health["server"][label],
                "traffic": traffic,
            }
            for label, traffic in health["hosts"].items()
        },
    }
