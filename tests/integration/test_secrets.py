"""The password never appears in any output, whatever fails.

One test drives every output channel through the fault scenarios (wrong password, port
refused, server frozen, killed, connection reset) and searches everything for the
password: structlog events (captured, then rendered by the production renderers),
stdlib logging at DEBUG (the driver's and SQLAlchemy's loggers too), stdout/stderr at the
file-descriptor level, exception messages, reprs and tracebacks, reprs of every object a
user can reach, health(), metrics(), every WSGI endpoint, the Prometheus text and the
``chresilient`` command. Narrower checks live in test_health_http.py, test_cli.py and
test_fault_catalogue.py (entry 9).
"""

from __future__ import annotations

import html
import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus
from wsgiref.util import setup_testing_defaults

import pytest
import structlog
from clickhouse_driver import errors as driver_errors
from helpers import free_port, make_config, wait_for_recovery, wait_until

from chresilient import (
    CircuitBreakerConfig,
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    Config,
    ConfigError,
    ConnectionPoolConfig,
    ResilientClient,
    RetryConfig,
    StartupError,
    health_wsgi_app,
)
from chresilient.prometheus import exposition
from chresilient.testing.faultproxy import FaultProxy

ROOT = str(Path(__file__).resolve().parents[2])
BASE = "/health/clickhouse"
TOKEN = "reconnect-token-for-tests"
ROUTES = ("", "/connection", "/metrics", "/metrics?format=prometheus", "/ready", "/nope")
SLOW_ROUTES = ("/dependencies?refresh=1", "/analytics")  # run the checks: not while frozen


def secret_forms(password: str) -> set[str]:
    """The password as it could leak: raw, URL-, HTML-, JSON- and repr-escaped, hex, and
    every 6-character piece of the raw and URL-encoded forms (a partial leak is a leak)."""
    core = password.strip()
    forms = {
        password,
        core,
        quote(core, safe=""),
        quote_plus(core),
        html.escape(core),
        json.dumps(password)[1:-1],
        repr(password)[1:-1],
        core.encode().hex(),
    }
    for form in (core, quote(core, safe="")):
        forms |= {form[i : i + 6] for i in range(len(form) - 5)}
    return forms


class Collector:
    """Everything a user or an operator could see, as text."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, *items: Any) -> None:
        for item in items:
            self.texts.append(item if isinstance(item, str) else json.dumps(item, default=repr))

    def error(self, call: Callable[[], Any], *expected: type[BaseException]) -> BaseException:
        """Run ``call``, which must raise one of ``expected``; keep every view of the error."""
        try:
            call()
        except expected as exc:
            self.add(str(exc), repr(exc), "".join(traceback.format_exception(exc)))
            cause: BaseException | None = getattr(exc, "last_error", None)
            if cause is not None:
                self.add(str(cause), repr(cause))
            return exc
        pytest.fail(f"{call} did not raise {expected}")

    def observe(self, mgr: ClickHouseConnectionManager, slow: bool = False) -> None:
        """Reprs, health, metrics, Prometheus and every endpoint of ``mgr``."""
        pool = mgr.hosts[0].pool
        self.add(repr(mgr.config), str(mgr.config), mgr.config.safe_url(), repr(mgr))
        self.add(repr(ResilientClient(mgr)), repr(pool), repr(pool.queue_pool))
        self.add(repr(mgr.hosts[0]), repr(mgr.hosts[0].breaker), repr(mgr.spool))
        self.add(mgr.health(), mgr.metrics(), mgr.spool_health(), exposition(mgr)[0].decode())
        app = health_wsgi_app(mgr, reconnect_token=TOKEN)
        for route in ROUTES + (SLOW_ROUTES if slow else ()):
            self.add(wsgi(app, route))
        self.add(wsgi(app, "/reconnect", method="POST", token=TOKEN))


def wsgi(app: Any, route: str, method: str = "GET", token: str | None = None) -> str:
    """Call the WSGI app directly: status, headers and body as one text."""
    path, _, query = route.partition("?")
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=BASE + path, QUERY_STRING=query, REQUEST_METHOD=method)
    if token:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    started: list[Any] = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: started.append(headers)))
    return f"{started} {body.decode()}"


@contextmanager
def cli_runs(commands: list[tuple[list[str], dict[str, str]]]) -> Iterator[list[str]]:
    """Run ``chresilient`` commands concurrently; yields their outputs once all ended."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "chresilient", *args],
            env={**{k: v for k, v in os.environ.items() if not k.startswith("CLICKHOUSE_")},
                 "PYTHONPATH": ROOT, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, env in commands
    ]  # fmt: skip
    outputs: list[str] = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            outputs.append(f"exit {proc.returncode}\n{out}\n{err}")
        yield outputs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _fast(server: Any, password: str, **changes: Any) -> Any:
    return make_config(
        server,
        user="tester",
        password=password,
        retry=RetryConfig(
            max_attempts=2, initial_delay=0.02, max_delay=0.05, timeout_per_attempt=0.5
        ),
        breaker=CircuitBreakerConfig(failure_threshold=3, recovery_timeout=0.5),
        pool=ConnectionPoolConfig(health_check_interval=0.3),
        health_probe_timeout=0.5,
        **changes,
    )


