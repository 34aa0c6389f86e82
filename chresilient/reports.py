"""``metrics()`` and ``health()`` of one manager, gathered from narrow parts.

The manager hands this object the parts it reports on (the executor's hosts, status and
counters, the monitor, the spool); it reads each once per report and passes snapshots on to
:mod:`chresilient.health.status` and :mod:`chresilient.observability.snapshot`.
"""

from __future__ import annotations

from typing import Any, Callable

from .config import Config
from .errors import describe
from .executor import Executor
from .health.monitor import HealthMonitor
from .health.status import CheckSummary, HealthInputs, build_health
from .observability.snapshot import metrics_snapshot
from .spool import Spool

Report = dict[str, Any]


class Reports:
    """Builds the metrics and health reports (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        executor: Executor,
        monitor: HealthMonitor,
        spool: Spool | None,
        delivery: Callable[[], dict[str, str]] = dict,
    ) -> None:
        self._config = config
        self._delivery = delivery  # per table: exactly_once, at_least_once, ...
        self._hosts = executor.hosts
        self._status = executor.status
        self._registry = executor.metrics
        self._budget = executor.budget
        self._closed = executor.closing
        self._monitor = monitor
        self._spool = spool

    def metrics(self) -> Report:
        return metrics_snapshot(
            registry=self._registry,
            hosts=[h.snapshot() for h in self._hosts],
            state=self._status.state,
            consecutive_failures=self._status.consecutive_failures,
            last_success_wall=self._status.last_success_wall,
            budget={
                "retry_budget_tokens": round(self._budget.tokens, 2),
                "retry_budget_exhausted": self._budget.exhausted_total,
            },
            spool_pending=(
                self._spool.gauges()
                if self._spool is not None
                else dict.fromkeys(("pending_batches", "pending_rows", "pending_bytes"), 0)
            ),
            monitor=self._monitor.snapshot(),
            probe=self._monitor.probe.latest,
        )

    def spool_health(self) -> Report:
        if self._spool is None:
            return {"enabled": False, "delivery_guarantee": "none"}
        return {"enabled": True, **self._spool.health(), "delivery_by_table": self._delivery()}

    def health(self) -> Report:
        probe = self._monitor.current_probe()
        try:
            spool = self.spool_health()
        except Exception as exc:  # a broken spool is reported, never a failed health check
            spool = {"error": describe(exc)}
        return build_health(
            HealthInputs(
                closed=self._closed(),
                state=self._status.state,
                target=self._config.safe_url(),
                hosts=[h.snapshot() for h in self._hosts],
                probe=probe,
                monitor=self._monitor.snapshot(),
                dependencies=CheckSummary.of(self._monitor.dependencies),
                consistency=CheckSummary.of(self._monitor.consistency),
                analytics_configured=bool(self._monitor.tables()),
                max_replica_delay=self._config.max_replica_delay,
                spool=spool,
            )
        )
