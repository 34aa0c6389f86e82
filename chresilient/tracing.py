"""OpenTelemetry spans for callers' calls, after the database semantic conventions.

One CLIENT span per call a caller makes (``execute``, ``execute_iter``, ``insert``, the
drop-in client's methods), named after the statement's verb: ``db.system.name``,
``db.namespace``, ``db.operation.name``, ``server.address``/``server.port`` of the host
that answered, ``db.query.text`` only with ``Config.trace_query_text`` (the text as the
caller wrote it, placeholders and all: parameter values are never added), one ``retry``
event per retry (error type and kind, delay), the breaker state of that host, and
``chresilient.spooled`` on an insert that went to the spool. A failed call has error
status and ``error.type``, never the message (a server's message may quote values).

Without opentelemetry-api, or while no TracerProvider is set, a call costs one
``isinstance`` check here. A call that begins inside another one (an insert's execute)
joins the outer span: one span per caller call. Written by hand because the
instrumentation packages for clickhouse-driver patch the driver's Client, whose calls the
pool and the retry loop would split into one span per attempt.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, TypeVar

import structlog

from .errors import classify, describe
from .statement import query_verb

try:
    from opentelemetry import trace
    from opentelemetry.trace import ProxyTracerProvider, SpanKind, Status, StatusCode
except ImportError:  # the ``otel`` extra is not installed
    trace = None  # type: ignore[assignment]

T = TypeVar("T")
log = structlog.get_logger("chresilient.tracing")
SYSTEM = "clickhouse"
_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("chresilient_span", default=None)


_SETUP: dict[str, Any] = {"provider": None, "enabled": True}


def configure(*, provider: Any = None, enabled: bool = True) -> None:
    """Send chresilient's spans to ``provider`` instead of the global TracerProvider (as
    instrumentations take ``tracer_provider=``); ``enabled=False`` turns them off."""
    if provider is not None and trace is None:
        raise RuntimeError("tracing needs opentelemetry-api: pip install chresilient[otel]")
    _SETUP.update(provider=provider, enabled=enabled)


def enabled() -> bool:
    """A TracerProvider is set (an SDK, or a vendor's): spans are worth making."""
    if not _SETUP["enabled"] or trace is None:
        return False
    return _SETUP["provider"] is not None or not isinstance(
        trace.get_tracer_provider(), ProxyTracerProvider
    )


class _Call:
    """The span of a caller's call; ``named`` once a statement gave it its text."""

    __slots__ = ("named", "span")

    def __init__(self, span: Any, named: bool) -> None:
        self.span, self.named = span, named


def wanted() -> bool:
    """A call should go through :func:`call`: a span is open or spans are worth making."""
    return _CURRENT.get() is not None or enabled()


def current() -> Any:
    """The span of the call in progress on this thread (None: not traced)."""
    call = _CURRENT.get()
    return None if call is None else call.span


@contextmanager
def call(query: str, database: str | None, query_text: bool = False) -> Iterator[Any]:
    """The caller's span for a call of ``query`` (joined if one is open already)."""
    outer = _CURRENT.get()
    if outer is not None:
        if not outer.named:  # the first statement of an outer call (an insert) names it
            outer.named = True
            _quietly(outer.span.set_attribute, "db.namespace", database)
            if query_text:
                _quietly(outer.span.set_attribute, "db.query.text", query)
        yield outer.span
        return
    span = start(query, database, query_text) if enabled() else None
    if span is None:
        yield None
        return
    token = _CURRENT.set(_Call(span, named=database is not None))
    try:
        yield span
    except BaseException as exc:
        failed(span, exc)
        raise
    finally:
        _CURRENT.reset(token)
        _quietly(span.end)


def start(query: str, database: str | None, query_text: bool = False) -> Any:
    """A started span, not made current (a stream ends it when it ends: see stream());
    None if the tracer failed."""
    return _quietly(_start, query, database, query_text)


def _start(query: str, database: str | None, query_text: bool) -> Any:
    verb = query_verb(query).upper() or "QUERY"
    tracer = trace.get_tracer("chresilient", tracer_provider=_SETUP["provider"])
    span = tracer.start_span(verb, kind=SpanKind.CLIENT)
    span.set_attribute("db.system.name", SYSTEM)
    if database is not None:
        span.set_attribute("db.namespace", database)
    span.set_attribute("db.operation.name", verb)
    if query_text:
        span.set_attribute("db.query.text", query)
    return span


class TracedRows:
    """``rows``, ending ``span`` (with the error, if any) when the iteration ends, when
    the caller closes it, or when it is dropped unread."""

    def __init__(self, rows: Iterator[Any], span: Any) -> None:
        self._rows, self._span = rows, span
        self._end = weakref.finalize(self, _quietly, span.end)

    def __iter__(self) -> TracedRows:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._rows)
        except StopIteration:
            self._end()
            raise
        except BaseException as exc:
            failed(self._span, exc)
            self._end()
            raise

    def close(self) -> None:
        try:
            close = getattr(self._rows, "close", None)
            if close is not None:
                close()
        finally:
            self._end()


def stream(rows: Iterator[Any], span: Any) -> Iterator[Any]:
    return TracedRows(rows, span)


@contextmanager
def joined(span: Any) -> Iterator[None]:
    """Make ``span`` the current call's span for the block (a stream's first rows)."""
    token = _CURRENT.set(_Call(span, named=True))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def failed(span: Any, exc: BaseException) -> None:
    name = type(exc).__name__
    _quietly(span.set_attribute, "error.type", name)
    _quietly(span.set_status, Status(StatusCode.ERROR, name))


_WARNED: list[bool] = []


def _quietly(fn: Callable[..., T], *args: Any) -> T | None:
    """Run an OpenTelemetry call; a failing SDK, exporter or provider never fails the
    database call it describes (logged once)."""
    try:
        return fn(*args)
    except Exception as exc:
        if not _WARNED:
            _WARNED.append(True)
            log.warning("tracing_failed", error=describe(exc), hint="spans may be incomplete")
        return None


def attempt(address: tuple[str, int]) -> None:
    """The current attempt goes to ``address`` (the last one is the host that answered)."""
    span = current()
    if span is not None:
        _quietly(span.set_attribute, "server.address", address[0])
        _quietly(span.set_attribute, "server.port", address[1])


def retry(attempt_no: int, exc: BaseException, delay: float) -> None:
    """One event per retry: what failed and how long the backoff waits."""
    span = current()
    if span is not None:
        event = {
            "chresilient.attempt": attempt_no,
            "error.type": type(exc).__name__,
            "chresilient.error_kind": classify(exc).value,
            "chresilient.retry_delay_s": round(delay, 6),
        }
        _quietly(span.add_event, "retry", event)


def breaker(state: str) -> None:
    """The breaker state of the call's last host, as the call ends."""
    span = current()
    if span is not None:
        _quietly(span.set_attribute, "chresilient.breaker.state", state)


def spooled() -> None:
    """The insert went to the spool instead of ClickHouse."""
    span = current()
    if span is not None:
        _quietly(span.set_attribute, "chresilient.spooled", True)
