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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import classify
from .statement import query_verb

try:
    from opentelemetry import trace
    from opentelemetry.trace import ProxyTracerProvider, SpanKind, Status, StatusCode
except ImportError:  # the ``otel`` extra is not installed
    trace = None  # type: ignore[assignment]

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
            outer.span.set_attribute("db.namespace", database)
            if query_text:
                outer.span.set_attribute("db.query.text", query)
        yield outer.span
        return
    if not enabled():
        yield None
        return
    span = start(query, database, query_text)
    token = _CURRENT.set(_Call(span, named=database is not None))
    try:
        yield span
    except BaseException as exc:
        failed(span, exc)
        raise
    finally:
        _CURRENT.reset(token)
        span.end()


def start(query: str, database: str | None, query_text: bool = False) -> Any:
    """A started span, not made current (a stream ends it when it ends: see stream())."""
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


def stream(rows: Iterator[Any], span: Any) -> Iterator[Any]:
    """``rows``, ending ``span`` (with the error, if any) when the iteration ends."""
    try:
        yield from rows
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):
            failed(span, exc)
        raise
    finally:
        span.end()


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
    span.set_attribute("error.type", name)
    span.set_status(Status(StatusCode.ERROR, name))


def attempt(address: tuple[str, int]) -> None:
    """The current attempt goes to ``address`` (the last one is the host that answered)."""
    span = current()
    if span is not None:
        span.set_attribute("server.address", address[0])
        span.set_attribute("server.port", address[1])


def retry(attempt_no: int, exc: BaseException, delay: float) -> None:
    """One event per retry: what failed and how long the backoff waits."""
    span = current()
    if span is not None:
        span.add_event(
            "retry",
            {
                "chresilient.attempt": attempt_no,
                "error.type": type(exc).__name__,
                "chresilient.error_kind": classify(exc).value,
                "chresilient.retry_delay_s": round(delay, 6),
            },
        )


def breaker(state: str) -> None:
    """The breaker state of the call's last host, as the call ends."""
    span = current()
    if span is not None:
        span.set_attribute("chresilient.breaker.state", state)


def spooled() -> None:
    """The insert went to the spool instead of ClickHouse."""
    span = current()
    if span is not None:
        span.set_attribute("chresilient.spooled", True)
