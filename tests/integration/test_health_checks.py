"""Dependency validation and analytics consistency against real servers."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from socketserver import ThreadingMixIn, UnixStreamServer
from typing import Any

import pytest
from helpers import free_port, make_config

from chresilient import AnalyticsTable, ClickHouseConnectionManager, Config, ConfigError
from chresilient.health.consistency import normalize_type
from chresilient.statement import quote_identifier


@pytest.fixture(autouse=True)
def no_docker(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No Docker engine unless a test provides one (the host's must not decide results)."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")


def manager(server: Any, **changes: Any) -> ClickHouseConnectionManager:
    changes.setdefault("health_probe_timeout", 1.0)
    return ClickHouseConnectionManager(make_config(server, **changes))


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


def test_dependencies_pass_against_a_healthy_server(clickhouse: Any) -> None:
    with manager(clickhouse) as mgr:
        report = mgr.validate_service_dependencies()
    checks = by_name(report)
    assert report["overall_status"] == "passed", report
    assert list(checks) == [
        "dns",
        "tcp",
        "handshake",
        "authentication",
        "database",
        "query",
        "permissions_select",
        "permissions_insert",
        "replication",
        "container",
    ]
    for check in report["checks"]:
        assert {"name", "status", "duration_ms", "error"} <= set(check)
        assert check["status"] in ("passed", "skipped")
    assert checks["handshake"]["detail"]["version"].count(".") >= 2
    assert checks["handshake"]["detail"]["revision"] > 0
    assert checks["permissions_insert"]["status"] == "skipped"  # no analytics tables
    assert checks["replication"]["status"] == "skipped"
    assert "system.replicas is empty" in checks["replication"]["reason"]
    assert checks["container"]["status"] == "skipped"
    assert "no Docker socket" in checks["container"]["reason"]
    assert report["recommendations"] == []
    json.dumps(report)  # JSON-safe


def test_refused_port_names_the_native_port(clickhouse: Any) -> None:
    with manager(clickhouse, port=free_port()) as mgr:
        report = mgr.validate_service_dependencies()
    checks = by_name(report)
    assert report["overall_status"] == "failed"
    assert checks["dns"]["status"] == "passed"
    assert checks["tcp"]["status"] == "failed" and "refused" in checks["tcp"]["error"]
    assert all(checks[n]["status"] == "skipped" for n in ("handshake", "query", "replication"))
    (advice,) = report["recommendations"]
    assert "server up" in advice and "9000" in advice and "8123" in advice


def test_http_port_is_recognised(clickhouse_server: Any) -> None:
    # A private server: its HTTP port is always known (an external one's may not be).
    port = clickhouse_server.http_port
    with manager(clickhouse_server, port=port, health_probe_timeout=0.5) as mgr:
        report = mgr.validate_service_dependencies()
    checks = by_name(report)
    assert checks["tcp"]["status"] == "passed"
    assert checks["handshake"]["status"] == "failed"
    assert "HTTP" in checks["handshake"]["error"]
    assert any("HTTP interface" in r and "9000" in r for r in report["recommendations"])


def test_unresolvable_host_fails_dns(clickhouse: Any) -> None:
    with manager(clickhouse, host="no-such-host.invalid") as mgr:
        report = mgr.validate_service_dependencies()
    checks = by_name(report)
    assert checks["dns"]["status"] == "failed"
    assert checks["tcp"]["status"] == "skipped"
    assert any("CLICKHOUSE_HOST" in r for r in report["recommendations"])


def test_wrong_password_and_unknown_database(clickhouse_server: Any) -> None:
    secret = clickhouse_server.password + "-wrong"
    wrong = make_config(clickhouse_server, user="tester", password=secret, health_probe_timeout=1.0)
    with ClickHouseConnectionManager(wrong) as mgr:
        report = mgr.validate_service_dependencies()
    checks = by_name(report)
    assert checks["handshake"]["status"] == "passed"  # the server answered, then refused
    assert checks["authentication"]["status"] == "failed"
    assert checks["database"]["status"] == "skipped"
    assert any("CLICKHOUSE_PASSWORD" in r for r in report["recommendations"])
    assert secret not in json.dumps(report)

    with manager(clickhouse_server, database="no_such_db") as mgr:
        report = mgr.validate_service_dependencies()
    checks = by_name(report)
    assert checks["authentication"]["status"] == "passed"
    assert checks["database"]["status"] == "failed"
    assert any("CLICKHOUSE_DB" in r for r in report["recommendations"])


@pytest.fixture
def tables(client: Any) -> Iterator[dict[str, str]]:
    """Fresh tables on the session server (names with a backtick and a space)."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "good": f"ev`ents {suffix}",
        "log": f"log_{suffix}",
        "missing": f"gone_{suffix}",
        "probe": f"_probe_{suffix}",
    }
    good = quote_identifier(names["good"])
    client.execute(
        f"CREATE TABLE {good} (id UInt64, name String, amount Decimal(12, 3)) "
        "ENGINE = MergeTree ORDER BY id"
    )
    client.execute(
        f"CREATE TABLE {quote_identifier(names['log'])} (id UInt32, name String) ENGINE = Log"
    )
    yield names
    for name in names.values():
        client.execute(f"DROP TABLE IF EXISTS {quote_identifier(name)}")


def expected_tables(names: dict[str, str]) -> tuple[AnalyticsTable, ...]:
    return (
        AnalyticsTable(
            names["good"],
            (("id", "UInt64"), ("name", "String"), ("amount", "Decimal(12,3)")),
            "MergeTree",
        ),
        AnalyticsTable(
            names["log"], {"id": "UInt64", "name": "String", "ts": "DateTime"}, "MergeTree"
        ),
        AnalyticsTable(names["missing"], (("id", "UInt64"),)),
    )


def test_permissions_with_analytics_tables(clickhouse: Any, tables: dict[str, str]) -> None:
    analytics = expected_tables(tables)[:2]
    with manager(clickhouse, analytics_tables=analytics) as mgr:
        checks = by_name(mgr.validate_service_dependencies())
    assert checks["permissions_select"]["status"] == "passed"
    assert checks["permissions_insert"]["status"] == "passed"
    assert checks["permissions_insert"]["detail"]["rows_written"] == 0
    with manager(clickhouse, analytics_tables=analytics, settings={"readonly": 2}) as mgr:
        report = mgr.validate_service_dependencies()
    checks = by_name(report)
    assert checks["permissions_select"]["status"] == "passed"
    assert checks["permissions_insert"]["status"] == "failed"
    assert "readonly" in checks["permissions_insert"]["error"]
    assert any("INSERT" in r for r in report["recommendations"])
    assert clickhouse.client().execute(
        f"SELECT count() FROM {quote_identifier(tables['good'])}"
    ) == [(0,)]


class _ThreadingUnixServer(ThreadingMixIn, UnixStreamServer):
    daemon_threads = True


def fake_docker(path: str, containers: list[dict[str, Any]]) -> _ThreadingUnixServer:
    """A Docker engine API on a unix socket that lists ``containers``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(containers).encode()
            self.send_response(200 if self.path.startswith("/containers/json") else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def address_string(self) -> str:
            return "docker"

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = _ThreadingUnixServer(path, Handler)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return server


@pytest.mark.parametrize(
    ("status", "expected"),
    [("Up 3 minutes (healthy)", "passed"), ("Up 3 minutes (unhealthy)", "failed")],
)
def test_container_health_from_a_docker_socket(
    clickhouse: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, status: str, expected: str
) -> None:
    path = os.path.join(tmp_path, "docker.sock")
    server = fake_docker(
        path,
        [
            {
                "Names": ["/web"],
                "Image": "python:3",
                "State": "running",
                "Status": "Up",
                "Ports": [],
            },
            {
                "Names": ["/ch"],
                "Image": "example/db",
                "State": "running",
                "Status": status,
                "Ports": [{"PrivatePort": 9000, "PublicPort": clickhouse.port, "Type": "tcp"}],
            },
        ],
    )
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    try:
        with manager(clickhouse) as mgr:
            report = mgr.validate_service_dependencies()
    finally:
        server.shutdown()
        server.server_close()
    check = by_name(report)["container"]
    assert check["status"] == expected
    assert check["detail"]["container"] == "ch"
    if expected == "failed":
        assert "docker logs ch" in check["recommendation"]


# -- analytics consistency --------------------------------------------------------------
def test_consistency_reports_missing_and_mismatched_tables_by_name(
    clickhouse: Any, client: Any, tables: dict[str, str]
) -> None:
    # An extra column is listed, and is not a problem.
    client.execute(f"ALTER TABLE {quote_identifier(tables['good'])} ADD COLUMN x UInt8")
    cfg_changes = dict(
        analytics_tables=expected_tables(tables), analytics_probe_table=tables["probe"]
    )
    with manager(clickhouse, **cfg_changes) as mgr:
        report = mgr.ensure_analytics_consistency()
        again = mgr.ensure_analytics_consistency()
    found = {t["table"]: t for t in report["tables"]}
    assert report["overall_consistent"] is False
    good, log, missing = (found[tables[k]] for k in ("good", "log", "missing"))
    assert good["consistent"] and good["read"]["ok"] and good["problems"] == []
    assert good["extra_columns"] == ["x"]
    assert missing["exists"] is False and missing["problems"] == ["table is missing"]
    assert log["type_mismatches"] == [{"column": "id", "expected": "UInt64", "actual": "UInt32"}]
    assert log["missing_columns"] == ["ts"]
    assert log["engine"] == {"expected": "MergeTree", "actual": "Log"}
    text = " | ".join(report["problems"])
    for name in (tables["log"], tables["missing"]):
        assert name in text
    assert report["write_probe"]["status"] == "ok" and report["write_probe"]["created"]
    assert again["write_probe"]["status"] == "ok" and not again["write_probe"]["created"]


def test_consistency_passes_and_write_probe_needs_permission(
    clickhouse: Any, client: Any, tables: dict[str, str]
) -> None:
    good = expected_tables(tables)[:1]
    with manager(clickhouse, analytics_tables=good, analytics_probe_table=tables["probe"]) as mgr:
        report = mgr.ensure_analytics_consistency()
    assert report["overall_consistent"] is True, report["problems"]
    # analytics_probe_table=None: no write probe, and no table made for it.
    listed = "SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name"
    before = client.execute(listed)
    with manager(clickhouse, analytics_tables=good, analytics_probe_table=None) as mgr:
        report = mgr.ensure_analytics_consistency()
    assert report["write_probe"] == {"status": "not_verifiable", "reason": "write probe disabled"}
    assert report["overall_consistent"] is True
    assert client.execute(listed) == before
    # Read-only session: reading works, the probe table cannot be created or written.
    probe = tables["probe"] + "_ro"
    with manager(
        clickhouse, analytics_tables=good, analytics_probe_table=probe, settings={"readonly": 2}
    ) as mgr:
        report = mgr.ensure_analytics_consistency()
    assert report["write_probe"]["status"] == "not_verifiable"
    assert "create" in report["write_probe"]["reason"]
    assert report["overall_consistent"] is True  # schema fine; the write is unknown, not failed
    with manager(
        clickhouse,
        analytics_tables=good,
        analytics_probe_table=tables["probe"],
        settings={"readonly": 2},
    ) as mgr:
        report = mgr.ensure_analytics_consistency()
    assert report["write_probe"]["status"] == "failed"  # the table exists but takes no rows
    assert report["overall_consistent"] is False


def test_consistency_when_the_server_is_down(clickhouse_server: Any) -> None:
    tables = (AnalyticsTable("events", (("id", "UInt64"),)),)
    with manager(clickhouse_server, analytics_tables=tables) as mgr:
        clickhouse_server.kill()
        report = mgr.ensure_analytics_consistency()
    assert report["overall_consistent"] is False
    assert report["error"] and report["tables"] == []


def test_identifier_quoting_and_type_normalisation() -> None:
    assert quote_identifier("a`b\\c") == "`a\\`b\\\\c`"
    assert quote_identifier("x; DROP TABLE y") == "`x; DROP TABLE y`"
    assert normalize_type(" Decimal(12,  3) ") == normalize_type("Decimal(12,3)")
    assert normalize_type("Enum8('a b' = 1)") == "Enum8('a b'=1)"
    assert normalize_type("UInt32") != normalize_type("UInt64")


def test_analytics_config_validation() -> None:
    table = AnalyticsTable("events", {"id": "UInt64"}, "MergeTree")
    assert table.columns == (("id", "UInt64"),)
    cfg = Config(analytics_tables=[{"name": "events", "columns": [("id", "UInt64")]}])
    assert cfg.analytics_tables == (AnalyticsTable("events", (("id", "UInt64"),)),)
    with pytest.raises(ConfigError, match=r"analytics_tables\['events'\].columns"):
        AnalyticsTable("events", (("id",),))
    with pytest.raises(ConfigError, match="analytics_tables"):
        Config(analytics_tables="events")
    with pytest.raises(ConfigError, match="analytics_tables"):
        Config(analytics_tables=[{"name": "e", "colums": ()}])
    with pytest.raises(ConfigError, match="consistency_check_interval"):
        Config(consistency_check_interval=0)
    with pytest.raises(ConfigError, match="health_probe_timeout"):
        Config(health_probe_timeout=-1)
    with pytest.raises(ConfigError, match="analytics_probe_table"):
        Config(analytics_probe_table=" ")
