"""The health monitor: one daemon thread per manager.

Every ``health_check_interval`` it sends ``SELECT 1`` over a pooled connection of each
host under a short timeout. Outcomes go to the breaker as out-of-band probes
(``record_probe``), never as application failures: while a breaker is open the monitor is
its half-open trial, so application calls keep failing fast until the monitor has seen the
server answer. It reports each round to the connection status (which publishes recovery
to whoever listens, e.g. the spool replayer), prunes idle connections past their recycle
time and refreshes the analytics consistency report on a slower cadence. With
``max_replica_delay`` set, each successful probe also reads the host's replication delay,
so calls avoid a lagging replica.

It takes the hosts, the connection status and the events, never the manager: it wakes
when a breaker opens because it listens for :attr:`Event.BREAKER_OPENED`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import Any, Callable

import structlog
from clickhouse_driver import Client

from .. import fork
from ..config import Config
from ..config_values import AnalyticsTable
from ..connection import PooledConnection
from ..errors import ErrorKind, classify, describe
from ..events import Event, Events
from ..hosts import HostState
from ..metrics import utc_iso
from ..server import ReplicaStatus, read_replicas, replica_delay
from ..state import ConnectionState, ConnectionStatus
from .common import Cancellation, Report, ReportCache, elapsed_ms
from .consistency import check_consistency
from .dependencies import validate_dependencies

log = structlog.get_logger("chresilient.health")

# How long a caller waits for a report beyond the checks' own timeouts.
SLACK = 1.0
# Probe backoff while a breaker is not closed: the first wait, doubled up to the last.
OPEN_PROBE_FIRST = 0.5
OPEN_PROBE_MAX = 2.0


class HealthMonitor:
    """Probes, state reports, pruning and the cached health reports of one manager."""

    def __init__(
        self,
        cfg: Config,
        hosts: Sequence[HostState],
        status: ConnectionStatus,
        events: Events,
        closed: Callable[[], bool],
        tables: Callable[[], Sequence[AnalyticsTable]] | None = None,
    ) -> None:
        self._cfg = cfg
        # The tables the consistency check expects: configured ones, and the schema's.
        self.tables = tables or (lambda: cfg.analytics_tables)
        self._hosts = hosts
        self._status = status
        self._closed = closed
        self._events = events
        self.interval = cfg.pool.health_check_interval
        self.probe_timeout = min(cfg.health_probe_timeout, cfg.retry.timeout_per_attempt)
        self.consistency_interval = cfg.consistency_check_interval
        self._cancel = Cancellation()  # ends a dependency check stuck on a socket at stop()
        self.probe = ReportCache(self._probe_all, "chresilient-probe")
        self.consistency = ReportCache(
            lambda: check_consistency(cfg, hosts, closed, self.tables()),
            "chresilient-consistency",
        )
        self.dependencies = ReportCache(
            lambda: validate_dependencies(cfg, self._cancel), "chresilient-dependencies"
        )
        self.probes_total = 0
        self.probe_failures_total = 0
        self.pruned_total = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: PooledConnection | None = None
        self.max_replica_delay = cfg.max_replica_delay
        # What system.replicas says of the host's replicated tables.
        self.replica_source: Callable[[Client], list[ReplicaStatus]] = read_replicas
        self._delay_unreadable: set[str] = set()
        self._open_backoff = OPEN_PROBE_FIRST
        # From now on it probes for recovery, so application calls need not.
        events.listen(Event.BREAKER_OPENED, lambda host, **_: self.wake())
        fork.register(self)

    # -- BackgroundService --------------------------------------------------------------
    def start(self) -> None:
        thread = self._thread
        if (thread is not None and thread.is_alive()) or self._stopping.is_set():
            return  # (a thread inherited through fork() is not alive: start a new one)
        self._thread = threading.Thread(target=self._run, name="chresilient-health", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop the thread and the checks it started; a probe stuck on a frozen server
        has its socket shut down."""
        self._stopping.set()
        self._wake.set()
        self._cancel.cancel()
        conn = self._inflight
        sock = None if conn is None else conn.connection.socket
        if sock is not None:
            with suppress(OSError):  # wakes a recv() blocked on a frozen server
                sock.shutdown(socket.SHUT_RDWR)
        ends = time.monotonic() + timeout
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("health_monitor_still_running", waited=timeout)
        for cache in (self.probe, self.consistency, self.dependencies):
            cache.join(ends - time.monotonic())

    def after_fork_in_child(self) -> None:
        """The parent's thread and checks do not exist here; start() starts new ones."""
        fork.reinit_event(self._wake)
        fork.reinit_event(self._stopping)
        self._cancel.after_fork_in_child()
        self._thread = None
        self._inflight = None  # (the caches' single flights repair themselves)

    @property
    def probing(self) -> bool:
        """A probe is waiting on a server right now."""
        return self._inflight is not None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Probe now instead of at the end of the interval."""
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------
    def _run(self) -> None:
        delay = 0.0 if self._status.state is not ConnectionState.HEALTHY else self.interval
        while not self._stopping.is_set():
            if self._wake.wait(delay):
                self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.tick()
            except Exception as exc:  # never let one bad round end the monitor
                log.warning("health_monitor_round_failed", error=describe(exc))
            delay = self._next_delay()

    def _next_delay(self) -> float:
        """The interval; while a breaker is not closed or the state is not healthy (the last
        probes failed, or nothing answered yet), a short backoff instead.

        A probe is one cheap query (a refused connect while the server is down), so while
        a breaker is open the monitor probes from OPEN_PROBE_FIRST doubling up to
        OPEN_PROBE_MAX: ClickHouse is seen back within about OPEN_PROBE_MAX of answering,
        instead of the application waiting out ``recovery_timeout``, and a server that
        stays down gets one connect every couple of seconds.
        """
        healthy = self._status.state is ConnectionState.HEALTHY
        if healthy and all(h.breaker.closed for h in self._hosts):
            self._open_backoff = OPEN_PROBE_FIRST
            return self.interval
        # Below half the recovery timeout, so probes (which restart an open breaker's
        # timer when they fail) keep application calls from becoming trials.
        limit = min(OPEN_PROBE_MAX, self._cfg.breaker.recovery_timeout / 2, self.interval)
        delay = min(self._open_backoff, limit)
        self._open_backoff = min(delay * 2, limit)
        return delay

    def tick(self) -> None:
        """One round: probe every host, prune, maybe check analytics consistency."""
        future = self.probe.submit()
        deadline = time.monotonic() + self.probe_wait()
        while not future.done():  # wait for the probes, but let stop() end the wait
            if self._stopping.wait(0.02) or time.monotonic() > deadline:
                return
        report = future.result()
        self._events.fire(Event.PROBED, state=report["state"])
        for host in self._hosts:
            pruned = host.pool.prune()
            if pruned:
                self.pruned_total += pruned
                log.info("pool_pruned", host=host.label, connections=pruned)
        if self._consistency_due(report):
            self.consistency.submit()  # runs in its own thread: never delays a probe

    def probe_wait(self) -> float:
        """How long a caller may wait for one round of probes."""
        return self.probe_timeout * len(self._hosts) + SLACK

    def report_wait(self) -> float:
        """How long a caller may wait for dependency or consistency checks."""
        return self.probe_timeout * (6 * len(self._hosts) + 2) + SLACK

    def probe_max_age(self) -> float:
        """How old a probe report may be before health() asks for a new one."""
        if self.running:
            return 2 * self.interval + self.probe_timeout
        return min(self.interval, 5.0)

    def current_probe(self) -> Report | None:
        """The latest probe round, refreshed first when it is stale (shared by callers)."""
        if self._closed():
            return self.probe.latest
        try:
            return self.probe.get(self.probe_max_age(), self.probe_wait())
        except TimeoutError:
            return self.probe.latest

    def snapshot(self) -> Report:
        """Counters and settings for health() and metrics()."""
        return {
            "running": self.running,
            "interval_seconds": self.interval,
            "probe_timeout_seconds": self.probe_timeout,
            "probes_total": self.probes_total,
            "probe_failures_total": self.probe_failures_total,
            "pruned_total": self.pruned_total,
        }

    def _consistency_due(self, probe: Report) -> bool:
        if not self.tables() or self.consistency.running:
            return False
        if not any(result["ok"] for result in probe["hosts"].values()):
            return False
        age = self.consistency.age()
        return age is None or age >= self.consistency_interval

    # -- probing ------------------------------------------------------------------------
    def _probe_all(self) -> Report:
        started = time.perf_counter()
        previous = self.probe.latest
        results: dict[str, dict[str, Any]] = {}
        for host in self._hosts:
            if self._closed():
                break
            before = None if previous is None else previous["hosts"].get(host.label)
            results[host.label] = self._probe_host(host, before)
        state = self._verdict(results)
        if self._closed():
            state = ConnectionState.CLOSED
        else:
            errors = {label: r["error"] for label, r in results.items() if not r["ok"]}
            if errors and state is not self._status.state:
                log.warning("clickhouse_probes_failed", state=state.value, errors=errors)
            self._status.probed(state)
        return {
            "checked_at": utc_iso(time.time()),
            "duration_ms": elapsed_ms(started),
            "state": state.value,
            "hosts": results,
        }

    def _probe_host(self, host: HostState, before: dict[str, Any] | None) -> dict[str, Any]:
        gauges = host.pool.status()
        if gauges["checked_out"] >= gauges["max_connections"]:
            # Checking out would wait for the pool's timeout; the traffic says enough.
            ok = True if before is None else bool(before["ok"])
            return {"ok": ok, "latency_ms": None, "error": None, "skipped": "pool busy"}
        started = time.perf_counter()
        self.probes_total += 1
        try:
            with host.pool.connection(self.probe_timeout) as conn:
                self._inflight = conn
                conn.client.execute("SELECT 1")
                latency = elapsed_ms(started)
                delay, read_only = self._replicas(host, conn)
        except Exception as exc:
            self.probe_failures_total += 1
            host.breaker.record_probe(False, exc)
            return {
                "ok": False,
                "latency_ms": elapsed_ms(started),
                "error": describe(exc),
                "error_kind": classify(exc).value,
            }
        finally:
            self._inflight = None
        host.breaker.record_probe(True)
        self._status.answered()
        return {
            "ok": True,
            "latency_ms": latency,
            "error": None,
            "replica_delay": delay,
            "read_only_tables": read_only,
        }

    def _replicas(
        self, host: HostState, conn: PooledConnection
    ) -> tuple[float | None, list[str]]:
        """Read and record the host's replica delay, and the replicated tables that cannot
        take writes (ZooKeeper away, session expired); a failed read only forgets them."""
        if self.max_replica_delay is None:
            return None, []
        read_only: list[str] = []
        try:
            replicas = self.replica_source(conn.client)
            delay: float | None = replica_delay(replicas)
            read_only = [r.table for r in replicas if r.readonly or r.session_expired]
            self._delay_unreadable.discard(host.label)
        except Exception as exc:
            if classify(exc) is ErrorKind.TRANSPORT:
                conn.connection.disconnect()  # the pool replaces it at the next checkout
            if host.label not in self._delay_unreadable:  # once per streak, not per round
                self._delay_unreadable.add(host.label)
                log.warning("replica_delay_unreadable", host=host.label, error=describe(exc))
            delay = None
        if host.set_replica_delay(delay, self.max_replica_delay):
            (log.warning if host.lagging else log.info)(
                "replica_lagging" if host.lagging else "replica_caught_up",
                host=host.label,
                replica_delay=delay,
                max_replica_delay=self.max_replica_delay,
            )
        return delay, read_only

    def _verdict(self, results: dict[str, dict[str, Any]]) -> ConnectionState:
        """The connection state a round of probes shows."""
        oks = [r["ok"] for r in results.values()]
        if oks and all(oks):
            closed = all(h.breaker.closed for h in self._hosts)
            return ConnectionState.HEALTHY if closed else ConnectionState.DEGRADED
        return ConnectionState.DEGRADED if any(oks) else ConnectionState.UNHEALTHY
