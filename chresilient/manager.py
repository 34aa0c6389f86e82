"""``ClickHouseConnectionManager``: the facade. Lifecycle, fork repair and delegation.

It wires the core (hosts, executor, connection status, events) to the services (health
monitor, spool, insert path, reports) and hands each its narrow part; the services never
see the manager. One manager per process (per gunicorn worker).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, TypeVar

import structlog

from . import fork
from .config import Config
from .delivery import DeliveryGuarantees
from .errors import ClickHouseUnavailableError, ClientClosedError, StartupTimeoutError
from .events import Event, Events
from .executor import Executor
from .health.monitor import HealthMonitor
from .health.status import connection_report
from .hosts import HostState, all_support, build_hosts
from .ingest import Inserter, InsertResult, InsertTotals
from .metrics import Metrics
from .observability.multiprocess import process_totals
from .observability.prometheus import multiprocess_dir
from .reports import Reports
from .retry import Deadline
from .schema import Schema, SchemaKeeper
from .spool import Spool
from .spool_setup import open_spool
from .startup import BackgroundService, StartupGate
from .state import ConnectionState, ConnectionStatus
from .statement import DEDUP_SETTING, Statement, TableName

T = TypeVar("T")
log = structlog.get_logger("chresilient")

# close() gives background threads this long, all together, to stop.
SERVICE_STOP_TIMEOUT = 1.0


class ClickHouseConnectionManager:
    """A resilient, pooled ClickHouse client for one process."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = cfg = config if config is not None else Config.from_env()
        self.events = Events()
        self.status = ConnectionStatus(self.events)
        self.metrics_registry = Metrics()
        self.hosts: list[HostState] = build_hosts(cfg, self.status, self.events)
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._forked = False  # set in a forked child: services restart on first use
        self.started = False
        self.executor = Executor(
            self.hosts,
            cfg,
            metrics=self.metrics_registry,
            status=self.status,
            events=self.events,
            closing=self._closing,
        )
        self.policy, self.budget = self.executor.policy, self.executor.budget
        self.gate = StartupGate(
            self.hosts, cfg, self.status, self._closing, self.policy.timeout_per_attempt
        )
        # The schema (docs/schema.md): applied by start(), kept by its own thread.
        self.schema = Schema(cfg, self.executor)
        self.keeper = keeper = SchemaKeeper(self.schema)
        # Background threads: started by start() once the gate passed (or gave up with
        # required=False), stopped by close().
        self.monitor = HealthMonitor(
            cfg,
            self.hosts,
            self.status,
            self.events,
            closed=self._closing.is_set,
            tables=lambda: cfg.analytics_tables + self.schema.expected,
        )
        self.services: list[BackgroundService] = [self.monitor, keeper]
        self.events.listen(Event.RECOVERED, keeper.stale)
        self.spool: Spool | None = open_spool(
            cfg,
            executor=self.executor,
            metrics=self.metrics_registry,
            events=self.events,
            dedup_supported=lambda: self.supports(DEDUP_SETTING),
            ready=keeper.ready,
            lost=keeper.lost,
        )
        if self.spool is not None:
            self.services.append(self.spool.replayer)
            keeper.then = self.spool.wake  # replay once the schema is back
        dedup = lambda: self.supports(DEDUP_SETTING)  # noqa: E731
        promise = DeliveryGuarantees(self.execute, cfg.database, dedup)
        metrics = self.metrics_registry
        self._inserter = Inserter(self.execute, metrics, self.spool, keeper.lost, promise)
        self.reports = Reports(cfg, self.executor, self.monitor, self.spool, promise.report)
        if multiprocess_dir() is not None:  # gunicorn: totals over all workers, each round
            self.events.listen(Event.PROBED, lambda **_: process_totals().publish(self.metrics()))
        fork.register(self)

    # -- lifecycle --------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 60.0, required: bool = True) -> None:
        """Startup gate: return once ClickHouse answers ``SELECT 1``.

        Credentials or an unknown database fail at once with :class:`StartupError`.
        On timeout :class:`StartupTimeoutError` is raised, unless ``required=False``: then
        the manager starts degraded (``connection_state`` unhealthy) and the health monitor
        keeps probing in the background until ClickHouse answers.
        """
        self._check_open()
        if wait:
            self.gate.pass_or_degrade(timeout, required, retry_every=self.monitor.interval)
            try:
                if self.status.state is ConnectionState.HEALTHY:
                    self.keeper.apply_now()  # SchemaError names file and line
            except StartupTimeoutError:
                if required:
                    raise
                log.warning("schema_deferred", reason="ClickHouse too slow; applied later")
        with self._lock:
            if self.started:
                return
            self.started = True
        for service in self.services:
            service.start()

    def wait_until_ready(self, timeout: float) -> float:
        return self.gate.wait(timeout)  # block until a host answers; the seconds waited

    def close(self) -> None:
        """Stop using ClickHouse: close every pooled connection. A second call is harmless."""
        if self._closing.is_set():
            return
        self._closing.set()
        self.events.fire(Event.CLOSING)
        # Shut down the sockets of calls in flight (the services' too), so nothing waits
        # for a frozen server until its timeout; they end with ClosedInFlightError.
        for host in self.hosts:
            host.pool.close()
        deadline = Deadline(SERVICE_STOP_TIMEOUT)
        for service in self.services:
            service.stop(timeout=max(deadline.remaining(), 0.05))
        for host in self.hosts:
            host.pool.close()  # again: whatever came back meanwhile is discarded
        self.status.close()
        log.info("manager_closed")

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    @property
    def connection_state(self) -> ConnectionState:
        return self.status.state

    def __enter__(self) -> ClickHouseConnectionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._forked:
            self._restart_after_fork()
        if self._closing.is_set():
            raise ClientClosedError("the ClickHouse connection manager is closed")

    def after_fork_in_child(self) -> None:
        """In a forked child (gunicorn --preload): every part registered with the fork
        registry has replaced its pools and locks already, so no path (query, health,
        metrics, checks) touches the parent's sockets or waits for a parent thread's lock;
        the threads restart on first use."""
        self._lock = threading.Lock()
        fork.reinit_event(self._closing)
        self._forked = True  # its parts (hosts, breakers, status, services) repair themselves

    def _restart_after_fork(self) -> None:
        if not self._forked:
            return
        with self._lock:
            if not self._forked:
                return
            self._forked = False
        if self.started and not self._closing.is_set():
            for service in self.services:
                service.start()
        log.info("manager_reset_after_fork", pid=os.getpid())

    # -- queries ----------------------------------------------------------------------
    def execute(
        self,
        query: str,
        params: Any = None,
        *,
        with_column_types: bool = False,
        settings: Mapping[str, Any] | None = None,
        query_id: str | None = None,
        columnar: bool = False,
        external_tables: Sequence[Mapping[str, Any]] | None = None,
        types_check: bool = False,
        fallback: Callable[[BaseException], T] | None = None,
    ) -> Any:
        """``clickhouse_driver.Client.execute`` with pooling, retry and the breaker.

        ``fallback(error)``, if given, supplies the result when ClickHouse is unavailable.
        """
        self._check_open()
        sets = dict(settings) if settings else None
        statement = Statement.of(query, params, sets, lambda: self.supports(DEDUP_SETTING))
        try:
            return self.executor.query(
                query,
                params,
                statement,
                sets,
                with_column_types=with_column_types,
                external_tables=external_tables,
                query_id=query_id,
                types_check=types_check,
                columnar=columnar,
            )
        except ClickHouseUnavailableError as err:
            if fallback is None:
                raise
            return fallback(err)

    def execute_iter(
        self,
        query: str,
        params: Any = None,
        *,
        with_column_types: bool = False,
        settings: Mapping[str, Any] | None = None,
        query_id: str | None = None,
        external_tables: Sequence[Mapping[str, Any]] | None = None,
        types_check: bool = False,
        chunk_size: int = 1,
    ) -> Iterator[Any]:
        """Stream rows; the connection is held until the iterator ends. Getting the first
        row is retried like any read; an error after rows were yielded is not."""
        self._check_open()
        return self.executor.query_iter(
            query,
            params,
            dict(settings) if settings else None,
            with_column_types=with_column_types,
            external_tables=external_tables,
            query_id=query_id,
            types_check=types_check,
            chunk_size=chunk_size,
        )

    def open_executor(self) -> Executor:
        """The executor, for calls made outside execute() (the drop-in client's other
        methods): repaired after fork(); raises ClientClosedError once closed."""
        self._check_open()
        return self.executor

    def supports(self, feature: str) -> bool:
        """Whether every known host has ``feature`` (False until a host was seen)."""
        return all_support(self.hosts, feature)

    # -- inserts (chresilient.ingest) -------------------------------------------------------
    def insert(
        self,
        table: TableName,
        rows: Any,
        column_names: Sequence[str] | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
    ) -> InsertResult:
        """INSERT one batch; if ClickHouse is unavailable, spool it (``spooled=True``).

        Errors about the rows (unknown table, type mismatch) raise; a wrong column count
        raises :class:`InvalidBatchError` before anything is sent or spooled.
        """
        return self._inserter.insert(table, rows, column_names, settings=settings)

    def insert_batches(
        self,
        table: TableName,
        rows_iterable: Any,
        batch_size: int = 10_000,
        column_names: Sequence[str] | None = None,
        progress: bool | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
        token_prefix: str | None = None,
    ) -> InsertTotals:
        """Stream any iterable in batches (bounded memory), each delivered or spooled.

        ``progress=True``: tqdm bar; ``None``: a log line per 100 batches; ``False``: quiet.
        """
        return self._inserter.insert_batches(
            table,
            rows_iterable,
            batch_size,
            column_names,
            progress,
            settings=settings,
            token_prefix=token_prefix,
        )

    def spool_health(self) -> dict[str, Any]:
        return self.reports.spool_health()  # pending batches/rows/bytes, delivery promise

    # -- operations and reports -------------------------------------------------------
    def reconnect(self) -> dict[str, Any]:
        """Drop every pooled connection, reset the breakers and check each host once."""
        self._check_open()
        return self.executor.reconnect()

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges (see design.md for the keys)."""
        self._restart_after_fork()
        return self.reports.metrics()

    def health(self) -> dict[str, Any]:
        """Status, connection state, cached check summaries, breaker, pool and spool: the
        monitor's cached results; only when the latest probe is stale (the monitor is not
        running) one probe round runs, shared by concurrent callers."""
        self._restart_after_fork()
        return self.reports.health()

    def connection_report(self) -> dict[str, Any]:
        return connection_report(self.health())  # per host, /health/clickhouse/connection

    @property
    def check_timeout(self) -> float:
        return self.monitor.report_wait()  # a health request's wait for checks

    def validate_service_dependencies(
        self, timeout: float = 120.0, max_age: float | None = None
    ) -> dict[str, Any]:
        """Run the dependency checks (DNS ... container health); see chresilient.health.
        ``max_age``: a report at most that old is returned instead of a new run."""
        return self.monitor.dependencies.report(timeout, max_age)

    def ensure_analytics_consistency(
        self, timeout: float = 60.0, max_age: float | None = None
    ) -> dict[str, Any]:
        """Check the analytics tables and the write probe (``max_age``: as above)."""
        return self.monitor.consistency.report(timeout, max_age)
