"""The health endpoints over real HTTP (a threaded wsgiref server) against real servers."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any
from urllib.parse import quote

import pytest
import structlog
from flask import Flask
from helpers import ConnectionCounter, make_config, tcp_connections, wait_until
from prometheus_client.parser import text_string_to_metric_families

from chresilient import (
    AnalyticsTable,
    ClickHouseConnectionManager,
    ConnectionPoolConfig,
    StartupError,
    health_wsgi_app,
)
from chresilient.contrib.flask import init_app, manager_for
from chresilient.testing.http import request as call
from chresilient.testing.http import serve_wsgi as serve

BASE = "/health/clickhouse"
TOKEN = "t0ken-for-tests"


@pytest.fixture
def mgr(clickhouse: Any) -> Any:
    manager = ClickHouseConnectionManager(
        make_config(clickhouse, pool=ConnectionPoolConfig(health_check_interval=0.5))
    )
    manager.start(wait=True, timeout=10)
    yield manager
    manager.close()


def test_routes_status_codes_and_content_types(mgr: Any) -> None:
    with serve(health_wsgi_app(mgr)) as url:
        health = call(url + BASE)
        assert health.status == 200
        assert health.headers["Content-Type"].startswith("application/json")
        body = health.json()
        assert body["status"] == "healthy" and body["connection_state"] == "healthy"
        for key in (
            "timestamp",
            "probe",
            "breaker",
            "pool",
            "server",
            "dependency_validation",
            "analytics_consistency",
            "monitor",
        ):
            assert key in body
        assert body["dependency_validation"]["overall_status"] == "not_run"
        assert call(url + BASE + "/").status == 200
        ready = call(url + BASE + "/ready")
        assert (ready.status, ready.json()) == (200, {"ready": True, "status": "healthy"})
        connection = call(url + BASE + "/connection").json()
        (host,) = connection["hosts"].values()
        assert host["probe"]["ok"] and host["breaker"]["state"] == "closed"
        assert host["server"]["version"]
        deps = call(url + BASE + "/dependencies")
        assert deps.status == 200 and deps.json()["overall_status"] == "passed"
        # Cached: the summary in health() now shows the same run.
        assert (
            call(url + BASE).json()["dependency_validation"]["checked_at"]
            == (deps.json()["checked_at"])
        )
        cache = mgr.monitor.dependencies
        runs = cache.runs_total
        time.sleep(1.1)  # older than what a refresh accepts
        fresh = call(url + BASE + "/dependencies?refresh=1").json()
        assert cache.runs_total == runs + 1 and fresh["checked_at"] > deps.json()["checked_at"]
        # Refreshes right behind it (a wave of queued requests) share that run.
        for _ in range(3):
            again = call(url + BASE + "/dependencies?refresh=1").json()
            assert again["checked_at"] == fresh["checked_at"]
        assert cache.runs_total == runs + 1
        analytics = call(url + BASE + "/analytics")
        assert analytics.status == 200 and analytics.json()["overall_consistent"] is True
        assert call(url + "/nope").status == 404
        assert call(url + BASE + "/nope").status == 404
        wrong = call(url + BASE, method="POST")
        assert wrong.status == 405 and wrong.headers["Allow"] == "GET, HEAD"
        assert call(url + BASE + "/reconnect").status == 405
        head = call(url + BASE + "/ready", method="HEAD")
        assert head.status == 200 and head.body == b""


def test_mounted_under_a_prefix(mgr: Any) -> None:
    app = health_wsgi_app(mgr, show_details=False)

    def mount(prefix: str) -> Any:
        def dispatcher(environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "")
            if not path.startswith(prefix):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"outside"]
            environ = {**environ, "SCRIPT_NAME": prefix, "PATH_INFO": path[len(prefix) :]}
            return app(environ, start_response)

        return dispatcher

    with serve(mount("/ops")) as url:
        reply = call(url + "/ops" + BASE)
        assert reply.status == 200
        assert set(reply.json()) == {"status", "timestamp", "connection_state"}  # no details
        assert call(url + "/ops" + BASE + "/ready").status == 200
        assert call(url + BASE).status == 404
    with serve(mount(BASE)) as url:  # mounted at the base path itself
        assert call(url + BASE + "/ready").json()["ready"] is True
        assert call(url + BASE).json()["status"] == "healthy"


def test_metrics_json_and_prometheus(
    mgr: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for i in range(5):
        mgr.execute("SELECT %(i)s", {"i": i})
    wait_until(lambda: mgr.monitor.probe.latest is not None, timeout=15, what="a probe")
    with serve(health_wsgi_app(mgr)) as url:
        data = call(url + BASE + "/metrics").json()
        for key in (
            "connection_attempts",
            "successful_connections",
            "failed_connections",
            "retry_attempts",
            "circuit_breaker_opens",
            "pool_hits",
            "pool_misses",
            "connection_state",
            "consecutive_failures",
            "last_successful_connection",
            "circuit_breaker_state",
            "checked_out",
            "idle",
            "overflow",
            "pending_batches",
            "pending_rows",
        ):
            assert key in data, key
        prom = call(url + BASE + "/metrics?format=prometheus")
        assert prom.status == 200 and prom.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(prom.text)}
        for name in (
            "chresilient_queries",
            "chresilient_query_duration_seconds",
            "chresilient_circuit_breaker_state",
            "chresilient_pool_connections",
            "chresilient_spool_pending_rows",
            "chresilient_health_probe_up",
        ):
            assert name in families, name
        value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
        assert value["chresilient_queries_total"] == 5
        assert value["chresilient_query_duration_seconds_count"] == 5
        assert 0 < value["chresilient_query_duration_seconds_sum"] < 5
        breaker = families["chresilient_circuit_breaker_state"].samples[0]
        assert breaker.value == 0 and breaker.labels["host"] == mgr.hosts[0].label
        by_accept = call(url + BASE + "/metrics", headers={"Accept": "text/plain"})
        assert by_accept.headers["Content-Type"].startswith("text/plain")
        # gunicorn multiprocess mode: the app's shared metrics plus this worker's, by pid.
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        multi = call(url + BASE + "/metrics?format=prometheus").text
        assert 'chresilient_queries_total{pid="' in multi


def test_reconnect_needs_the_bearer_token(mgr: Any) -> None:
    with serve(health_wsgi_app(mgr)) as url:
        disabled = call(url + BASE + "/reconnect", method="POST")
        assert disabled.status == 403 and "disabled" in disabled.json()["error"]
    with serve(health_wsgi_app(mgr, reconnect_token=TOKEN)) as url:
        endpoint = url + BASE + "/reconnect"
        missing = call(endpoint, method="POST")
        assert missing.status == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = call(endpoint, method="POST", headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        old_pool = mgr.hosts[0].pool.queue_pool
        ok = call(endpoint, method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status == 200 and ok.json()["reconnected"] is True
        assert mgr.hosts[0].pool.queue_pool is not old_pool  # a fresh pool
        # Concurrent requests all answer (that they share one run: the next test).
        replies: list[Any] = []
        threads = [
            threading.Thread(
                target=lambda: replies.append(
                    call(endpoint, method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
                )
            )
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert [r.status for r in replies] == [200] * 4
        assert mgr.execute("SELECT 1") == [(1,)]


def test_health_request_opens_at_most_one_connection(clickhouse_server: Any) -> None:
    cfg = make_config(clickhouse_server, user="tester", password=clickhouse_server.password)
    mgr = ClickHouseConnectionManager(cfg)  # not started: no monitor, an empty pool
    counter = ConnectionCounter(clickhouse_server)
    try:
        with serve(health_wsgi_app(mgr)) as url:
            replies: list[Any] = []
            threads = [
                threading.Thread(target=lambda: replies.append(call(url + BASE))) for _ in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(20)
            replies += [call(url + BASE) for _ in range(5)]
            replies.append(call(url + BASE + "/connection"))
            replies.append(call(url + BASE + "/ready"))
        assert [r.status for r in replies] == [200] * 15
        assert counter.accepted() == 1
        assert mgr.hosts[0].pool.stats.connect_attempts == 1
    finally:
        counter.close()
        mgr.close()


def test_monitor_checks_consistency_and_health_degrades(clickhouse: Any) -> None:
    tables = (AnalyticsTable("chresilient_no_such_table", (("id", "UInt64"),)),)
    mgr = ClickHouseConnectionManager(
        make_config(
            clickhouse,
            pool=ConnectionPoolConfig(health_check_interval=0.2),
            analytics_tables=tables,
            consistency_check_interval=0.5,
        )
    )
    try:
        mgr.start(wait=True, timeout=10)
        wait_until(
            lambda: mgr.monitor.consistency.latest is not None,
            timeout=15,
            what="the monitor's first consistency check",
        )
        first = mgr.monitor.consistency.at_wall
        wait_until(
            lambda: mgr.monitor.consistency.at_wall != first,
            timeout=15,
            what="a second consistency check",
        )
        with serve(health_wsgi_app(mgr)) as url:
            health = call(url + BASE)
            assert health.status == 200 and health.json()["status"] == "degraded"
            summary = health.json()["analytics_consistency"]
            assert summary["overall_consistent"] is False
            assert any("chresilient_no_such_table" in p for p in summary["problems"])
            analytics = call(url + BASE + "/analytics")
            assert analytics.status == 503
            assert call(url + BASE + "/ready").status == 200  # degraded is still ready
    finally:
        mgr.close()


def test_password_never_leaks(
    clickhouse_server: Any, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    password = clickhouse_server.password
    assert any(ch in password for ch in "@:/#&<>")
    wrong = password + "-wrong"
    secrets = {password, wrong, quote(password, safe=""), quote(wrong, safe="")}
    texts: list[str] = []
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        good = ClickHouseConnectionManager(
            make_config(
                clickhouse_server,
                user="tester",
                password=password,
                pool=ConnectionPoolConfig(health_check_interval=0.2),
                health_probe_timeout=0.5,
                analytics_tables=(AnalyticsTable("missing_table", (("id", "UInt64"),)),),
            )
        )
        bad = ClickHouseConnectionManager(
            make_config(clickhouse_server, user="tester", password=wrong, health_probe_timeout=0.5)
        )
        try:
            good.start(wait=True, timeout=10)
            started = time.monotonic()
            with pytest.raises(StartupError, match="authentication") as failure:
                bad.start(wait=True, timeout=30)
            assert time.monotonic() - started < 10  # at once, not after the 30 s wait
            texts += [str(failure.value), repr(failure.value), repr(bad.config)]
            for app_mgr in (good, bad):
                with serve(health_wsgi_app(app_mgr, reconnect_token=TOKEN)) as url:
                    for path in (
                        "",
                        "/connection",
                        "/metrics",
                        "/metrics?format=prometheus",
                        "/dependencies",
                        "/analytics",
                        "/ready",
                        "/nope",
                    ):
                        texts.append(call(url + BASE + path).text)
                    texts.append(
                        call(
                            url + BASE + "/reconnect",
                            method="POST",
                            headers={"Authorization": f"Bearer {TOKEN}"},
                        ).text
                    )
                    clickhouse_server.kill() if app_mgr is good else None
                    wait_until(lambda m=app_mgr: m.health()["status"] == "unhealthy", timeout=15)
                    texts += [
                        call(url + BASE).text,
                        call(url + BASE + "/dependencies?refresh=1").text,
                    ]
                    clickhouse_server.start()
        finally:
            good.close()
            bad.close()
    texts += [json.dumps(entry, default=str) for entry in logs]
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.exc_info) for record in caplog.records if record.exc_info]
    captured = capsys.readouterr()
    texts += [captured.out, captured.err]
    assert any("CLICKHOUSE_PASSWORD" in text for text in texts)  # the advice is there
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_flask_init_app(clickhouse: Any) -> None:
    app = Flask("demo")
    app.config["CHRESILIENT_RECONNECT_TOKEN"] = TOKEN

    @app.route("/hello")
    def hello() -> str:
        return "hi"

    mgr = ClickHouseConnectionManager(make_config(clickhouse))
    try:
        assert init_app(app, mgr, url_prefix="/ops") is mgr
        assert manager_for(app) is mgr and mgr.started  # started without waiting
        rules = {rule.rule for rule in app.url_map.iter_rules()}
        assert "/ops" + BASE in rules
        with serve(app) as url:
            assert call(url + "/hello").text == "hi"
            wait_until(lambda: call(url + "/ops" + BASE).status == 200, timeout=15)
            assert call(url + "/ops" + BASE).json()["status"] == "healthy"
            assert call(url + "/ops" + BASE + "/ready").json()["ready"] is True
            prom = call(url + "/ops" + BASE + "/metrics?format=prometheus")
            assert "chresilient_queries_total" in prom.text
            assert call(url + "/ops" + BASE + "/reconnect", method="POST").status == 401
            ok = call(
                url + "/ops" + BASE + "/reconnect",
                method="POST",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert ok.status == 200
            assert call(url + "/ops" + BASE + "/nope").status == 404
    finally:
        mgr.close()


def _post_raw(url: str, path: str, authorization: bytes) -> int:
    """POST with raw header bytes (a UTF-8 token), the way a browser or curl sends them."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(
            b"POST " + path.encode() + b" HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n"
            b"Authorization: Bearer " + authorization + b"\r\n\r\n"
        )
        head = sock.recv(64)
    return int(head.split(b" ")[1])


