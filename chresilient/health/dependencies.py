"""Service dependency validation: real, separate checks, each with status, duration, error.

Per host, in order: DNS resolution, TCP reachability, native handshake (server version and
revision), authentication, database, query execution, SELECT and INSERT permissions, and
replication delay; then container health once. A check whose prerequisite failed is
``skipped`` with the reason, never ``passed``. Every failure carries a recommendation that
names the likely fix. The checks use their own short-lived connection, not the pool, so
they see what a fresh process would see.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

from clickhouse_driver import Client
from clickhouse_driver.errors import ServerException

from ..config import Config
from ..config_values import HostPort, format_host
from ..connection import make_client
from ..errors import AUTH_CODES, UNKNOWN_DATABASE, describe, refusal_advice, server_code
from ..metrics import utc_iso
from ..server import ServerInfo, is_lagging, read_replicas, replica_delay
from ..statement import qualified
from .common import Cancellation, Report, elapsed_ms
from .docker import container_health

HOST_CHECKS = (
    "dns",
    "tcp",
    "handshake",
    "authentication",
    "database",
    "query",
    "permissions_select",
    "permissions_insert",
    "replication",
)
UNKNOWN_TABLE = 60
READONLY = 164


class _Failed(Exception):
    def __init__(
        self, error: str, recommendation: str | None = None, detail: dict[str, Any] | None = None
    ) -> None:
        super().__init__(error)
        self.error, self.recommendation, self.detail = error, recommendation, detail


class _Skipped(Exception):
    pass


def validate_dependencies(cfg: Config, cancel: Cancellation | None = None) -> Report:
    """The full report: ``overall_status``, ``checks``, ``recommendations``.

    ``cancel`` (the monitor's, set when the manager closes) ends a run at once: the check
    in progress has its socket shut down and the checks left are skipped.
    """
    cancel = cancel if cancel is not None else Cancellation()
    started = time.perf_counter()
    checks: list[dict[str, Any]] = []
    for address in cfg.hosts:
        checks.extend(_HostValidation(cfg, address, cancel).run())
    container_started = time.perf_counter()
    container = container_health(cfg, cfg.health_probe_timeout)
    checks.append(
        {
            "name": "container",
            "host": None,
            "duration_ms": elapsed_ms(container_started),
            "error": container.pop("error", None),
            **container,
        }
    )
    failed = [c for c in checks if c["status"] == "failed"]
    recommendations: list[str] = []
    for check in failed:
        text = check.get("recommendation")
        if text and text not in recommendations:
            recommendations.append(text)
    summary = {s: sum(c["status"] == s for c in checks) for s in ("passed", "failed", "skipped")}
    return {
        "overall_status": "failed" if failed else "passed",
        "checked_at": utc_iso(time.time()),
        "duration_ms": elapsed_ms(started),
        "target": cfg.safe_url(),
        "summary": summary,
        "failed_checks": [c["name"] for c in failed],
        "checks": checks,
        "recommendations": recommendations,
    }


class _HostValidation:
    """The checks for one host; later checks reuse what earlier ones established."""

    def __init__(self, cfg: Config, address: HostPort, cancel: Cancellation) -> None:
        self.cfg = cfg
        self.cancelled = cancel
        self.address = address
        self.label = format_host(*address)
        self.timeout = cfg.health_probe_timeout
        self.sockaddrs: list[Any] = []
        self.client: Client | None = None
        self.hello_error: BaseException | None = None

    def run(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("dns", self._dns),
            ("tcp", self._tcp),
            ("handshake", self._handshake),
            ("authentication", self._authentication),
            ("database", self._database),
        ]
        try:
            for name, step in steps:
                if self.cancelled():
                    return out + [self._skip(n, "cancelled") for n in HOST_CHECKS[len(out) :]]
                out.append(self._step(name, step))
                if out[-1]["status"] != "passed":
                    reason = f"{name} did not pass"
                    return out + [self._skip(n, reason) for n in HOST_CHECKS[len(out) :]]
            for name, step in (
                ("query", self._query),
                ("permissions_select", self._permissions_select),
                ("permissions_insert", self._permissions_insert),
                ("replication", self._replication),
            ):
                if self.cancelled():
                    return out + [self._skip(n, "cancelled") for n in HOST_CHECKS[len(out) :]]
                out.append(self._step(name, step))
        finally:
            if self.client is not None:
                self.cancelled.untrack(self.client)
                self.client.disconnect()
        return out

    def _step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {"name": name, "host": self.label, "status": "passed"}
        started = time.perf_counter()
        try:
            result["detail"] = fn()
            result["error"] = None
        except _Skipped as skip:
            result.update(status="skipped", reason=str(skip), error=None)
        except _Failed as fail:
            result.update(status="failed", error=fail.error)
            if fail.recommendation:
                result["recommendation"] = fail.recommendation
            if fail.detail:
                result["detail"] = fail.detail
        except Exception as exc:
            result.update(status="failed", error=describe(exc))
        result["duration_ms"] = elapsed_ms(started)
        return result

    def _skip(self, name: str, reason: str) -> dict[str, Any]:
        return {
            "name": name,
            "host": self.label,
            "status": "skipped",
            "reason": reason,
            "error": None,
            "duration_ms": 0.0,
        }

    # -- reaching the server ----------------------------------------------------------
    def _dns(self) -> dict[str, Any]:
        host, port = self.address
        try:
            infos = _bounded(
                lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.timeout
            )
        except (OSError, TimeoutError) as exc:
            raise _Failed(
                f"cannot resolve {host!r}: {exc}",
                f"{host!r} does not resolve: check CLICKHOUSE_HOST (in Docker Compose or "
                "Kubernetes, use the service name)",
            ) from exc
        self.sockaddrs = [info[4] for info in infos]
        return {"addresses": sorted({str(sa[0]) for sa in self.sockaddrs})}

    def _tcp(self) -> dict[str, Any]:
        sockaddr = self.sockaddrs[0]
        family = socket.AF_INET6 if ":" in str(sockaddr[0]) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(sockaddr)
        except ConnectionRefusedError as exc:
            raise _Failed(
                f"connection to {self.label} refused",
                f"nothing accepts connections on {self.label}: is the ClickHouse server up, "
                "and is CLICKHOUSE_PORT its native port (9000), not HTTP (8123)?",
            ) from exc
        except OSError as exc:
            raise _Failed(
                f"cannot connect to {self.label}: {describe(exc)}",
                f"{self.label} does not answer TCP connects within {self.timeout:.1f}s: check "
                "firewalls and network policies, and that the server is not frozen or overloaded",
            ) from exc
        finally:
            sock.close()
        return {"address": f"{sockaddr[0]}:{sockaddr[1]}"}

    def _handshake(self) -> dict[str, Any]:
        client = make_client(self.cfg, self.address, self.timeout)
        self.cancelled.track(client)
        try:
            client.connection.connect()
        except ServerException as exc:  # the server spoke the protocol, then refused us
            self.cancelled.untrack(client)
            client.disconnect()
            self.hello_error = exc
            return {"answered": True, "server_error": describe(exc)}
        except Exception as exc:
            self.cancelled.untrack(client)
            client.disconnect()
            if self.cancelled():
                raise _Failed("cancelled: the manager is closing") from exc
            if _speaks_http(self.sockaddrs[0], self.timeout):
                raise _Failed(
                    f"{self.label} answers HTTP, not the native protocol",
                    f"port {self.address[1]} is ClickHouse's HTTP interface (8123 by default); "
                    "chresilient speaks the native protocol: set CLICKHOUSE_PORT to the native "
                    "port (9000 by default, 9440 with TLS)",
                ) from exc
            raise _Failed(
                f"no native handshake with {self.label}: {describe(exc)}",
                f"{self.label} accepts TCP but did not complete a native-protocol handshake: "
                "check that it is ClickHouse's native port (9000), that CLICKHOUSE_SECURE "
                "matches the port (9440 is TLS), and that the server is not overloaded",
            ) from exc
        self.client = client
        return {**ServerInfo.of(client.connection).as_dict(), "secure": self.cfg.secure}

    def _refusal(self, exc: BaseException) -> _Failed:
        advice = refusal_advice(
            exc, user=self.cfg.user, database=self.cfg.database, host=self.label
        )
        return _Failed(advice or describe(exc), advice)

    def _authentication(self) -> dict[str, Any]:
        exc = self.hello_error
        if exc is not None and server_code(exc) in AUTH_CODES:
            raise self._refusal(exc)
        if exc is not None and server_code(exc) != UNKNOWN_DATABASE:
            raise _Failed(f"the server refused the session: {describe(exc)}")
        return {"user": self.cfg.user}

    def _database(self) -> dict[str, Any]:
        exc = self.hello_error
        if exc is not None:
            raise self._refusal(exc)
        return {"database": self.cfg.database}

    # -- using it ---------------------------------------------------------------------
    def _execute(self, sql: str, params: Any = None) -> Any:
        assert self.client is not None
        return self.client.execute(sql, params)

    def _query(self) -> dict[str, Any]:
        started = time.perf_counter()
        self._execute("SELECT 1")
        latency = elapsed_ms(started)
        version, uptime = self._execute("SELECT version(), uptime()")[0]
        return {"select_1_ms": latency, "version": version, "uptime_seconds": uptime}

    def _tables(self) -> list[tuple[str, str]]:
        return [(t.database or self.cfg.database, t.name) for t in self.cfg.analytics_tables]

    def _permissions_select(self) -> dict[str, Any]:
        tables = self._tables()
        if not tables:
            self._execute("SELECT 1 FROM system.one")
            return {"checked": ["system.one"], "note": "no analytics tables configured"}
        self._each_table("SELECT 1 FROM {t} LIMIT 0", "SELECT", tables)
        return {"checked": [f"{db}.{name}" for db, name in tables]}

    def _permissions_insert(self) -> dict[str, Any]:
        tables = self._tables()
        if not tables:
            readonly = self._execute("SELECT value FROM system.settings WHERE name = 'readonly'")
            value = str(readonly[0][0]) if readonly else "0"
            if value != "0":
                raise _Failed(
                    f"user {self.cfg.user!r} is read-only (readonly={value})",
                    f"user {self.cfg.user!r} cannot INSERT (readonly={value}): use a profile "
                    "with readonly=0 for the analytics writer",
                )
            raise _Skipped(f"no analytics tables configured (readonly={value})")
        # An INSERT with an empty data block is checked like any INSERT but writes nothing
        # (INSERT ... SELECT from the table itself would deadlock on Log engines).
        self._each_table("INSERT INTO {t} VALUES", "INSERT", tables, data=[])
        return {"checked": [f"{db}.{name}" for db, name in tables], "rows_written": 0}

    def _each_table(
        self, template: str, verb: str, tables: list[tuple[str, str]], data: Any = None
    ) -> None:
        failures, advice = [], []
        for db, name in tables:
            target = qualified(db, name)
            try:
                self._execute(template.format(t=target), data)
            except ServerException as exc:
                failures.append(f"{db}.{name}: {describe(exc)}")
                if server_code(exc) == UNKNOWN_TABLE:
                    advice.append(f"table {db}.{name} is missing: create it")
                elif server_code(exc) == READONLY:
                    advice.append(
                        f"the session is read-only, so no {verb} on {db}.{name}: use a profile "
                        "with readonly=0 for the analytics writer"
                    )
                else:
                    advice.append(f"grant {verb} on {db}.{name} to {self.cfg.user!r}")
        if failures:
            raise _Failed("; ".join(failures), "; ".join(advice))

    def _replication(self) -> dict[str, Any]:
        assert self.client is not None
        replicas = read_replicas(self.client)
        if not replicas:
            raise _Skipped("no replicated tables (system.replicas is empty)")
        limit = self.cfg.max_replica_delay
        worst = max(replicas, key=lambda r: r.delay)
        detail = {
            "replicated_tables": len(replicas),
            "max_absolute_delay": int(replica_delay(replicas)),
            "max_replica_delay": limit,
            "worst_table": worst.table,
        }
        bad = [r for r in replicas if r.readonly or r.session_expired or is_lagging(r.delay, limit)]
        if bad:
            names = ", ".join(r.table for r in bad[:5])
            raise _Failed(
                f"{len(bad)} replicated tables read-only, expired or over "
                f"max_replica_delay ({limit}s) behind: {names}",
                "replication is behind or read-only: check ZooKeeper/Keeper connectivity and "
                "system.replication_queue on this replica",
                detail,
            )
        return detail


def _bounded(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a daemon thread, given up after ``timeout`` (getaddrinfo has no timeout)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="chresilient-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:.1f}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _speaks_http(sockaddr: Any, timeout: float) -> bool:
    """Whether the port answers an HTTP request (a common mix-up: 8123 for 9000)."""
    family = socket.AF_INET6 if ":" in str(sockaddr[0]) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(min(timeout, 2.0))
            sock.connect(sockaddr)
            sock.sendall(b"GET /ping HTTP/1.0\r\nHost: clickhouse\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/")
    except OSError:
        return False
