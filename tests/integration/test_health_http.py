"""The health endpoints over real HTTP (a threaded wsgiref server) against real servers."""

from __future__ import annotations

import json
import logging
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import structlog
from clickhouse_driver.errors import ServerException
from flask import Flask
from helpers import (
    ConnectionCounter,
    free_port,
    make_config,
    subprocess_env,
    tcp_connections,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from chresilient import (
    AnalyticsTable,
    CircuitState,
    ClickHouseConnectionManager,
    ConnectionPoolConfig,
    StartupError,
    health_wsgi_app,
)
from chresilient.contrib.flask import init_app, manager_for
from chresilient.testing.faultproxy import FaultProxy
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
        # Without ?refresh=1 a report is reused (for 30 s): no new run.
        reused = call(url + BASE + "/dependencies").json()
        assert reused["checked_at"] == fresh["checked_at"] and cache.runs_total == runs + 1
        analytics = call(url + BASE + "/analytics")
        assert analytics.status == 200 and analytics.json()["overall_consistent"] is True
        consistency = mgr.monitor.consistency
        checks = consistency.runs_total
        again = call(url + BASE + "/analytics").json()
        assert again["checked_at"] == analytics.json()["checked_at"]
        assert consistency.runs_total == checks
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
        # Every family docs/health.md lists, with its labels.
        for name, labels in DOCUMENTED_FAMILIES.items():
            assert name in families, name
            samples = [s for s in families[name].samples if not s.name.endswith(("_bucket",))]
            assert samples, name
            for sample in samples:
                assert set(sample.labels) == labels, (name, sample.labels)
        states = {s.labels["state"] for s in families["chresilient_connection_state"].samples}
        assert {"connecting", "healthy", "degraded", "unhealthy"} <= states
        value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
        assert value["chresilient_queries_total"] == 5
        assert value["chresilient_query_duration_seconds_count"] == 5
        assert 0 < value["chresilient_query_duration_seconds_sum"] < 5
        breaker = families["chresilient_circuit_breaker_state"].samples[0]
        assert breaker.value == 0 and breaker.labels["host"] == mgr.hosts[0].label
        by_accept = call(url + BASE + "/metrics", headers={"Accept": "text/plain"})
        assert by_accept.headers["Content-Type"].startswith("text/plain")
        with pytest.raises(ServerException):
            mgr.execute("SELEC 1")  # a failed query: query_errors_total{kind}
        after = {f.name: f for f in text_string_to_metric_families(by_accept_text(url))}
        (error,) = after["chresilient_query_errors"].samples
        assert error.labels == {"kind": "deterministic"} and error.value == 1
        # gunicorn multiprocess mode: the app's shared metrics plus this worker's, by pid.
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        multi = call(url + BASE + "/metrics?format=prometheus").text
        assert 'chresilient_queries_total{pid="' in multi


# docs/health.md, "Prometheus": family -> its labels (one host; several-host series too).
DOCUMENTED_FAMILIES: dict[str, set[str]] = {
    "chresilient_queries": set(),
    "chresilient_retry_attempts": set(),
    "chresilient_query_duration_seconds": set(),
    "chresilient_circuit_breaker_state": {"host"},
    "chresilient_circuit_breaker_opens": {"host"},
    "chresilient_pool_connections": {"host", "state"},
    "chresilient_pool_overflow_connections": {"host"},
    "chresilient_pool_checkouts": {"host", "result"},
    "chresilient_connection_attempts": {"host", "outcome"},
    "chresilient_pool_discarded": {"host", "reason"},
    "chresilient_connection_state": {"state"},
    "chresilient_health_probe_up": {"host"},
    "chresilient_health_probe_duration_seconds": {"host"},
    "chresilient_spool_pending_rows": set(),
    "chresilient_spool_pending_batches": set(),
    "chresilient_host_queries": {"host"},
    "chresilient_host_query_errors": {"host"},
    "chresilient_replica_delay_seconds": {"host"},
    "chresilient_replica_lagging": {"host"},
    "chresilient_failovers": set(),
}


def by_accept_text(url: str) -> str:
    return call(url + BASE + "/metrics", headers={"Accept": "text/plain"}).text


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
        breaker = mgr.hosts[0].breaker
        breaker.force_open()
        assert breaker.state is CircuitState.OPEN
        ok = call(endpoint, method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status == 200 and ok.json()["reconnected"] is True
        assert mgr.hosts[0].pool.queue_pool is not old_pool  # a fresh pool
        assert breaker.state is CircuitState.CLOSED  # breakers reset
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


def test_an_unreachable_server_fails_dependencies_and_reconnect_with_503(
    clickhouse: Any,
) -> None:
    down = ClickHouseConnectionManager(make_config(clickhouse, port=free_port()))
    try:
        with serve(health_wsgi_app(down, reconnect_token=TOKEN)) as url:
            deps = call(url + BASE + "/dependencies")
            report = deps.json()
            assert deps.status == 503 and report["overall_status"] == "failed"
            assert "tcp" in report["failed_checks"]
            auth = {"Authorization": f"Bearer {TOKEN}"}
            reply = call(url + BASE + "/reconnect", method="POST", headers=auth)
            assert reply.status == 503 and reply.json()["reconnected"] is False
            (host,) = reply.json()["hosts"].values()
            assert host["ok"] is False and host["error"]
    finally:
        down.close()


def test_a_check_still_running_when_the_request_stops_waiting_is_504(
    clickhouse: Any, fault_proxy: FaultProxy
) -> None:
    # The handshake check waits on a server that accepts and never answers (5 s); the
    # request waits 0.3 s for it.
    mgr = ClickHouseConnectionManager(
        make_config(fault_proxy, auth=clickhouse, health_probe_timeout=5.0)
    )

    class Source:
        """The manager, with a short wait for checks."""

        check_timeout = 0.3

        def __getattr__(self, name: str) -> Any:
            return getattr(mgr, name)

    fault_proxy.blackhole()
    try:
        with serve(health_wsgi_app(Source())) as url:
            reply = call(url + BASE + "/dependencies")
            assert reply.status == 504 and "still running" in reply.json()["error"]
            assert mgr.monitor.dependencies.running  # the run goes on; a later request gets it
    finally:
        mgr.close()


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


# A worker of a multiprocess deployment (gunicorn): the application's own counter, a
# manager, and a scrape answered on request ("scrape <path>" on stdin).
WORKER = """
import sys
from prometheus_client import Counter
from chresilient import ClickHouseConnectionManager, Config
from chresilient.observability.prometheus import exposition

calls = int(sys.argv[1])
Counter("app_events", "Events the application took.").inc(calls)
with ClickHouseConnectionManager(Config.from_env()) as mgr:
    for _ in range(calls):
        mgr.execute("SELECT 1")
    exposition(mgr)  # each scrape a process answers publishes its totals
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, path = line.strip().partition(" ")
        if command == "scrape":
            with open(path, "wb") as out:
                out.write(exposition(mgr)[0])
            print("scraped", flush=True)
"""


def _answer(proc: subprocess.Popen[str], command: str | None = None) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    if command is not None:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, f"the worker did not answer {command!r}"
    return proc.stdout.readline().strip()


def test_multiprocess_mode_sums_app_metrics_and_drops_dead_workers(
    clickhouse: Any, tmp_path: Path
) -> None:
    """docs/health.md, gunicorn multiprocess mode: one scrape shows the application's own
    metrics and chresilient's totals summed over the workers; mark_process_dead (the
    child_exit hook) takes a dead worker out of the totals."""
    from prometheus_client.multiprocess import mark_process_dead

    shared = tmp_path / "prom"
    shared.mkdir()
    env = subprocess_env(clickhouse, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(shared))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(calls)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for calls in (2, 3)
    ]
    scrape = tmp_path / "scrape.txt"

    def scraped_by_first() -> dict[str, float]:
        assert _answer(workers[0], f"scrape {scrape}") == "scraped"
        text = scrape.read_text()
        return {
            s.name: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if not s.labels
        }

    try:
        assert [_answer(w) for w in workers] == ["ready", "ready"]
        both = scraped_by_first()
        assert both["app_events_total"] == 5  # the application's counter, summed
        assert both["chresilient_all_processes_queries_total"] == 5
        assert both["chresilient_all_processes_healthy"] == 2
        workers[1].kill()  # kill -9: its files stay behind
        workers[1].wait(30)
        assert scraped_by_first()["chresilient_all_processes_healthy"] == 2  # stale
        mark_process_dead(workers[1].pid, str(shared))  # what child_exit does
        alive = scraped_by_first()
        assert alive["chresilient_all_processes_healthy"] == 1
        assert alive["chresilient_all_processes_queries_total"] == 2
        assert alive["app_events_total"] == 5  # counters keep what dead workers counted
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait(30)
            for stream in (worker.stdin, worker.stdout):
                if stream is not None:
                    stream.close()
