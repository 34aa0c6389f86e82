"""``ClickHouseConnectionManager``: wires config, pools, breakers, retry and metrics together.

One manager per process (per gunicorn worker). Every call takes the same path:
retry loop -> pick a host whose breaker admits the call -> pooled connection bounded by
the attempt's timeout -> the driver.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import re
import threading
import time
import types
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar

import structlog
import tenacity

from .breaker import CircuitBreaker, CircuitState
from .config import Config, format_host
from .errors import (
    AUTH_CODES,
    UNKNOWN_DATABASE,
    CircuitOpenError,
    ClickHouseUnavailableError,
    ClientClosedError,
    ErrorKind,
    StartupError,
    StartupTimeoutError,
    classify,
    counts_for_breaker,
    describe,
    is_retryable,
    server_code,
)
from .health.monitor import HealthMonitor
from .health.status import build_health
from .ingest import Inserter, InsertResult, InsertTotals, TableName, open_spool
from .metrics import Metrics, utc_iso
from .pool import DEDUP_SETTING, HostPool, PooledConnection
from .replay import Spool
from .retry import CallStats, Deadline, RetryBudget, RetryPolicy, call_with_retry

T = TypeVar("T")
log = structlog.get_logger("chresilient")

# close() gives background threads this long, all together, to stop.
SERVICE_STOP_TIMEOUT = 1.0
# The startup gate's first wait; it doubles up to STARTUP_MAX_STEP.
STARTUP_FIRST_STEP = 0.25
# The startup gate retries at least this often, so the backend comes up soon after
# ClickHouse is ready, and at most twice a second, so it does not hammer a booting server.
STARTUP_MAX_STEP = 0.5


# Every live manager, so that a forked child can mark them for repair on first use.
_MANAGERS: weakref.WeakSet[ClickHouseConnectionManager] = weakref.WeakSet()


def _mark_forked() -> None:
    for mgr in list(_MANAGERS):
        mgr._forked = True


os.register_at_fork(after_in_child=_mark_forked)


class _NotReady(Exception):
    """No host answered this round of the startup gate (the cause says why)."""


class BackgroundService(Protocol):
    """A thread the manager owns: started after the startup gate, stopped by close()."""

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...


@dataclass(eq=False)
class HostState:
    """One ClickHouse host: its pool, its breaker, its traffic and its replica delay."""

    pool: HostPool
    breaker: CircuitBreaker
    # Seconds from system.replicas, read by the health monitor (0.0: no replicated
    # tables; None: not read yet, disabled, or unreadable). A lagging host goes last.
    replica_delay: float | None = None
    lagging: bool = False
    # A hint, kept by breaker transitions: the breaker is open (checked live before use).
    down: bool = False
    # Attempts sent to this host (each attempt of a retried call counts) and failed ones.
    queries_total: int = 0
    errors_total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def label(self) -> str:
        return self.pool.label

    def count(self, failed: bool) -> None:
        with self._lock:
            self.queries_total += 1
            if failed:
                self.errors_total += 1

    def set_replica_delay(self, delay: float | None, limit: float | None) -> bool:
        """Record what the monitor read; returns True when ``lagging`` changed."""
        lagging = delay is not None and limit is not None and delay > limit
        changed = lagging != self.lagging
        self.replica_delay, self.lagging = delay, lagging
        return changed

    def report(self) -> dict[str, Any]:
        """Per-host traffic, breaker, pool gauges and replica delay (health and metrics)."""
        return {
            "queries_total": self.queries_total,
            "errors_total": self.errors_total,
            "circuit_breaker_state": self.breaker.state.value,
            "replica_delay": self.replica_delay,
            "lagging": self.lagging,
            **self.pool.status(),
        }


# Comments, whitespace and parentheses before a query's first keyword.
_LEADING_NOISE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*", re.S)
_FIRST_WORD = re.compile(r"[A-Za-z]+")
# Statements that change nothing: repeating them after an unknown outcome is safe.
READ_VERBS = frozenset({"select", "with", "show", "describe", "desc", "exists", "explain"})


def query_verb(query: str) -> str:
    """The first keyword of ``query`` in lower case, after comments and parentheses."""
    start = _LEADING_NOISE.match(query)
    word = _FIRST_WORD.match(query, start.end() if start else 0)
    return word.group(0).lower() if word else ""


def is_write_query(query: str, params: Any) -> bool:
    """Whether repeating ``query`` after an unknown outcome could change data twice.

    Everything but a known read verb counts as a write (INSERT, ALTER ... UPDATE, DDL):
    a reset after the server applied it must not make the client apply it again. The
    driver sends ``params`` as INSERT data when it is a list, tuple or generator.
    """
    if isinstance(params, (list, tuple, types.GeneratorType)):
        return True
    return query_verb(query) not in READ_VERBS


class ClickHouseConnectionManager:
    """A resilient, pooled ClickHouse client for one process."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config.from_env()
        cfg = self.config
        self.metrics_registry = Metrics()
        self.policy = RetryPolicy.from_config(cfg.retry)
        self.budget = RetryBudget(cfg.retry.budget_ratio, cfg.retry.budget_burst)
        self.hosts: list[HostState] = [
            HostState(
                pool=HostPool(cfg, address),
                breaker=CircuitBreaker(
                    cfg.breaker,
                    name=format_host(*address),
                    on_transition=self._on_transition,
                ),
            )
            for address in cfg.hosts
        ]
        self._rr = itertools.count()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._forked = False  # set in a forked child; see _after_fork()
        _MANAGERS.add(self)
        self.connection_state = "connecting"
        self._consecutive_failures = 0
        self.started = False
        # Background threads (health monitor, spool replayer): started by start() once
        # the gate passed (or gave up with required=False), stopped by close().
        self.services: list[BackgroundService] = []
        # The health monitor (chresilient.health): probes, connection_state, pruning, and
        # the cached health reports behind health() and the endpoints.
        self.monitor = HealthMonitor(self)
        self.services.append(self.monitor)
        # Durable spool of inserts ClickHouse could not take, and its replayer (None when
        # spool_enabled=False). An unusable spool_dir is a ConfigError here, not at the
        # first outage.
        self.spool: Spool | None = open_spool(self)
        if self.spool is not None:
            self.services.append(self.spool.replayer)
        self._inserter = Inserter(self, self.spool)

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
            try:
                self.wait_until_ready(timeout)
            except StartupTimeoutError:
                if required:
                    raise
                self.connection_state = "unhealthy"
                log.warning(
                    "startup_degraded",
                    timeout=timeout,
                    target=self.config.safe_url(),
                    retrying_every=self.monitor.interval,
                )
        with self._lock:
            if self.started:
                return
            self.started = True
        for service in self.services:
            service.start()

    def wait_until_ready(self, timeout: float) -> float:
        """Block until a host answers; returns the seconds waited. See :meth:`start`.

        Not on the hot path, so tenacity's composable strategies drive it: waits grow
        from STARTUP_FIRST_STEP to STARTUP_MAX_STEP, within ``timeout``, interruptible
        by ``close()``.
        """
        deadline = Deadline(timeout)
        started = time.monotonic()
        retrying = tenacity.Retrying(
            stop=tenacity.stop_before_delay(timeout) | tenacity.stop_when_event_set(self._closed),
            wait=tenacity.wait_exponential(multiplier=STARTUP_FIRST_STEP, max=STARTUP_MAX_STEP),
            retry=tenacity.retry_if_exception_type(_NotReady),
            sleep=self._closed.wait,  # type: ignore[arg-type]  # close() interrupts the wait
        )
        try:
            for attempt in retrying:
                with attempt:
                    host = self._first_answering_host(attempt.retry_state.attempt_number, deadline)
        except tenacity.RetryError as err:
            if self._closed.is_set():
                raise ClientClosedError("manager closed while waiting for ClickHouse") from None
            attempts = err.last_attempt.attempt_number
            raise StartupTimeoutError(
                f"ClickHouse at {self.config.safe_url()} not ready after {timeout:.1f}s "
                f"({attempts} attempts)",
                last_error=err.last_attempt.exception().__cause__,  # type: ignore[union-attr]
                attempts=attempts,
            ) from None
        waited = time.monotonic() - started
        host.breaker.reset()
        self._mark_success()
        log.info(
            "clickhouse_ready",
            host=host.label,
            attempts=attempt.retry_state.attempt_number,
            waited=round(waited, 3),
        )
        return waited

    def _first_answering_host(self, attempt_no: int, deadline: Deadline) -> HostState:
        """The first host that answers ``SELECT 1``; :class:`_NotReady` if none does."""
        last: BaseException | None = None
        for host in self.hosts:
            try:
                with host.pool.connection(deadline.bound(self.policy.timeout_per_attempt)) as conn:
                    conn.client.execute("SELECT 1")
                return host
            except Exception as exc:
                last = exc
                self._fail_fast_at_startup(host, exc)
                log.info(
                    "waiting_for_clickhouse",
                    host=host.label,
                    attempt=attempt_no,
                    reason=_wait_reason(exc),
                    remaining=round(max(deadline.remaining(), 0.0), 1),
                )
        raise _NotReady() from last

    def _fail_fast_at_startup(self, host: HostState, exc: BaseException) -> None:
        code = server_code(exc)
        if code in AUTH_CODES:
            raise StartupError(
                f"authentication failed for user {self.config.user!r} at {host.label}: "
                f"{describe(exc)}; check CLICKHOUSE_USER and CLICKHOUSE_PASSWORD",
                last_error=exc,
            ) from exc
        if code == UNKNOWN_DATABASE:
            raise StartupError(
                f"database {self.config.database!r} does not exist at {host.label}; "
                f"check CLICKHOUSE_DB",
                last_error=exc,
            ) from exc

    def close(self) -> None:
        """Stop using ClickHouse: close every pooled connection. A second call is harmless."""
        if self._forked:  # the inherited pools hold the parent's sockets: not ours to close
            self._after_fork(start_services=False)
        if self._closed.is_set():
            return
        self._closed.set()
        # Shut down the sockets of calls in flight (the services' too), so nothing waits
        # for a frozen server until its timeout; they end with ClosedInFlightError.
        for host in self.hosts:
            host.pool.close()
        deadline = Deadline(SERVICE_STOP_TIMEOUT)
        for service in self.services:
            service.stop(timeout=max(deadline.remaining(), 0.05))
        for host in self.hosts:
            host.pool.close()  # again: whatever came back meanwhile is discarded
        self.connection_state = "closed"
        log.info("manager_closed")

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __enter__(self) -> ClickHouseConnectionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._forked:
            self._after_fork()
        if self._closed.is_set():
            raise ClientClosedError("the ClickHouse connection manager is closed")

    def _after_fork(self, start_services: bool = True) -> None:
        """First use in a forked child (gunicorn --preload): new pools, restarted threads.

        Sockets, threads and locks do not survive fork(): the parent's pooled sockets
        would carry two processes' queries at once, and its threads do not exist here.
        """
        self._forked = False
        self._lock = threading.Lock()
        for host in self.hosts:
            host.pool.after_fork()
        if start_services and self.started and not self._closed.is_set():
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
        is_write = is_write_query(query, params)
        settings = dict(settings) if settings else None

        def run(conn: PooledConnection) -> Any:
            return conn.client.execute(
                query,
                params,
                with_column_types=with_column_types,
                external_tables=external_tables,
                query_id=query_id,
                settings=_settings_for(conn, settings),
                types_check=types_check,
                columnar=columnar,
            )

        try:
            return self._call(
                run,
                is_write=is_write,
                replayable=not isinstance(params, (Iterator, types.GeneratorType)),
                deduplicated=is_write
                and bool(settings and settings.get(DEDUP_SETTING))
                and self.supports(DEDUP_SETTING),
                what="insert" if is_write else "query",
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
        """Stream rows; the connection is held until the iterator ends.

        Getting the first row is retried like any read; an error after rows were yielded
        is raised (classified) without retry. An iterator closed early discards its
        connection, since the server may still be sending.
        """
        settings = dict(settings) if settings else None
        is_write = is_write_query(query, params)

        def open_stream(host: HostState, timeout: float) -> tuple[ExitStack, Iterator[Any], Any]:
            stack = ExitStack()
            try:
                conn = stack.enter_context(host.pool.connection(timeout))
                rows = conn.client.execute_iter(
                    query,
                    params,
                    with_column_types=with_column_types,
                    external_tables=external_tables,
                    query_id=query_id,
                    settings=_settings_for(conn, settings),
                    types_check=types_check,
                    chunk_size=chunk_size,
                )
                first = next(rows, _END)
            except BaseException as exc:
                if not stack.__exit__(type(exc), exc, exc.__traceback__):
                    raise
                raise  # pragma: no cover - the pool context never swallows
            return stack, rows, first

        host_box: list[HostState] = []

        def attempt(timeout: float) -> tuple[ExitStack, Iterator[Any], Any]:
            return self._attempt(lambda h: open_stream(h, timeout), host_box=host_box)

        stack, rows, first = self._with_retry(
            attempt,
            is_write=is_write,
            replayable=True,
            deduplicated=False,
            what="query",
            tried=host_box,
        )
        return self._stream(stack, rows, first, host_box[-1])

    def _stream(
        self, stack: ExitStack, rows: Iterator[Any], first: Any, host: HostState
    ) -> Iterator[Any]:
        try:
            if first is _END:
                return
            yield first
            yield from rows
        except GeneratorExit:
            stack.__exit__(GeneratorExit, GeneratorExit(), None)
            raise
        except Exception as exc:
            stack.__exit__(type(exc), exc, exc.__traceback__)
            kind = classify(exc)
            self.metrics_registry.error(kind.value)
            if counts_for_breaker(kind):
                self._note_failure(host, exc)
                raise ClickHouseUnavailableError("stream broke", last_error=exc) from exc
            raise
        else:
            stack.__exit__(None, None, None)

    def supports(self, feature: str) -> bool:
        """Whether every known host has ``feature`` (False until a host was seen)."""
        seen = [h.pool.features for h in self.hosts if h.pool.server_info is not None]
        return bool(seen) and all(f.get(feature, False) for f in seen)

    # -- inserts and the spool (chresilient.ingest, chresilient.replay) ---------------------
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
        """The spool section of health(): pending batches/rows/bytes, delivery guarantee."""
        if self.spool is None:
            return {"enabled": False, "delivery_guarantee": "none"}
        return {"enabled": True, **self.spool.health()}

    # -- the call path ------------------------------------------------------------------
    def _call(
        self,
        run: Callable[[PooledConnection], T],
        *,
        is_write: bool,
        replayable: bool,
        deduplicated: bool,
        what: str,
    ) -> T:
        tried: list[HostState] = []

        def attempt(timeout: float) -> T:
            return self._attempt(lambda h: _run_on(h, timeout, run), host_box=tried)

        return self._with_retry(
            attempt,
            is_write=is_write,
            replayable=replayable,
            deduplicated=deduplicated,
            what=what,
            tried=tried,
        )

    def _with_retry(
        self,
        attempt: Callable[[float], T],
        *,
        is_write: bool,
        replayable: bool,
        deduplicated: bool,
        what: str,
        tried: list[HostState] | None = None,
    ) -> T:
        """Run ``attempt`` under the retry policy; ``tried`` lists the hosts it went to."""
        self._check_open()
        metrics = self.metrics_registry
        metrics.incr("queries_total")

        def should_retry(exc: BaseException) -> bool:
            return replayable and is_retryable(
                classify(exc), is_write=is_write, deduplicated=deduplicated, code=server_code(exc)
            )

        failover: Callable[[], bool] | None = None
        if tried is not None and len(self.hosts) > 1:
            failover = functools.partial(self._untried_host_left, tried)

        stats = CallStats()
        started = time.perf_counter()
        try:
            result = call_with_retry(
                attempt,
                policy=self.policy,
                should_retry=should_retry,
                budget=self.budget,
                sleep=self._sleep,
                stats=stats,
                what=what,
                failover=failover,
            )
        except BaseException as exc:
            metrics.observe_duration(time.perf_counter() - started)
            metrics.incr("retry_attempts", stats.retries)
            metrics.error(classify(exc).value)
            raise
        metrics.observe_duration(time.perf_counter() - started)
        if stats.retries:
            metrics.incr("retry_attempts", stats.retries)
        return result

    def _attempt(
        self, body: Callable[[HostState], T], host_box: list[HostState] | None = None
    ) -> T:
        """One attempt on the host chosen for it; ``host_box`` collects the call's hosts."""
        host, permit = self._choose_host(host_box or ())
        if host_box is not None:
            if host_box and host_box[-1] is not host:
                self.metrics_registry.incr("failovers_total")
                log.info("clickhouse_failover", from_host=host_box[-1].label, to_host=host.label)
            host_box.append(host)
        try:
            result = body(host)
        except BaseException as exc:
            host.count(failed=True)
            kind = classify(exc)
            if counts_for_breaker(kind):
                permit.failure(exc)
                self._note_failure(host, exc)
            else:
                permit.neutral()
                if kind is not ErrorKind.LOCAL:
                    self._mark_success()  # the server answered
            raise
        host.count(failed=False)
        permit.success()
        self._mark_success()
        return result

    def _choose_host(self, tried: Sequence[HostState] = ()) -> tuple[HostState, Any]:
        """The first host, in failover order, whose breaker admits a call."""
        refused: CircuitOpenError | None = None
        for host in self._failover_order(tried):
            try:
                return host, host.breaker.acquire()
            except CircuitOpenError as err:
                refused = refused or err
        assert refused is not None
        raise refused

    def _host_order(
        self, hosts: Sequence[HostState] | None = None, turn: int | None = None
    ) -> Sequence[HostState]:
        """``hosts`` (default: all) in strategy order; ``turn`` is the round-robin step."""
        hosts = self.hosts if hosts is None else hosts
        if len(hosts) == 1:
            return hosts
        strategy = self.config.load_balancing
        if strategy == "round_robin":
            start = (next(self._rr) if turn is None else turn) % len(hosts)
            return [*hosts[start:], *hosts[:start]]
        if strategy == "random":
            return random.sample(hosts, len(hosts))
        if strategy == "least_loaded":
            return sorted(hosts, key=lambda h: h.pool.status()["checked_out"])
        return hosts

    def _failover_order(self, tried: Sequence[HostState]) -> Sequence[HostState]:
        """Hosts ranked by how often this call tried them, then open breaker, then
        replica lag; the strategy orders each rank.

        So a retry goes to a replica that did not just fail (in_order would otherwise
        return to the failed primary while its breaker is still closed), a lagging replica
        serves only when the others failed in this call or lag too, and round robin
        spreads the load evenly over the hosts left instead of doubling it on the host
        after a dead one.
        """
        hosts = self.hosts
        if len(hosts) == 1 or not (tried or any(h.lagging or h.down for h in hosts)):
            return self._host_order()  # the common case: no ranking on the hot path

        def rank(h: HostState) -> tuple[int, bool, bool]:
            tries = sum(t is h for t in tried)
            return tries, h.down and h.breaker.state is CircuitState.OPEN, h.lagging

        turn = next(self._rr)  # one round-robin step per call, shared by every rank
        ranked = sorted((rank(h), i) for i, h in enumerate(hosts))
        order: list[HostState] = []
        for _, same in itertools.groupby(ranked, key=lambda item: item[0]):
            order.extend(self._host_order([hosts[i] for _, i in same], turn))
        return order

    def _untried_host_left(self, tried: Sequence[HostState]) -> bool:
        """Whether a retry can go to a host this call has not tried (breaker not open)."""
        return any(
            all(t is not h for t in tried) and h.breaker.state is not CircuitState.OPEN
            for h in self.hosts
        )

    def _note_failure(self, host: HostState, exc: BaseException) -> None:
        with self._lock:
            self._consecutive_failures += 1
        log.warning(
            "clickhouse_call_failed",
            host=host.label,
            error=describe(exc),
            consecutive_failures=self._consecutive_failures,
        )
        if all(h.breaker.state is CircuitState.OPEN for h in self.hosts):
            self.connection_state = "unhealthy"
        else:
            self.connection_state = "degraded"

    def _mark_success(self) -> None:
        if self._consecutive_failures:
            with self._lock:
                self._consecutive_failures = 0
        if self.connection_state != "healthy" and not self._closed.is_set():
            self.connection_state = "healthy"
        self.metrics_registry.success()

    def _sleep(self, seconds: float) -> bool:
        return not self._closed.wait(seconds)

    def _on_transition(self, name: str, old: CircuitState, new: CircuitState) -> None:
        for host in getattr(self, "hosts", []):
            if host.breaker.name == name:  # re-read: notifications may arrive out of order
                host.down = host.breaker.state is CircuitState.OPEN
        if new is CircuitState.OPEN and all(
            h.breaker.state is CircuitState.OPEN for h in getattr(self, "hosts", [])
        ):
            self.connection_state = "unhealthy"
        monitor = getattr(self, "monitor", None)
        if new is CircuitState.OPEN and monitor is not None:
            monitor.wake()  # from now on it probes for recovery, so calls need not

    # -- operations -------------------------------------------------------------------
    def reconnect(self) -> dict[str, Any]:
        """Drop every pooled connection, reset the breakers and check each host once."""
        self._check_open()
        results: dict[str, dict[str, Any]] = {}
        for host in self.hosts:
            host.pool.recreate()
            host.breaker.reset()
            started = time.monotonic()
            try:
                with host.pool.connection(self.policy.timeout_per_attempt) as conn:
                    conn.client.execute("SELECT 1")
                results[host.label] = {"ok": True, "seconds": round(time.monotonic() - started, 4)}
                self._mark_success()
            except Exception as exc:
                results[host.label] = {"ok": False, "error": describe(exc)}
        return {"reconnected": all(r["ok"] for r in results.values()), "hosts": results}

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges (see design.md for the keys)."""
        out = self.metrics_registry.counters()
        stats = [h.pool.stats for h in self.hosts]
        gauges = [h.pool.status() for h in self.hosts]
        primary = self.hosts[0].breaker
        last = self.metrics_registry.last_success_wall
        out.update(
            connection_attempts=sum(s.connect_attempts for s in stats),
            successful_connections=sum(s.connects for s in stats),
            failed_connections=sum(s.connect_failures for s in stats),
            pool_hits=sum(s.hits for s in stats),
            pool_misses=sum(s.misses for s in stats),
            pool_invalidations=sum(s.invalidations for s in stats),
            circuit_breaker_opens=sum(h.breaker.opens_total for h in self.hosts),
            circuit_breaker_state=primary.state.value,
            connection_state=self.connection_state,
            consecutive_failures=self._consecutive_failures,
            last_successful_connection=utc_iso(last),
            checked_out=sum(g["checked_out"] for g in gauges),
            idle=sum(g["idle"] for g in gauges),
            overflow=sum(g["overflow"] for g in gauges),
            retry_budget_tokens=round(self.budget.tokens, 2),
            retry_budget_exhausted=self.budget.exhausted_total,
            **_spool_gauges(self.spool),
            hosts={h.label: h.report() for h in self.hosts},
        )
        return out

    def health(self) -> dict[str, Any]:
        """Status, connection state, cached check summaries, breaker, pool and spool.

        Built from the monitor's cached results; only when the latest probe is stale (the
        monitor is not running) one probe round runs, shared by concurrent callers.
        """
        return build_health(self)

    def validate_service_dependencies(self, timeout: float = 120.0) -> dict[str, Any]:
        """Run the dependency checks now (DNS ... container health); see chresilient.health."""
        return self.monitor.dependencies.refresh(timeout)

    def ensure_analytics_consistency(self, timeout: float = 60.0) -> dict[str, Any]:
        """Check the configured analytics tables and the write probe now."""
        return self.monitor.consistency.refresh(timeout)


_END = object()


def _spool_gauges(spool: Spool | None) -> dict[str, int]:
    pending = spool.pending() if spool is not None else None
    return {
        "pending_batches": pending.batches if pending else 0,
        "pending_rows": pending.rows if pending else 0,
        "pending_bytes": pending.bytes if pending else 0,
    }


def _settings_for(conn: PooledConnection, settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """``settings`` for the server behind ``conn``: servers before 22.x reject an unknown
    ``insert_deduplication_token``, so it is dropped there (delivery is then at least once).
    """
    if settings and DEDUP_SETTING in settings and not conn.features.get(DEDUP_SETTING, False):
        return {k: v for k, v in settings.items() if k != DEDUP_SETTING}
    return settings


def _run_on(host: HostState, timeout: float, run: Callable[[PooledConnection], T]) -> T:
    with host.pool.connection(timeout) as conn:
        return run(conn)


def _wait_reason(exc: BaseException) -> str:
    text = describe(exc)
    low = text.lower()
    if "refused" in low:
        return f"connection refused: {text}"
    if "timed out" in low or "timeout" in low:
        return f"timeout: {text}"
    if "name or service not known" in low or "nodename" in low or "resolve" in low:
        return f"DNS: {text}"
    return text
