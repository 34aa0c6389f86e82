"""The validation run behind ``chresilient check``: each scenario measures and says why.

The plain scenarios run against the configured server. ``simulate_failure=True`` adds
scenarios that route a second manager through an in-process :class:`FaultProxy` (refuse,
reset, latency, black-hole) and check that retries, the breaker and the spool do what they
claim. The proxy only forwards to loopback, so those need a server on this machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from .config import CircuitBreakerConfig, Config, RetryConfig
from .errors import CircuitOpenError, ClickHouseUnavailableError, StartupError, describe
from .health.wsgi import health_wsgi_app
from .manager import ClickHouseConnectionManager
from .statement import quote_identifier
from .testing.faultproxy import FaultProxy
from .testing.http import request, serve_wsgi


@dataclass
class CheckResult:
    """One line of the report."""

    scenario: str
    ok: bool
    figure: str = ""
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Failed(Exception):
    """A scenario's own verdict: the message is the reason."""


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise _Failed(reason)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def _ms(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1000:.1f} ms"


class ValidationRun:
    """Runs the scenarios in order; a scenario's exception becomes its failure reason."""

    def __init__(self, config: Config, *, startup_timeout: float = 30.0) -> None:
        self.config = config
        self.startup_timeout = startup_timeout
        self.results: list[CheckResult] = []
        self._spool_dir = tempfile.TemporaryDirectory(prefix="chresilient-check-")
        # The check spools into a directory of its own: it must not touch real data.
        self.mgr = ClickHouseConnectionManager(config.replace(spool_dir=self._spool_dir.name))
        self._table: str | None = None  # a scratch table: its name, unquoted
        # Set when the server refused us for a reason waiting cannot fix (credentials).
        self.fatal: StartupError | None = None

    def run(self, simulate_failure: bool = False) -> list[CheckResult]:
        scenarios: list[tuple[str, Callable[[], CheckResult]]] = [
            ("manager initialisation", self.initialisation),
            ("connection retry", self.connection_retry),
            ("service dependency validation", self.dependencies),
            ("analytics consistency", self.analytics),
            ("health endpoints", self.endpoints),
            ("graceful degradation", self.degradation),
        ]
        if simulate_failure:
            scenarios += [
                ("simulated: refused connections", self.simulate_refuse),
                ("simulated: connection reset mid-result", self.simulate_reset),
                ("simulated: added latency", self.simulate_latency),
                ("simulated: black-holed server", self.simulate_blackhole),
            ]
        try:
            for name, scenario in scenarios:
                try:
                    result = scenario()
                except _Failed as failed:
                    result = CheckResult(name, False, reason=str(failed))
                except StartupError as err:
                    self.fatal = err
                    result = CheckResult(name, False, reason=str(err))
                except Exception as exc:
                    result = CheckResult(name, False, reason=describe(exc))
                result.scenario = name
                self.results.append(result)
                if name == "manager initialisation" and not result.ok:
                    break  # nothing else can run without a server
        finally:
            self._cleanup()
        return self.results

    # -- plain scenarios --------------------------------------------------------------
    def initialisation(self) -> CheckResult:
        _, waited = _timed(lambda: self.mgr.start(wait=True, timeout=self.startup_timeout))
        version = self.mgr.execute("SELECT version()")[0][0]
        return CheckResult("", True, f"ready in {_ms(waited)}, server {version}")

    def connection_retry(self) -> CheckResult:
        before = self.mgr.metrics()
        latencies = sorted(_timed(lambda: self.mgr.execute("SELECT 1"))[1] for _ in range(20))
        report = self.mgr.reconnect()
        _expect(bool(report.get("reconnected")), f"reconnect failed: {report}")
        after = self.mgr.metrics()
        retries = after["retry_attempts"] - before["retry_attempts"]
        return CheckResult(
            "",
            True,
            f"p50 {_ms(latencies[10])}, {retries} retries in 20 calls, fresh pool after reconnect",
        )

    def dependencies(self) -> CheckResult:
        report, took = _timed(self.mgr.validate_service_dependencies)
        summary = report.get("summary", {})
        failed = [c for c in report.get("checks", []) if c.get("status") == "failed"]
        _expect(
            not failed,
            "; ".join(f"{c['name']}: {c.get('error', '')}" for c in failed)
            + " | "
            + "; ".join(report.get("recommendations", [])),
        )
        return CheckResult(
            "",
            True,
            f"{summary.get('passed', 0)} passed, "
            f"{summary.get('skipped', 0)} skipped in {_ms(took)}",
        )

    def analytics(self) -> CheckResult:
        report, took = _timed(self.mgr.ensure_analytics_consistency)
        tables = report.get("tables", [])
        _expect(bool(report.get("overall_consistent")), f"inconsistent: {report}")
        what = (
            f"{len(tables)} expected table(s) consistent"
            if tables
            else ("no expected tables configured; write probe checked")
        )
        return CheckResult("", True, f"{what} in {_ms(took)}")

    def endpoints(self) -> CheckResult:
        app = health_wsgi_app(self.mgr)
        figures = []
        with serve_wsgi(app) as base:
            for path in (
                "/health/clickhouse",
                "/health/clickhouse/ready",
                "/health/clickhouse/metrics?format=prometheus",
            ):
                url = base + path
                reply, took = _timed(lambda url=url: request(url, timeout=10))  # type: ignore[misc]
                status, body = reply.status, reply.body
                _expect(status == 200, f"GET {path} answered {status}, expected 200")
                _expect(
                    not self.config.password or self.config.password.encode() not in body,
                    f"GET {path} leaked the password",
                )
                figures.append(f"{path.split('?')[0].rsplit('/', 1)[-1]} {_ms(took)}")
        return CheckResult("", True, ", ".join(figures))

    def degradation(self) -> CheckResult:
        table = self._scratch_table()
        breaker = self.mgr.hosts[0].breaker
        breaker.force_open(ConnectionError("simulated outage"))
        try:
            failed_in = _fails_fast(self.mgr)
            fallback = self.mgr.execute("SELECT 1", fallback=lambda err: "fallback")
            _expect(fallback == "fallback", "fallback= was not used while the breaker was open")
            result = self.mgr.insert(table, [(1, "a"), (2, "b")], ["id", "name"])
            _expect(result.spooled and not result.delivered, f"insert not spooled: {result}")
        finally:
            breaker.reset()
        self._replayed(self.mgr, table, "1", expected=2)
        return CheckResult(
            "", True, f"refused in {_ms(failed_in)} while open; 2 rows spooled and replayed"
        )

    # -- simulated faults -------------------------------------------------------------
    @contextlib.contextmanager
    def _proxied(
        self, retry: RetryConfig | None = None
    ) -> Iterator[tuple[FaultProxy, ClickHouseConnectionManager]]:
        host, port = self.config.host, self.config.port
        _expect(
            _is_loopback(host),
            f"--simulate-failure needs a server on this machine, "
            f"not {host}: the fault proxy only forwards to loopback",
        )
        target = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        proxy = FaultProxy((str(target), port)).start()
        cfg = self.config.replace(
            host=proxy.host,
            port=proxy.port,
            alt_hosts=(),
            spool_dir=self._spool_dir.name,
            retry=retry
            or RetryConfig(
                max_attempts=3,
                initial_delay=0.05,
                max_delay=0.2,
                timeout_per_attempt=1.0,
                total_timeout=10.0,
            ),
            breaker=CircuitBreakerConfig(failure_threshold=3, recovery_timeout=1.0),
        )
        mgr = ClickHouseConnectionManager(cfg)
        try:
            mgr.execute("SELECT 1")
            yield proxy, mgr
        finally:
            mgr.close()
            proxy.close()

    def simulate_refuse(self) -> CheckResult:
        with self._proxied() as (proxy, mgr):
            proxy.refuse()
            proxy.reset_active()
            err, took = _expect_unavailable(mgr)
            _expect(err.attempts == 3, f"{err.attempts} attempts, expected 3")
            _expect(mgr.hosts[0].breaker.state.value == "open", "breaker did not open")
            failed_in = _fails_fast(mgr)
            proxy.pass_through()
            time.sleep(1.1)
            _expect(mgr.execute("SELECT 1") == [(1,)], "no recovery after the proxy reopened")
        return CheckResult(
            "",
            True,
            f"3 attempts in {_ms(took)}, breaker open, then refused "
            f"in {_ms(failed_in)}; recovered after 1 s",
        )

    def simulate_reset(self) -> CheckResult:
        patient = RetryConfig(
            max_attempts=6,
            initial_delay=0.3,
            max_delay=0.6,
            timeout_per_attempt=1.0,
            total_timeout=10.0,
        )
        with self._proxied(patient) as (proxy, mgr):
            proxy.reset(after_bytes=100_000, times=1)  # one connection cut after 100 kB
            rows, took = _timed(
                lambda: mgr.execute("SELECT number FROM system.numbers LIMIT 500000")
            )
            retries = mgr.metrics()["retry_attempts"]
            _expect(len(rows) == 500_000, f"{len(rows)} rows, expected 500000")
            _expect(retries >= 1, "the reset did not cause a retry")
        return CheckResult("", True, f"complete result after {retries} retries in {_ms(took)}")

    def simulate_latency(self) -> CheckResult:
        with self._proxied() as (proxy, mgr):
            proxy.delay(0.2)
            _, slow = _timed(lambda: mgr.execute("SELECT 1"))
            _expect(slow >= 0.2, f"latency not applied ({_ms(slow)})")
            proxy.delay(2.0)
            err, took = _expect_unavailable(mgr)
            _expect(took < 3 * 1.0 + 1.0 + 2.0, f"slow server took {took:.1f}s to give up")
        return CheckResult(
            "",
            True,
            f"0.2 s latency: answered in {_ms(slow)}; 2 s latency: "
            f"gave up after {err.attempts} attempts in {took:.2f} s",
        )

    def simulate_blackhole(self) -> CheckResult:
        table = self._scratch_table()
        with self._proxied() as (proxy, mgr):
            proxy.blackhole()
            proxy.reset_active()
            err, took = _expect_unavailable(mgr)
            _expect(took < 3 * 1.0 + 1.0 + 2.0, f"black hole took {took:.1f}s to give up")
            failed_in = _fails_fast(mgr)
            result = mgr.insert(table, [(10, "x"), (11, "y"), (12, "z")], ["id", "name"])
            _expect(result.spooled, f"insert not spooled: {result}")
            proxy.pass_through()
            time.sleep(1.1)
            self._replayed(mgr, table, "id >= 10", expected=3)
        return CheckResult(
            "",
            True,
            f"gave up in {took:.2f} s ({err.attempts} attempts), "
            f"then refused in {_ms(failed_in)}; 3 spooled rows replayed",
        )

    # -- helpers ----------------------------------------------------------------------
    def _replayed(
        self,
        mgr: ClickHouseConnectionManager,
        table: str,
        where: str,
        expected: int,
        timeout: float = 10.0,
    ) -> None:
        """Replay until ``expected`` rows arrived (a background replayer may hold the
        spool's lock for a moment: then this waits for it), bounded by ``timeout``."""
        _expect(mgr.spool is not None, "no spool configured")
        assert mgr.spool is not None
        deadline = time.monotonic() + timeout
        query = f"SELECT count() FROM {quote_identifier(table)} WHERE {where}"
        while True:
            report = mgr.spool.replay()
            count = self.mgr.execute(query)[0][0]
            if count >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        _expect(
            count == expected,
            f"{count} rows delivered after replay, expected "
            f"{expected} ({report.outcome}: {report.last_error or 'no error'})",
        )

    def _scratch_table(self) -> str:
        if self._table is None:
            name = f"chresilient_check_{uuid.uuid4().hex[:12]}"
            self.mgr.execute(
                f"CREATE TABLE {quote_identifier(name)} (id UInt32, name String) "
                f"ENGINE = MergeTree ORDER BY id"
            )
            self._table = name
        return self._table

    def _cleanup(self) -> None:
        try:
            if self._table is not None and not self.mgr.closed:
                self.mgr.hosts[0].breaker.reset()
                self.mgr.execute(f"DROP TABLE IF EXISTS {quote_identifier(self._table)}")
        except Exception:
            pass
        finally:
            self.mgr.close()
            self._spool_dir.cleanup()


def _fails_fast(mgr: ClickHouseConnectionManager, calls: int = 21) -> float:
    """The median time an open breaker takes to refuse a call (must be under 5 ms)."""
    took = []
    for _ in range(calls):
        started = time.monotonic()
        try:
            mgr.execute("SELECT 1")
        except CircuitOpenError:
            took.append(time.monotonic() - started)
            continue
        raise _Failed("the call was not refused while the breaker was open")
    median = sorted(took)[len(took) // 2]
    _expect(median < 0.005, f"an open breaker took {_ms(median)} to refuse a call")
    return median


def _expect_unavailable(
    mgr: ClickHouseConnectionManager,
) -> tuple[ClickHouseUnavailableError, float]:
    started = time.monotonic()
    try:
        mgr.execute("SELECT 1")
    except ClickHouseUnavailableError as err:
        return err, time.monotonic() - started
    raise _Failed("the call succeeded although the server was unreachable")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
