"""The chresilient command, run as a subprocess against real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import free_port, wait_until
from helpers import subprocess_env as _env

from chresilient.testing.http import request

VERBS = ("wait", "check", "health", "metrics", "spool", "schema", "serve")


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chresilient", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb: str) -> None:
    result = run_cli([verb, "--help"], dict(os.environ))
    assert result.returncode == 0
    assert "usage: chresilient" in result.stdout


def test_bad_configuration_names_the_variable(tmp_path: Path) -> None:
    env = dict(os.environ, CLICKHOUSE_PORT="ninety")
    result = run_cli(["health"], env)
    assert result.returncode == 2
    assert "CLICKHOUSE_PORT" in result.stderr


def test_wait_ready_and_not_ready(clickhouse: Any, tmp_path: Path) -> None:
    ok = run_cli(["wait", "--timeout", "10"], _env(clickhouse, tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert "ready" in ok.stdout
    down = _env(clickhouse, tmp_path, CLICKHOUSE_PORT=str(free_port()))
    started = time.monotonic()
    result = run_cli(["wait", "--timeout", "1.5"], down)
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert "refused" in result.stderr  # progress lines say why it waits
    assert "not ready" in result.stderr


def test_wait_wrong_password_is_fatal_and_secret(clickhouse_server: Any, tmp_path: Path) -> None:
    secret = clickhouse_server.password + "x"
    env = _env(
        clickhouse_server,
        tmp_path,
        CLICKHOUSE_USER=clickhouse_server.tester_user,
        CLICKHOUSE_PASSWORD=secret,
    )
    result = run_cli(["wait", "--timeout", "30"], env)
    assert result.returncode == 3
    assert "authentication" in result.stderr
    assert secret not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "args",
    [["wait"], ["check"], ["health"], ["metrics"], ["spool", "replay"], ["serve", "--port", "0"]],
    ids=lambda args: args[0],
)
def test_wrong_password_exits_3_for_every_subcommand(
    clickhouse: Any, tmp_path: Path, args: list[str]
) -> None:
    secret = "not-the-password-123"
    env = _env(clickhouse, tmp_path, CLICKHOUSE_USER="tester", CLICKHOUSE_PASSWORD=secret)
    result = run_cli([*args, "--timeout", "20"], env, timeout=60)
    assert result.returncode == 3, (result.returncode, result.stderr[-500:])
    assert "CLICKHOUSE_PASSWORD" in result.stderr + result.stdout  # the advice
    assert secret not in result.stderr + result.stdout


def test_an_unknown_user_exits_3_at_once(clickhouse: Any, tmp_path: Path) -> None:
    user = f"nobody_{uuid.uuid4().hex[:8]}"
    env = _env(clickhouse, tmp_path, CLICKHOUSE_USER=user, CLICKHOUSE_PASSWORD="")
    started = time.monotonic()
    result = run_cli(["wait", "--timeout", "60"], env, timeout=120)
    assert result.returncode == 3, (result.returncode, result.stderr[-500:])
    assert time.monotonic() - started < 60  # not the wait's timeout: waiting cannot fix it
    assert "authentication" in result.stderr and "CLICKHOUSE_USER" in result.stderr


def test_check_reports_a_down_server_within_seconds(tmp_path: Path) -> None:
    down = SimpleNamespace(host="127.0.0.1", port=free_port())
    started = time.monotonic()
    result = run_cli(["check", "--json"], _env(down, tmp_path), timeout=60)
    took = time.monotonic() - started
    report = json.loads(result.stdout)
    assert result.returncode == 1 and not report["ok"]
    assert report["scenarios"][0]["scenario"] == "manager initialisation"
    assert "refused" in report["scenarios"][0]["reason"]
    assert took < 50  # a hang guard: the default startup wait is 5 s


def test_check_passes_on_a_healthy_server_with_simulated_faults(
    clickhouse: Any, tmp_path: Path
) -> None:
    result = run_cli(["check", "--json", "--simulate-failure"], _env(clickhouse, tmp_path))
    report = json.loads(result.stdout)
    failed = [s for s in report["scenarios"] if not s["ok"]]
    assert result.returncode == 0 and report["ok"], failed
    names = [s["scenario"] for s in report["scenarios"]]
    for expected in (
        "manager initialisation",
        "connection retry",
        "service dependency validation",
        "analytics consistency",
        "health endpoints",
        "graceful degradation",
        "simulated: refused connections",
        "simulated: connection reset mid-result",
        "simulated: added latency",
        "simulated: black-holed server",
    ):
        assert expected in names
    assert all(s["figure"] for s in report["scenarios"])


def test_check_fails_with_a_reason_on_a_stopped_server(clickhouse: Any, tmp_path: Path) -> None:
    env = _env(clickhouse, tmp_path, CLICKHOUSE_PORT=str(free_port()))
    result = run_cli(["check", "--timeout", "1"], env)
    assert result.returncode == 1
    assert "FAIL  manager initialisation" in result.stdout
    assert "refused" in result.stdout.lower()


def test_health_and_metrics(clickhouse: Any, tmp_path: Path) -> None:
    env = _env(clickhouse, tmp_path)
    health = run_cli(["health", "--json"], env)
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] in ("healthy", "degraded")
    metrics = run_cli(["metrics"], env)
    assert metrics.returncode == 0
    assert "connection_attempts" in json.loads(metrics.stdout)
    prom = run_cli(["metrics", "--prometheus"], env)
    assert prom.returncode == 0
    assert "chresilient_queries_total" in prom.stdout
    down = run_cli(
        ["health", "--timeout", "1"], _env(clickhouse, tmp_path, CLICKHOUSE_PORT=str(free_port()))
    )
    assert down.returncode == 1
    assert "unhealthy" in down.stdout


def test_spool_verbs(clickhouse: Any, tmp_path: Path) -> None:
    env = _env(clickhouse, tmp_path)
    status = run_cli(["spool", "status"], env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pending_batches"] == 0
    refused = run_cli(["spool", "purge"], env)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    purged = run_cli(["spool", "purge", "--yes"], env)
    assert purged.returncode == 0 and "purged 0 batches" in purged.stdout
    replay = run_cli(["spool", "replay"], env)
    assert replay.returncode == 0, replay.stderr


def test_serve_answers_http_and_stops_on_sigterm(clickhouse: Any, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chresilient", "serve", "--port", str(port)],
        env=_env(clickhouse, tmp_path, CHRESILIENT_RECONNECT_TOKEN="s1decar-token"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/health/clickhouse"
    try:

        def answers() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return int(response.status) == 200
            except OSError:
                return False

        wait_until(answers, timeout=30, what="the sidecar to answer")
        with urllib.request.urlopen(url, timeout=5) as response:
            assert json.loads(response.read())["status"] in ("healthy", "degraded")
        # CHRESILIENT_RECONNECT_TOKEN enables POST /reconnect, behind that bearer token.
        reconnect = url + "/reconnect"
        ok = request(reconnect, "POST", {"Authorization": "Bearer s1decar-token"})
        assert ok.status == 200 and ok.json()["reconnected"] is True
        assert request(reconnect, "POST").status == 401
        assert request(reconnect, "POST", {"Authorization": "Bearer wrong"}).status == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
