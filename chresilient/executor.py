"""One call: choose a host, run an attempt, retry under the policy, fail over, record.

Every query and insert takes this path: the retry loop (:func:`call_with_retry`) asks the
policy whether a failure may be repeated; each attempt goes to the first host in failover
order whose breaker admits it, on a pooled connection bounded by the attempt's timeout.
Outcomes go to the breaker, the host's counters, the connection state and the events;
nothing here knows which services listen.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from typing import Any, Callable, Generic, TypeVar

import structlog

from . import tracing
from .breaker import Permit
from .config import Config
from .connection import PooledConnection
from .errors import (
    CircuitOpenError,
    ClickHouseUnavailableError,
    ErrorKind,
    classify,
    counts_for_breaker,
    describe,
    trips_breaker,
)
from .events import Event, Events
from .hosts import HostSelector, HostState
from .metrics import Metrics
from .retry import CallStats, Deadline, RetryBudget, RetryPolicy, call_with_retry
from .state import ConnectionStatus
from .statement import (
    Statement,
    is_write_query,
    query_verb,
    refuse_session_change,
    settings_for_server,
)

T = TypeVar("T")
log = structlog.get_logger("chresilient")

_END = object()


class Executor:
    """Runs calls for one manager over its hosts (see the module docstring)."""

    def __init__(
        self,
        hosts: Sequence[HostState],
        cfg: Config,
        *,
        metrics: Metrics,
        status: ConnectionStatus,
        events: Events,
        closing: threading.Event,
    ) -> None:
        self.hosts = hosts
        self.database, self.trace_query_text = cfg.database, cfg.trace_query_text
        self.selector = HostSelector(cfg.load_balancing)
        self.policy = RetryPolicy.from_config(cfg.retry)
        self.budget = RetryBudget(cfg.retry.budget_ratio, cfg.retry.budget_burst)
        self.metrics = metrics
        self.status = status
        self.events = events
        self._closing = closing

    # -- calls --------------------------------------------------------------------------
    def query(
        self,
        query: str,
        params: Any,
        statement: Statement,
        settings: dict[str, Any] | None,
        *,
        with_column_types: bool,
        external_tables: Any,
        query_id: str | None,
        types_check: bool,
        columnar: bool,
    ) -> Any:
        """``Client.execute`` on a pooled connection, settings fitted to its server."""

        def body(host: HostState, timeout: float, deadline: Deadline) -> Any:
            with host.pool.connection(timeout, deadline) as conn:
                return conn.client.execute(
                    query,
                    params,
                    with_column_types=with_column_types,
                    external_tables=external_tables,
                    query_id=query_id,
                    settings=settings_for_server(settings, conn.features),
                    types_check=types_check,
                    columnar=columnar,
                )

        if statement.background or not tracing.wanted():  # e.g. the replayer's: no span
            return self.call_on_host(body, statement)
        with tracing.call(query, self.database, self.trace_query_text):
            return self.call_on_host(body, statement)

    def query_iter(
        self, query: str, params: Any, settings: dict[str, Any] | None, **driver_kwargs: Any
    ) -> Iterator[Any]:
        """``Client.execute_iter`` as a stream (see :meth:`stream`)."""

        def start(conn: PooledConnection) -> Iterator[Any]:
            sets = settings_for_server(settings, conn.features)
            return iter(conn.client.execute_iter(query, params, settings=sets, **driver_kwargs))

        refuse_session_change(query_verb(query), query)
        statement = Statement(is_write=is_write_query(query, params))
        if tracing.current() is not None or not tracing.enabled():
            return self.stream(start, statement)
        span = tracing.start(query, self.database, self.trace_query_text)
        if span is None:  # the tracer failed (logged): no span
            return self.stream(start, statement)
        try:
            with tracing.joined(span):
                rows = self.stream(start, statement)
        except BaseException as exc:
            tracing.failed(span, exc)
            span.end()
            raise
        return tracing.stream(rows, span)

    def call(
        self,
        run: Callable[[PooledConnection], T],
        statement: Statement,
        within: float | None = None,
    ) -> T:
        """``run(connection)`` under retry, breaker and failover; ``within`` s at most
        (the policy's ``total_timeout`` when shorter)."""

        def body(host: HostState, timeout: float, deadline: Deadline) -> T:
            with host.pool.connection(timeout, deadline) as conn:
                return run(conn)

        return self.call_on_host(body, statement, within=within)

    def call_on_host(
        self,
        body: Callable[[HostState, float, Deadline], T],
        statement: Statement,
        tried: list[HostState] | None = None,
        within: float | None = None,
    ) -> T:
        """``body(host, timeout, deadline)`` under retry, breaker and failover: ``timeout``
        bounds the attempt's network operations, ``deadline`` the whole call (the wait for a
        pooled connection included); ``tried`` collects the hosts the call went to.

        The first attempt runs inline; the retry loop is entered only after it failed.
        """
        tried = [] if tried is None else tried
        policy = self.policy
        stats = CallStats(attempts=1)
        started = time.perf_counter()
        total = policy.total_timeout
        deadline = Deadline(total if within is None else min(within, total or within))
        self.budget.deposit()
        try:
            try:
                result = self._attempt(
                    body, deadline.bound(policy.timeout_per_attempt), tried, deadline, statement
                )
            except CircuitOpenError:
                raise
            except Exception as first:
                result = self._retry(body, statement, tried, deadline, stats, first)
        except BaseException as exc:
            if tried:
                tracing.breaker(tried[-1].breaker.state.value)
            elif isinstance(exc, CircuitOpenError):
                tracing.breaker("open")
            self.metrics.record_call(
                time.perf_counter() - started, stats.retries, classify(exc).value
            )
            raise
        self.metrics.record_call(time.perf_counter() - started, stats.retries)
        if tracing.current() is not None:
            tracing.breaker(tried[-1].breaker.state.value)
        return result

    def _retry(
        self,
        body: Callable[[HostState, float, Deadline], T],
        statement: Statement,
        tried: list[HostState],
        deadline: Deadline,
        stats: CallStats,
        first: Exception,
    ) -> T:
        """The retry loop, after the first attempt failed with ``first``."""
        failover: Callable[[], bool] | None = None
        if len(self.hosts) > 1:
            failover = functools.partial(self.selector.untried_left, self.hosts, tried)
        return call_with_retry(
            lambda timeout: self._attempt(body, timeout, tried, deadline, statement),
            policy=self.policy,
            statement=statement,
            budget=self.budget,
            sleep=self._sleep,
            deadline=deadline,
            stats=stats,
            failover=failover,
            on_retry=tracing.retry,
            failed=first,
        )

    def checkout(
        self,
        start: Callable[[PooledConnection], T],
        statement: Statement,
        within: float | None = None,
    ) -> Held[T]:
        """``start(connection)`` under retry, breaker and failover, keeping the connection
        checked out until :meth:`Held.release`: for results read after the call returns
        (a stream, progress packets)."""

        def open_held(host: HostState, timeout: float, deadline: Deadline) -> Held[T]:
            stack = ExitStack()
            try:
                conn = stack.enter_context(host.pool.connection(timeout, deadline))
                value = start(conn)
            except BaseException as exc:
                if not stack.__exit__(type(exc), exc, exc.__traceback__):
                    raise
                raise  # pragma: no cover - the pool context never swallows
            return Held(self, host, stack, conn, value)

        return self.call_on_host(open_held, statement, within=within)

    def stream(
        self,
        start: Callable[[PooledConnection], Iterator[Any]],
        statement: Statement,
    ) -> Iterator[Any]:
        """Rows of ``start(connection)``; the connection is held until the iterator ends.

        Getting the first row is retried like any call; an error after rows were yielded
        is raised (classified) without retry. An iterator closed early discards its
        connection, since the server may still be sending.
        """

        def first_row(conn: PooledConnection) -> tuple[Iterator[Any], Any]:
            rows = start(conn)
            return rows, next(rows, _END)

        return self._rows(self.checkout(first_row, statement))

    @staticmethod
    def _rows(held: Held[tuple[Iterator[Any], Any]]) -> Iterator[Any]:
        rows, first = held.value
        try:
            if first is not _END:
                yield first
                yield from rows
        except GeneratorExit:
            held.fail(GeneratorExit())
            raise
        except Exception as exc:
            error = held.fail(exc)
            if error is exc:
                raise
            raise error from exc
        else:
            held.release()

    def broke(self, host: HostState, exc: BaseException) -> BaseException:
        """A held connection failed after its call returned: record it and say what the
        caller should see (a lost connection becomes ``ClickHouseUnavailableError``)."""
        kind = classify(exc)
        self.metrics.error(kind.value)
        if counts_for_breaker(kind):
            self._failed(host, exc)
            return ClickHouseUnavailableError("stream broke", last_error=exc)
        return exc

    # -- one attempt --------------------------------------------------------------------
    def _attempt(
        self,
        body: Callable[[HostState, float, Deadline], T],
        timeout: float,
        tried: list[HostState],
        deadline: Deadline,
        statement: Statement,
    ) -> T:
        host, permit = self.choose(tried)
        if tried and tried[-1] is not host:
            self.metrics.incr("failovers_total")
            log.info("clickhouse_failover", from_host=tried[-1].label, to_host=host.label)
        tried.append(host)
        tracing.attempt(host.pool.address)
        try:
            result = body(host, timeout, deadline)
        except BaseException as exc:
            host.count(failed=True)
            if statement.background:  # the probe, not a spooled batch, judges the server
                permit.neutral()
                raise
            host.breaker.record(permit, exc)
            if trips_breaker(exc):
                self._failed(host, exc)
            elif classify(exc) is not ErrorKind.LOCAL:
                self.status.succeeded()  # the server answered
            raise
        host.count(failed=False)
        permit.success()
        self.status.succeeded()
        if self.events.on_call_succeeded:
            self.events.fire(Event.CALL_SUCCEEDED, host=host.label)
        return result

    def choose(self, tried: Sequence[HostState] = ()) -> tuple[HostState, Permit]:
        """The first host, in failover order, whose breaker admits a call."""
        refused: CircuitOpenError | None = None
        for host in self.selector.failover_order(self.hosts, tried):
            try:
                return host, host.breaker.acquire()
            except CircuitOpenError as err:
                refused = refused or err
        assert refused is not None
        raise refused

    def _failed(self, host: HostState, exc: BaseException) -> None:
        streak = self.status.failed(all_open=self.all_open())
        log.warning(
            "clickhouse_call_failed",
            host=host.label,
            error=describe(exc),
            consecutive_failures=streak,
        )
        self.events.fire(Event.CALL_FAILED, host=host.label, error=exc)

    def reconnect(self) -> dict[str, Any]:
        """Drop every pooled connection, reset the breakers and check each host once."""
        results: dict[str, dict[str, Any]] = {}
        deadline = Deadline(self.policy.total_timeout)  # all hosts together
        for host in self.hosts:
            host.pool.recreate()
            host.breaker.reset()
            started = time.monotonic()
            try:
                bound = deadline.bound(self.policy.timeout_per_attempt)
                with host.pool.connection(bound, deadline) as conn:
                    conn.client.execute("SELECT 1")
                results[host.label] = {"ok": True, "seconds": round(time.monotonic() - started, 4)}
                self.status.succeeded()
            except Exception as exc:
                results[host.label] = {"ok": False, "error": describe(exc)}
        return {"reconnected": all(r["ok"] for r in results.values()), "hosts": results}

    def all_open(self) -> bool:
        return all(h.is_open() for h in self.hosts)

    def closing(self) -> bool:
        """The manager is closing: calls end, retries stop waiting."""
        return self._closing.is_set()

    def _sleep(self, seconds: float) -> bool:
        return not self._closing.wait(seconds)


class Held(Generic[T]):
    """A connection kept checked out after its call returned (see Executor.checkout)."""

    def __init__(
        self,
        executor: Executor,
        host: HostState,
        stack: ExitStack,
        conn: PooledConnection,
        value: T,
    ) -> None:
        self.host, self.connection, self.value = host, conn, value
        self._executor, self._stack = executor, stack
        self.released = False

    def release(self) -> None:
        """Return the connection to the pool: the result was read to its end."""
        if not self.released:
            self.released = True
            self._stack.__exit__(None, None, None)

    def fail(self, error: BaseException) -> BaseException:
        """Discard the connection after ``error``; returns what the caller should raise."""
        if self.released:
            return error
        self.released = True
        self._stack.__exit__(type(error), error, error.__traceback__)
        if isinstance(error, GeneratorExit):
            return error
        return self._executor.broke(self.host, error)
