"""Run by test_otel_spans.py in its own process: a TracerProvider is global and set once per
process, so the rest of the suite keeps running untraced.

Sets the SDK's provider with an in-memory exporter, drives a manager on the server named
by CH_HOST/CH_PORT (through a fault proxy) through a query, a retried query, a breaker
refusal, a spooled insert, a delivered insert, a stream and a drop-in progress call, and
writes the finished spans as JSON to the file named by its argument.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile

from clickhouse_driver.errors import ServerException
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chresilient import (
    CircuitOpenError,
    ClickHouseConnectionManager,
    Config,
    ResilientClient,
    RetryConfig,
)
from chresilient.testing.faultproxy import FaultProxy

SECRET_PARAM = "param-value-7f3a"


def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    host, port = os.environ["CH_HOST"], int(os.environ["CH_PORT"])
    marks: dict[str, int] = {}

    def mark(name: str) -> None:
        marks[name] = len(exporter.get_finished_spans())

    with FaultProxy((host, port)) as proxy:
        cfg = Config(
            host=proxy.host,
            port=proxy.port,
            user=os.environ["CH_USER"],
            password=os.environ["CH_PASSWORD"],
            database=os.environ["CH_DB"],
            retry=RetryConfig(initial_delay=0.05, max_delay=0.1, total_timeout=3.0),
            spool_dir=tempfile.mkdtemp(prefix="chresilient-tracing-"),
            trace_query_text=True,
        )
        with ClickHouseConnectionManager(cfg) as mgr:
            mgr.execute("DROP TABLE IF EXISTS tracing_events")
            mgr.execute("CREATE TABLE tracing_events (id UInt32, s String) ENGINE = Memory")
            mark("query")
            mgr.execute("SELECT %(p)s", {"p": SECRET_PARAM})
            proxy.reset(times=1)  # the pooled connection now, and the next one, are reset
            mark("retried")
            mgr.execute("SELECT 2")
            mark("refused")
            mgr.hosts[0].breaker.force_open()
            with contextlib.suppress(CircuitOpenError):
                mgr.execute("SELECT 3")
            mgr.hosts[0].breaker.reset()
            proxy.refuse()
            mgr.reconnect()  # drop the pooled connections: the insert must connect
            mark("spooled")
            result = mgr.insert("tracing_events", [(1, SECRET_PARAM)], ["id", "s"])
            assert result.spooled, result
            proxy.pass_through()
            mgr.reconnect()
            mark("delivered")
            mgr.insert("tracing_events", [(2, SECRET_PARAM)], ["id", "s"])
            mark("stream")
            assert len(list(mgr.execute_iter("SELECT number FROM system.numbers LIMIT 5"))) == 5
            mark("failed")
            with contextlib.suppress(ServerException):
                mgr.execute("SELECT no_such_column")
            mark("progress")
            client = ResilientClient(mgr)
            assert client.execute_with_progress("SELECT 4").get_result() == [(4,)]
            mark("end")
            mgr.execute("DROP TABLE IF EXISTS tracing_events")
    spans = [
        {
            "name": s.name,
            "kind": s.kind.name,
            "attributes": dict(s.attributes or {}),
            "events": [
                {"name": e.name, "attributes": dict(e.attributes or {})} for e in s.events
            ],
            "status": s.status.status_code.name,
            "description": s.status.description,
            "parent": s.parent is not None,
        }
        for s in exporter.get_finished_spans()
    ]
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        json.dump({"spans": spans, "marks": marks}, out)


if __name__ == "__main__":
    main()
