"""chresilient.tracing on the SDK's in-memory exporter, without a server: one span per
caller call, nested calls join it, nothing without a provider."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clickhouse_driver.errors import NetworkError, ServerException
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chresilient import tracing


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider=provider)
    try:
        yield exporter
    finally:
        tracing.configure()


def test_no_provider_no_span() -> None:
    assert not tracing.enabled()  # nothing set a global TracerProvider in this process
    with tracing.call("SELECT 1", "db") as span:
        assert span is None and tracing.current() is None
        tracing.retry(1, NetworkError("x"), 0.5)  # hooks are no-ops without a span
        tracing.spooled()


def test_a_call_is_one_span_and_nested_calls_join_it(exporter: InMemorySpanExporter) -> None:
    with tracing.call("INSERT INTO `t`", None):
        with tracing.call("INSERT INTO `t` (a) VALUES", "analytics", query_text=True):
            tracing.attempt(("ch1", 9000))
            tracing.retry(1, NetworkError("refused"), 0.25)
            tracing.attempt(("ch2", 9001))
        with tracing.call("SELECT engine FROM system.tables", "analytics", query_text=True):
            pass  # bookkeeping inside the insert: it does not rename the span
        tracing.spooled()
        tracing.breaker("closed")
    (span,) = exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert span.name == "INSERT"
    assert attrs["db.system.name"] == "clickhouse"
    assert attrs["db.namespace"] == "analytics"
    assert attrs["db.query.text"] == "INSERT INTO `t` (a) VALUES"
    assert (attrs["server.address"], attrs["server.port"]) == ("ch2", 9001)
    assert attrs["chresilient.spooled"] is True
    (event,) = span.events
    assert event.name == "retry"
    assert event.attributes is not None
    assert event.attributes["chresilient.error_kind"] == "transport"
    assert event.attributes["error.type"] == "NetworkError"


def test_a_failure_sets_error_status_with_the_type_only(exporter: InMemorySpanExporter) -> None:
    with pytest.raises(ServerException), tracing.call("SELECT x", "db"):
        raise ServerException("DB::Exception: value 'secret-value' cannot be parsed", 6)
    (span,) = exporter.get_finished_spans()
    assert span.status.description == "ServerException"
    assert "db.query.text" not in (span.attributes or {})  # off unless asked for
    assert "secret-value" not in str(span.to_json())


def test_a_stream_ends_its_span_when_the_rows_end(exporter: InMemorySpanExporter) -> None:
    span = tracing.start("SELECT number FROM numbers(3)", "db")
    rows = tracing.stream(iter([1, 2, 3]), span)
    assert next(rows) == 1
    assert exporter.get_finished_spans() == ()
    assert list(rows) == [2, 3]
    assert len(exporter.get_finished_spans()) == 1


def test_tracing_can_be_turned_off(exporter: InMemorySpanExporter) -> None:
    tracing.configure(enabled=False)
    with tracing.call("SELECT 1", "db") as span:
        assert span is None
    assert exporter.get_finished_spans() == ()


class _BrokenProcessor(SimpleSpanProcessor):
    """An exporter bug: every finished span raises."""

    def on_end(self, span: object) -> None:
        raise RuntimeError("exporter bug")


def test_a_broken_exporter_never_fails_the_call() -> None:
    provider = TracerProvider()
    provider.add_span_processor(_BrokenProcessor(InMemorySpanExporter()))
    tracing.configure(provider=provider)
    try:
        with tracing.call("INSERT INTO t VALUES", "db") as span:
            assert span is not None
            tracing.retry(1, NetworkError("x"), 0.1)
        rows = tracing.stream(iter([1]), tracing.start("SELECT 1", "db"))
        assert list(rows) == [1]  # ending the span raised inside: swallowed
    finally:
        tracing.configure()


def test_a_stream_dropped_unread_still_ends_its_span(exporter: InMemorySpanExporter) -> None:
    import gc

    rows = tracing.stream(iter([1, 2]), tracing.start("SELECT 1", "db"))
    del rows
    gc.collect()
    assert len(exporter.get_finished_spans()) == 1
    closed = tracing.stream(iter([1, 2]), tracing.start("SELECT 2", "db"))
    closed.close()  # e.g. a streaming response whose client went away
    assert len(exporter.get_finished_spans()) == 2
