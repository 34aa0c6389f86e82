"""``health()`` and the connection report, built from cached state.

Nothing here talks to ClickHouse except through the monitor's probe cache: when the
latest probe is too old (the monitor is not running), one probe round is run and shared by
every concurrent caller, so a health request opens at most one connection per host.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..breaker import CircuitState
from ..errors import describe
from ..metrics import utc_iso
from ..pool import DEDUP_SETTING, insert_delivery
from .common import Report, ReportCache

if TYPE_CHECKING:
    from ..manager import ClickHouseConnectionManager, HostState


def probe_report(mgr: ClickHouseConnectionManager) -> Report | None:
    """The latest probe round, refreshed first when it is stale."""
    monitor = mgr.monitor
    if mgr.closed:
        return monitor.probe.latest
    try:
        return monitor.probe.get(monitor.probe_max_age(), monitor.probe_wait())
    except TimeoutError:
        return monitor.probe.latest


def build_health(mgr: ClickHouseConnectionManager) -> Report:
    """The health summary; see docs/health.md for the shape."""
    probe = probe_report(mgr)
    spool = spool_section(mgr)
    consistency = analytics_summary(mgr)
    status, reasons = _status(mgr, probe, spool, consistency)
    report: Report = {
        "status": status,
        "timestamp": utc_iso(time.time()),
        "connection_state": mgr.connection_state,
        "target": mgr.config.safe_url(),
        "reasons": reasons,
        "probe": probe,
        "server": server_section(mgr),
        "dependency_validation": dependency_summary(mgr.monitor.dependencies),
        "analytics_consistency": consistency,
        "breaker": {h.label: h.breaker.snapshot() for h in mgr.hosts},
        "pool": {h.label: pool_section(h) for h in mgr.hosts},
        "hosts": {h.label: h.report() for h in mgr.hosts},
        "monitor": monitor_section(mgr),
    }
    if spool is not None:
        report["spool"] = spool
    return report


def _status(
    mgr: ClickHouseConnectionManager,
    probe: Report | None,
    spool: Report | None,
    consistency: Report,
) -> tuple[str, list[str]]:
    if mgr.closed:
        return "unhealthy", ["the manager is closed"]
    reasons: list[str] = []
    for label, result in (probe or {}).get("hosts", {}).items():
        if not result["ok"]:
            reasons.append(f"{label}: probe failed: {result['error']}")
    states = {h.label: h.breaker.state for h in mgr.hosts}
    for label, breaker_state in states.items():
        if breaker_state is not CircuitState.CLOSED:
            reasons.append(f"{label}: circuit breaker {breaker_state.value}")
    state = mgr.connection_state
    probes = (probe or {}).get("hosts", {})
    down = bool(probes) and not any(r["ok"] for r in probes.values())
    never_reached = state == "connecting" and not any(r["ok"] for r in probes.values())
    if (
        state == "unhealthy"
        or down
        or never_reached
        or all(s is CircuitState.OPEN for s in states.values())
    ):
        return "unhealthy", reasons or [f"connection_state is {state}"]
    if state != "healthy":
        reasons.append(f"connection_state is {state}")
    for host in mgr.hosts:
        if host.lagging:
            reasons.append(
                f"{host.label}: replica delay {host.replica_delay:.0f}s over "
                f"max_replica_delay ({mgr.config.max_replica_delay:.0f}s)"
            )
    pending = 0 if spool is None else _pending(spool)
    if pending:
        reasons.append(f"spool holds {pending} rows waiting for delivery")
    if consistency.get("overall_consistent") is False:
        reasons.append("analytics consistency: " + "; ".join(consistency["problems"][:5]))
    return ("degraded" if reasons else "healthy"), reasons


def _pending(spool: Report) -> int:
    for key in ("pending_rows", "pending_batches"):
        value = spool.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def spool_section(mgr: ClickHouseConnectionManager) -> Report | None:
    """``mgr.spool_health()`` when this manager has a spool."""
    spool_health = getattr(mgr, "spool_health", None)
    if not callable(spool_health):
        return None
    try:
        section = spool_health()
    except Exception as exc:
        return {"error": describe(exc)}
    return dict(section) if isinstance(section, dict) else {"value": section}


def server_section(mgr: ClickHouseConnectionManager) -> Report:
    """What each host said about itself when the pool last connected."""
    out: Report = {}
    for host in mgr.hosts:
        info = host.pool.server_info
        if info is None:
            out[host.label] = None
            continue
        dedup = bool(host.pool.features.get(DEDUP_SETTING, False))
        out[host.label] = {
            "version": info.version_string,
            "revision": info.revision,
            "timezone": info.timezone,
            "insert_deduplication": dedup,
            "insert_delivery": insert_delivery(dedup),
        }
    return out


def pool_section(host: HostState) -> Report:
    """Pool gauges and the counters behind them."""
    stats = host.pool.stats
    return {
        **host.pool.status(),
        "connects": stats.connects,
        "connect_failures": stats.connect_failures,
        "hits": stats.hits,
        "misses": stats.misses,
        "invalidations": stats.invalidations,
        "pruned": stats.pruned,
    }


def monitor_section(mgr: ClickHouseConnectionManager) -> Report:
    monitor = mgr.monitor
    return {
        "running": monitor.running,
        "interval_seconds": monitor.interval,
        "probe_timeout_seconds": monitor.probe_timeout,
        "probes_total": monitor.probes_total,
        "probe_failures_total": monitor.probe_failures_total,
        "pruned_total": monitor.pruned_total,
    }


def _age(cache: ReportCache) -> float | None:
    age = cache.age()
    return None if age is None else round(age, 1)


def dependency_summary(cache: ReportCache) -> Report:
    report = cache.latest
    if report is None:
        return {"overall_status": "not_run", "checked_at": None}
    return {
        "overall_status": report["overall_status"],
        "checked_at": report["checked_at"],
        "age_seconds": _age(cache),
        "failed_checks": report["failed_checks"],
        "recommendations": report["recommendations"],
    }


def analytics_summary(mgr: ClickHouseConnectionManager) -> Report:
    cache = mgr.monitor.consistency
    report = cache.latest
    if report is None:
        configured = bool(mgr.config.analytics_tables)
        note = "not checked yet" if configured else "no analytics tables configured"
        return {"overall_consistent": None, "checked_at": None, "note": note}
    return {
        "overall_consistent": report["overall_consistent"],
        "checked_at": report["checked_at"],
        "age_seconds": _age(cache),
        "tables_checked": len(report["tables"]),
        "write_probe": report["write_probe"]["status"],
        "problems": report["problems"],
    }


def connection_report(mgr: ClickHouseConnectionManager) -> Report:
    """Per-host detail for ``/health/clickhouse/connection``."""
    health = build_health(mgr)
    probe, servers = health["probe"] or {}, health["server"]
    return {
        "status": health["status"],
        "connection_state": mgr.connection_state,
        "target": mgr.config.safe_url(),
        "checked_at": probe.get("checked_at"),
        "hosts": {
            h.label: {
                "probe": probe.get("hosts", {}).get(h.label),
                "breaker": h.breaker.snapshot(),
                "pool": pool_section(h),
                "server": servers[h.label],
                "traffic": h.report(),
            }
            for h in mgr.hosts
        },
    }