@pytest.mark.faults
def test_the_password_never_appears_in_any_output(
    clickhouse_server: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    password = clickhouse_server.password  # the tester user's real one: p@ss:w/rd#1&<x>
    assert set("@:/#&<>") <= set(password)
    # Not a usable ClickHouse password (users.xml trims it), so only ever configured:
    # sent to the server as a wrong password, or aimed at a refusing port.
    configured = password + "\n"
    caplog.set_level(logging.DEBUG)
    for name in ("clickhouse_driver", "sqlalchemy.pool", "chresilient"):
        caplog.set_level(logging.DEBUG, logger=name)
    seen = Collector()
    host, port, refusing = clickhouse_server.host, clickhouse_server.port, free_port()

    # -- the command line: environment, --url (raw and encoded), every exit path -------------
    def env(target_port: int, pw: str) -> dict[str, str]:
        return {
            "CLICKHOUSE_HOST": host,
            "CLICKHOUSE_PORT": str(target_port),
            "CLICKHOUSE_USER": "tester",
            "CLICKHOUSE_PASSWORD": pw,
            "CLICKHOUSE_SPOOL_DIR": str(tmp_path / f"cli-{target_port}-{len(pw)}"),
            "CLICKHOUSE_RETRY_TIMEOUT_PER_ATTEMPT": "1",
        }

    url = f"clickhouse://tester:{{}}@{host}:{port}/default"
    spool_only = {"CLICKHOUSE_SPOOL_DIR": str(tmp_path / "cli-url")}
    debug = ["--log-level", "debug"]
    commands = [
        ([*debug, "wait", "--timeout", "5"], env(port, configured)),
        ([*debug, "health", "--json", "--timeout", "1"], env(refusing, configured)),
        ([*debug, "metrics", "--prometheus", "--timeout", "5"], env(port, password)),
        (["--url", url.format(password), "health"], spool_only),  # unencoded: ConfigError
        (["--url", url.format(quote(password, safe="")), "spool", "status"], spool_only),
    ]
    with cli_runs(commands) as outputs:
        seen.add(*outputs)
    assert outputs[0].startswith("exit 3") and "CLICKHOUSE_PASSWORD" in outputs[0]
    assert outputs[2].startswith("exit 0") and "chresilient" in outputs[2]
    assert outputs[3].startswith("exit 2") and "percent-encode" in outputs[3]
    # The same unencoded URL in process: refused without quoting any piece of it.
    seen.error(lambda: Config.from_url(url.format(password)), ConfigError)
    seen.error(lambda: Config.from_env({"CLICKHOUSE_URL": url.format(password)}), ConfigError)

    with structlog.testing.capture_logs() as logs:
        # -- wrong password: fails fast, says what to check ------------------------------
        wrong = ClickHouseConnectionManager(_fast(clickhouse_server, configured))
        try:
            err = seen.error(lambda: wrong.execute("SELECT 1"), driver_errors.ServerException)
            assert err.code in (193, 516)
            seen.error(lambda: wrong.insert("t", [(1,)]), driver_errors.ServerException)
            seen.error(lambda: wrong.start(wait=True, timeout=5), StartupError)
            seen.observe(wrong, slow=True)
            seen.add(wrong.validate_service_dependencies(timeout=10))
        finally:
            wrong.close()

        # -- refused: nothing listens; inserts are spooled --------------------------------
        down = ClickHouseConnectionManager(
            _fast(type("Down", (), {"host": host, "port": refusing})(), configured)
        )
        try:
            seen.error(lambda: down.execute("SELECT 1"), ClickHouseUnavailableError)
            result = down.insert("t", [(1, "row")])
            assert result.spooled
            seen.add(repr(result))
            down.start(wait=True, timeout=0.5, required=False)
            seen.observe(down, slow=True)
        finally:
            down.close()

        # -- frozen, killed, reset: a working manager behind the fault proxy --------------
        proxy = FaultProxy((host, port)).start()
        good = ClickHouseConnectionManager(_fast(proxy, password, spool_replay_interval=0.3))
        try:
            good.start(wait=True, timeout=10)
            good.execute("CREATE TABLE t (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
            with good.hosts[0].pool.connection(1.0) as conn:  # the pooled objects themselves
                seen.add(repr(conn), repr(conn.client), repr(conn.connection))
            seen.observe(good, slow=True)

            clickhouse_server.freeze()
            try:
                seen.error(lambda: good.execute("SELECT 1"), ClickHouseUnavailableError)
                assert good.insert("t", [(2, "frozen")]).spooled
                seen.observe(good)
            finally:
                clickhouse_server.thaw()

            clickhouse_server.kill()
            seen.error(lambda: good.execute("SELECT 1"), ClickHouseUnavailableError)
            assert good.insert("t", [(3, "killed")]).spooled
            seen.observe(good)
            clickhouse_server.start()

            wait_for_recovery(good)  # a fresh connection through the proxy
            proxy.reset()
            seen.error(lambda: good.execute("SELECT 1"), ClickHouseUnavailableError)
            seen.observe(good)
            proxy.pass_through()

            wait_until(lambda: good.health()["status"] == "healthy", timeout=10, what="recovery")
            spool = good.spool
            assert spool is not None
            wait_until(lambda: spool.pending().batches == 0, timeout=10, what="spool drained")
            # Both spooled rows arrived (a replay cut by the proxy's reset may have sent one
            # twice: 18.16 has no dedup token, delivery is at least once).
            assert good.execute("SELECT DISTINCT id FROM t ORDER BY id") == [(2,), (3,)]
            seen.observe(good, slow=True)
        finally:
            clickhouse_server.thaw()
            proxy.pass_through()
            good.close()
            proxy.close()

    # -- every channel, rendered as an operator would see it --------------------------------
    assert logs, "structlog captured nothing"
    console = structlog.dev.ConsoleRenderer(colors=False)
    as_json = structlog.processors.JSONRenderer(default=repr)
    for entry in logs:
        seen.add(console(None, entry["log_level"], dict(entry)))
        seen.add(as_json(None, entry["log_level"], dict(entry)))
    assert any(r.name.startswith("clickhouse_driver") for r in caplog.records)
    seen.add(caplog.text)
    seen.add(*(r.getMessage() for r in caplog.records), *(repr(r.args) for r in caplog.records))
    captured = capfd.readouterr()
    seen.add(captured.out, captured.err)
    everything = "\n".join(seen.texts)
    assert "CLICKHOUSE_PASSWORD" in everything and "***" in everything  # advice, redaction
    forms = secret_forms(configured)
    leaks = sorted(form for form in forms if form in everything)
    assert not leaks, f"the password leaked as {leaks!r}"
    # The search does find it where it is: in the URLs the test itself built.
    assert all(any(f in url.format(pw) for f in forms) for pw in (password, quote(password)))
