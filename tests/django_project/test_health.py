"""The Django integration against a real ClickHouse (chresilient's pytest plugin) that the
tests kill and restart: the health URLs answer as the WSGI health app does, the startup
policies, the system check and ``manage.py chresilient``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from chresilient import StartupTimeoutError, health_wsgi_app
from chresilient.contrib.django import runtime
from chresilient.contrib.django.wsgi import get_wsgi_application

HERE = Path(__file__).resolve().parent
TOKEN = "reconnect-token-for-tests"
ROUTES = ("", "/connection", "/ready", "/metrics")


@pytest.fixture
def site(settings: Any, clickhouse_server: Any) -> Iterator[Any]:
    """The project pointed at the private server, its manager started in the background."""
    settings.CLICKHOUSE = {
        **settings.CLICKHOUSE,
        "url": f"clickhouse://default@{clickhouse_server.host}:{clickhouse_server.port}/default",
    }
    runtime.reset()
    mgr = runtime.start()
    try:
        yield mgr
    finally:
        runtime.reset()


def wsgi_status(mgr: Any, route: str) -> int:
    """What the plain WSGI health app answers for ``route`` right now."""
    got: list[str] = []
    app = health_wsgi_app(mgr, reconnect_token=TOKEN)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/health/clickhouse" + route}
    b"".join(app(environ, lambda status, headers, exc_info=None: got.append(status)))
    return int(got[0].split()[0])


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_health_urls_answer_like_the_wsgi_app_through_a_kill_and_restart(
    site: Any, clickhouse_server: Any
) -> None:
    client = Client()
    for route in ROUTES:
        response = client.get("/health/clickhouse" + route)
        assert response.status_code == 200 == wsgi_status(site, route), route
    assert client.get("/health/clickhouse").json()["status"] == "healthy"
    metrics = client.get("/health/clickhouse/metrics", HTTP_ACCEPT="text/plain")
    assert metrics["Content-Type"].startswith("text/plain")
    assert b"chresilient_queries_total" in metrics.content
    assert client.get("/health/clickhouse/nothing").status_code == 404

    clickhouse_server.kill()
    wait_for(lambda: client.get("/health/clickhouse/ready").status_code == 503)
    for route in ("", "/ready"):
        assert client.get("/health/clickhouse" + route).status_code == 503
        assert wsgi_status(site, route) == 503
    body = client.get("/health/clickhouse").json()
    assert body["status"] == "unhealthy" and body["reasons"]

    clickhouse_server.start()
    wait_for(lambda: client.get("/health/clickhouse/ready").status_code == 200)
    assert client.get("/health/clickhouse").status_code == 200 == wsgi_status(site, "")


def test_reconnect_needs_the_token_and_no_csrf_cookie(site: Any) -> None:
    client = Client(enforce_csrf_checks=True)
    assert client.post("/health/clickhouse/reconnect").status_code == 401
    wrong = client.post("/health/clickhouse/reconnect", HTTP_AUTHORIZATION="Bearer nope")
    assert wrong.status_code == 401
    ok = client.post("/health/clickhouse/reconnect", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert ok.status_code == 200 and ok.json()["reconnected"] is True
    assert client.get("/health/clickhouse/reconnect").status_code == 405


def test_required_startup_fails_the_worker_while_clickhouse_is_down(
    settings: Any, clickhouse_server: Any
) -> None:
    settings.CLICKHOUSE = {
        **settings.CLICKHOUSE,
        "url": f"clickhouse://default@{clickhouse_server.host}:{clickhouse_server.port}/default",
    }
    settings.CHRESILIENT_STARTUP = "required"
    settings.CHRESILIENT_STARTUP_TIMEOUT = 1.0
    clickhouse_server.kill()
    runtime.reset()
    try:
        with pytest.raises(StartupTimeoutError):
            get_wsgi_application()
        settings.CHRESILIENT_STARTUP = "wait"  # waits, then serves degraded
        runtime.reset()
        get_wsgi_application()
        assert runtime.get_manager().started
        assert Client().get("/health/clickhouse/ready").status_code == 503
    finally:
        runtime.reset()


def manage(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLICKHOUSE_URL": url, "DJANGO_SETTINGS_MODULE": "project.settings"}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_manage_check_reports_a_wrong_password_and_a_down_server(clickhouse_server: Any) -> None:
    where = f"{clickhouse_server.host}:{clickhouse_server.port}/default"
    refused = manage("check", url=f"clickhouse://tester:wrong-pass@{where}")
    assert refused.returncode != 0
    assert "chresilient.E002" in refused.stderr
    assert "wrong-pass" not in refused.stderr + refused.stdout
    ok = manage("check", url=f"clickhouse://default@{where}")
    assert ok.returncode == 0, ok.stderr
    clickhouse_server.kill()
    down = manage("check", url=f"clickhouse://default@{where}")
    assert down.returncode == 0 and "chresilient.W001" in down.stderr, down.stderr
    clickhouse_server.start()
    bad = manage("check", url="clickhouse://default@127.0.0.1:99999/default")
    assert bad.returncode != 0 and "chresilient.E001" in bad.stderr


def test_manage_chresilient_runs_the_cli_on_the_settings(clickhouse_server: Any) -> None:
    url = f"clickhouse://default@{clickhouse_server.host}:{clickhouse_server.port}/default"
    health = manage("chresilient", "health", "--json", url=url)
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] in ("healthy", "degraded")
    spool = manage("chresilient", "spool", "status", url=url)
    assert spool.returncode == 0, spool.stderr
    clickhouse_server.kill()
    try:
        waited = manage("chresilient", "wait", "--timeout", "1", url=url)
        assert waited.returncode != 0
    finally:
        clickhouse_server.start()


def test_other_commands_check_the_settings_but_do_not_wait_for_clickhouse(
    settings: Any, clickhouse_server: Any
) -> None:
    from django.core import management
    from django.core.management.base import SystemCheckError

    where = f"{clickhouse_server.host}:{clickhouse_server.port}/default"
    settings.CLICKHOUSE = {**settings.CLICKHOUSE, "url": f"clickhouse://default@{where}"}
    clickhouse_server.freeze()  # a connection check would wait CHRESILIENT_CHECK_TIMEOUT
    try:
        management.call_command("check")  # not `manage.py check`: the settings only
        settings.CHRESILIENT_CHECK_CONNECTION = True
        out = io.StringIO()
        management.call_command("check", stderr=out, stdout=out)
        assert "chresilient.W001" in out.getvalue()
    finally:
        clickhouse_server.thaw()
    settings.CHRESILIENT_CHECK_TIMEOUT = "abc"
    with pytest.raises(SystemCheckError, match=r"chresilient\.E001.*CHRESILIENT_CHECK_TIMEOUT"):
        management.call_command("check")


def test_routes_with_a_trailing_slash_answer_as_without(site: Any) -> None:
    client = Client()
    for route in ("/", "/ready/", "/connection/"):
        assert client.get("/health/clickhouse" + route).status_code == 200 == wsgi_status(
            site, route
        ), route