def test_reconnect_token_bytes_and_file_newline(mgr: Any) -> None:
    token = "jeton-élevé-€"
    # A token read from a file ends with a newline; the sent one never does.
    with serve(health_wsgi_app(mgr, reconnect_token=token + "\n")) as url:
        path = BASE + "/reconnect"
        assert _post_raw(url, path, token.encode("utf-8")) == 200
        assert _post_raw(url, path, b"jeton") == 401
        assert _post_raw(url, path, token.encode("utf-8") + b"x") == 401


def test_reconnect_on_a_closed_manager_is_503(clickhouse: Any) -> None:
    closed = ClickHouseConnectionManager(make_config(clickhouse))
    closed.close()
    with serve(health_wsgi_app(closed, reconnect_token=TOKEN)) as url:
        reply = call(
            url + BASE + "/reconnect", method="POST", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert reply.status == 503 and "closed" in reply.json()["error"]


def test_metrics_negotiation_and_pool_series_partition(clickhouse: Any, client: Any) -> None:
    open_before = tcp_connections(client)
    pool = ConnectionPoolConfig(pool_size=1, max_connections=3)
    manager = ClickHouseConnectionManager(make_config(clickhouse, pool=pool))
    streams = []
    try:
        # Three open connections: two held by streams, one back in the pool.
        for _ in range(3):
            rows = manager.execute_iter("SELECT number FROM system.numbers LIMIT 3")
            assert next(rows) == (0,)
            streams.append(rows)
        assert list(streams.pop()) == [(1,), (2,)]
        assert tcp_connections(client) - open_before == 3
        with serve(health_wsgi_app(manager)) as url:
            browser = {"Accept": "application/json, text/plain, */*"}
            reply = call(url + BASE + "/metrics", headers=browser)
            assert reply.headers["Content-Type"].startswith("application/json")
            text = call(url + BASE + "/metrics?format=PROMETHEUS")
            assert text.headers["Content-Type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(text.text)}
        samples = families["chresilient_pool_connections"].samples
        series = {s.labels["state"]: s.value for s in samples}
        assert series == {"checked_out": 2.0, "idle": 1.0}  # 3 open connections, no overlap
        overflow = families["chresilient_pool_overflow_connections"].samples[0].value
        assert overflow == 2.0  # beyond pool_size=1
    finally:
        for rows in streams:
            list(rows)
        manager.close()


def test_concurrent_reconnect_requests_share_one_run(mgr: Any) -> None:
    entered = threading.Semaphore(0)
    all_in = threading.Event()
    runs: list[float] = []

    class Source:
        """The manager, with its reconnect held until all four requests are in."""

        def __getattr__(self, name: str) -> Any:
            return getattr(mgr, name)

        def reconnect(self) -> Any:
            runs.append(time.monotonic())
            assert all_in.wait(20)
            return mgr.reconnect()

    inner = health_wsgi_app(Source(), reconnect_token=TOKEN)

    def counting(environ: Any, start_response: Any) -> Any:
        entered.release()
        return inner(environ, start_response)

    with serve(counting) as url:
        endpoint = url + BASE + "/reconnect"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        replies: list[Any] = []
        threads = [
            threading.Thread(target=lambda: replies.append(call(endpoint, "POST", auth)))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for _ in range(4):
            assert entered.acquire(timeout=20)
        time.sleep(0.5)  # from the WSGI entry to joining the flight: microseconds; a margin
        all_in.set()
        for thread in threads:
            thread.join(20)
    assert [r.status for r in replies] == [200] * 4
    assert len(runs) == 1  # one reconnect served all four
    assert len({json.dumps(r.json(), sort_keys=True) for r in replies}) == 1
