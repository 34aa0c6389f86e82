"""OpenTelemetry spans against the real server, read from the SDK's in-memory exporter.

The scenarios run in their own process (tracing_scenarios.py): a TracerProvider is set
once per process, and the rest of the suite must stay untraced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import ClickHouseEndpoint

HERE = Path(__file__).resolve().parent
SECRET_PARAM = "param-value-7f3a"


def run_scenarios(
    clickhouse: ClickHouseEndpoint, tmp_path: Path
) -> tuple[list[dict[str, Any]], str, dict[str, int]]:
    user, password = clickhouse.user, clickhouse.password
    if clickhouse.local is not None:  # a user with a password, to look for it in spans
        user, password = clickhouse.local.tester_user, clickhouse.local.password
    env = {
        **os.environ,
        "CH_HOST": clickhouse.host,
        "CH_PORT": str(clickhouse.port),
        "CH_USER": user,
        "CH_PASSWORD": password,
        "CH_DB": clickhouse.database,
        "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(HERE / "tracing_scenarios.py"), str(tmp_path / "spans.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads((tmp_path / "spans.json").read_text())
    return out["spans"], password, out["marks"]


def test_spans_follow_the_database_conventions_through_faults(
    clickhouse: ClickHouseEndpoint, tmp_path: Path
) -> None:
    spans, password, marks = run_scenarios(clickhouse, tmp_path)

    def between(start: str, end: str) -> list[dict[str, Any]]:
        return spans[marks[start] : marks[end]]

    assert all(s["kind"] == "CLIENT" and not s["parent"] for s in spans)  # one per call
    for span in spans:
        attrs = span["attributes"]
        assert attrs["db.system.name"] == "clickhouse"
        assert attrs["db.namespace"] == clickhouse.database
        assert attrs["db.operation.name"] == span["name"]
    text = json.dumps(spans)
    assert SECRET_PARAM not in text
    if password:
        assert password not in text

    (query,) = between("query", "retried")
    assert query["name"] == "SELECT" and query["status"] == "UNSET"
    assert query["attributes"]["db.query.text"] == "SELECT %(p)s"  # placeholders only
    assert query["attributes"]["server.address"] == "127.0.0.1"
    assert isinstance(query["attributes"]["server.port"], int)
    assert query["attributes"]["chresilient.breaker.state"] == "closed"

    (retried,) = between("retried", "refused")
    assert retried["status"] == "UNSET"
    events = [e for e in retried["events"] if e["name"] == "retry"]
    assert events, retried
    assert events[0]["attributes"]["chresilient.error_kind"] == "transport"
    assert events[0]["attributes"]["chresilient.retry_delay_s"] >= 0
    assert events[0]["attributes"]["error.type"]

    (refused,) = between("refused", "spooled")
    assert refused["status"] == "ERROR" and refused["description"] == "CircuitOpenError"
    assert refused["attributes"]["error.type"] == "CircuitOpenError"
    assert refused["attributes"]["chresilient.breaker.state"] == "open"

    (spooled,) = between("spooled", "delivered")
    assert spooled["name"] == "INSERT" and spooled["status"] == "UNSET"
    assert spooled["attributes"]["chresilient.spooled"] is True

    (delivered,) = between("delivered", "stream")
    assert delivered["name"] == "INSERT" and "chresilient.spooled" not in delivered["attributes"]
    assert delivered["attributes"]["db.query.text"].startswith("INSERT INTO")

    (stream,) = between("stream", "failed")
    assert stream["name"] == "SELECT" and stream["status"] == "UNSET"

    (failed,) = between("failed", "progress")
    assert failed["status"] == "ERROR" and failed["description"] == "ServerException"
    assert failed["attributes"]["error.type"] == "ServerException"  # the type, no message

    (progress,) = between("progress", "end")
    assert progress["name"] == "SELECT" and progress["attributes"]["db.query.text"] == "SELECT 4"
