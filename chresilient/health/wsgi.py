"""``health_wsgi_app``: the health endpoints as a plain WSGI application.

Routes (under ``/health/clickhouse``; the app may be mounted under any prefix, it routes on
``PATH_INFO``): ``GET /``, ``/connection``, ``/metrics``, ``/dependencies``,
``/analytics``, ``/ready`` and ``POST /reconnect``. healthy and degraded answer 200,
unhealthy 503; bodies are JSON, except Prometheus text from ``/metrics`` when asked for.
Every JSON body has the password scrubbed as a last line of defence.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from typing import Any, Callable, Protocol
from urllib.parse import parse_qs

import structlog

from ..config import Config
from ..errors import ClientClosedError, describe
from ..observability.prometheus import exposition
from .common import Report, SingleFlight, scrub

log = structlog.get_logger("chresilient.health")

BASE = "/health/clickhouse"
JSON = "application/json; charset=utf-8"
# How long /dependencies and /analytics reuse a report before running the checks again.
REPORT_MAX_AGE = 30.0
# ``?refresh=1`` accepts a report this young: requests queued behind a run (a server's
# worker threads handle them in waves) share it instead of each wave starting another.
REFRESH_MAX_AGE = 1.0
StartResponse = Callable[..., Any]
Response = tuple[int, Any, str]
_REASONS = {
    200: "OK",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class HealthSource(Protocol):
    """What the endpoints need: a :class:`ClickHouseConnectionManager` is one."""

    @property
    def config(self) -> Config: ...

    @property
    def check_timeout(self) -> float:
        """How long a request may wait for dependency or consistency checks."""

    def health(self) -> Report: ...

    def connection_report(self) -> Report: ...

    def metrics(self) -> Report: ...

    def validate_service_dependencies(
        self, timeout: float = ..., max_age: float | None = ...
    ) -> Report: ...

    def ensure_analytics_consistency(
        self, timeout: float = ..., max_age: float | None = ...
    ) -> Report: ...

    def reconnect(self) -> Report: ...


class HealthApp:
    """The WSGI callable; see the module docstring and docs/health.md."""

    def __init__(
        self,
        mgr: HealthSource,
        reconnect_token: str | None = None,
        show_details: bool = True,
        reconnect_timeout: float = 10.0,
    ) -> None:
        self.mgr = mgr
        self.show_details = show_details
        self.reconnect_timeout = reconnect_timeout
        # Secrets read from files end with a newline; the sent token is stripped too.
        self._token = (reconnect_token or "").strip().encode() or None
        self._reconnect: SingleFlight[Report] = SingleFlight(mgr.reconnect, "chresilient-reconnect")
        self._routes: dict[str, tuple[str, Callable[[dict[str, Any]], Response]]] = {
            "": ("GET", self._health),
            "/connection": ("GET", self._connection),
            "/metrics": ("GET", self._metrics),
            "/dependencies": ("GET", self._dependencies),
            "/analytics": ("GET", self._analytics),
            "/ready": ("GET", self._ready),
            "/reconnect": ("POST", self._reconnect_route),
        }

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        subpath = _subpath(environ)
        route = None if subpath is None else self._routes.get(subpath)
        if route is None:
            return _send(start_response, 404, {"error": "not found"}, JSON, environ)
        method, handler = route
        requested = str(environ.get("REQUEST_METHOD", "GET")).upper()
        allowed = (method, "HEAD") if method == "GET" else (method,)
        if requested not in allowed:
            body = {"error": f"method {requested} not allowed; use {method}"}
            return _send(start_response, 405, body, JSON, environ, [("Allow", ", ".join(allowed))])
        try:
            status, body, content_type = handler(environ)
        except ClientClosedError as exc:  # the application is shutting down: not a bug
            status, body, content_type = 503, {"error": describe(exc)}, JSON
        except Exception as exc:
            log.warning(
                "health_endpoint_failed", path=environ.get("PATH_INFO"), error=describe(exc)
            )
            status, body, content_type = 500, {"error": describe(exc)}, JSON
        headers = [("WWW-Authenticate", "Bearer")] if status == 401 else []
        if content_type == JSON:
            body = scrub(body, self.mgr.config.password)
        return _send(start_response, status, body, content_type, environ, headers)

    # -- routes ---------------------------------------------------------------------------
    def _health(self, environ: dict[str, Any]) -> Response:
        report = self.mgr.health()
        if not self.show_details:
            report = {k: report[k] for k in ("status", "timestamp", "connection_state")}
        return _by_status(report["status"]), report, JSON

    def _connection(self, environ: dict[str, Any]) -> Response:
        report = self.mgr.connection_report()
        if not self.show_details:
            report = {k: report[k] for k in ("status", "connection_state", "checked_at")}
        return _by_status(report["status"]), report, JSON

    def _metrics(self, environ: dict[str, Any]) -> Response:
        wants_text = wants_prometheus(
            _query(environ).get("format", ""), str(environ.get("HTTP_ACCEPT", ""))
        )
        if wants_text:
            body, content_type = exposition(self.mgr)
            return 200, body, content_type
        return 200, self.mgr.metrics(), JSON

    def _cached(
        self, environ: dict[str, Any], check: Callable[..., Report], summary: tuple[str, ...]
    ) -> Report:
        refresh = _query(environ).get("refresh") in ("1", "true", "yes")
        max_age = REFRESH_MAX_AGE if refresh else REPORT_MAX_AGE
        report = check(self.mgr.check_timeout, max_age=max_age)
        return report if self.show_details else {k: report[k] for k in summary}

    def _dependencies(self, environ: dict[str, Any]) -> Response:
        try:
            report = self._cached(
                environ,
                self.mgr.validate_service_dependencies,
                ("overall_status", "checked_at"),
            )
        except TimeoutError:
            return 504, {"error": "dependency validation is still running"}, JSON
        return (200 if report["overall_status"] == "passed" else 503), report, JSON

    def _analytics(self, environ: dict[str, Any]) -> Response:
        try:
            report = self._cached(
                environ,
                self.mgr.ensure_analytics_consistency,
                ("overall_consistent", "checked_at"),
            )
        except TimeoutError:
            return 504, {"error": "the analytics consistency check is still running"}, JSON
        return (200 if report["overall_consistent"] else 503), report, JSON

    def _ready(self, environ: dict[str, Any]) -> Response:
        health = self.mgr.health()
        ready = health["status"] != "unhealthy"
        body: Report = {"ready": ready, "status": health["status"]}
        if self.show_details and not ready:
            body["reasons"] = health["reasons"]
        return (200 if ready else 503), body, JSON

    def _reconnect_route(self, environ: dict[str, Any]) -> Response:
        if self._token is None:
            return 403, {"error": "reconnect is disabled: no reconnect token is configured"}, JSON
        scheme, _, given = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        # WSGI hands header bytes over decoded as Latin-1: undo that to compare the bytes
        # sent (a UTF-8 token) with the token's UTF-8 bytes, in constant time.
        sent = given.strip().encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, self._token):
            return 401, {"error": "a valid bearer token is required"}, JSON
        log.info("reconnect_requested", remote=environ.get("REMOTE_ADDR"))
        try:
            result = self._reconnect.run(self.reconnect_timeout)
        except TimeoutError:
            body = {"error": f"reconnect still running after {self.reconnect_timeout:.0f}s"}
            return 504, body, JSON
        return (200 if result.get("reconnected") else 503), result, JSON


def health_wsgi_app(
    mgr: HealthSource,
    reconnect_token: str | None = None,
    show_details: bool = True,
    reconnect_timeout: float = 10.0,
) -> HealthApp:
    """The health endpoints of ``mgr`` as a WSGI application.

    ``reconnect_token`` enables ``POST /health/clickhouse/reconnect`` (bearer auth);
    ``show_details=False`` trims bodies to the status fields for endpoints exposed beyond
    the cluster.
    """
    return HealthApp(mgr, reconnect_token, show_details, reconnect_timeout)


def _subpath(environ: dict[str, Any]) -> str | None:
    """The route below ``/health/clickhouse``, whether that is in PATH_INFO or the mount."""
    path = str(environ.get("PATH_INFO") or "").rstrip("/")
    if path == BASE or path.startswith(BASE + "/"):
        return path[len(BASE) :]
    if str(environ.get("SCRIPT_NAME") or "").rstrip("/").endswith(BASE):
        return path
    return None


TEXT_TYPES = ("text/plain", "application/openmetrics-text")


def wants_prometheus(fmt: str, accept: str) -> bool:
    """``?format=`` (any case) decides; else the Accept header by q-value, then by order;
    JSON when nothing prefers text (no header, ``*/*``, or a tie listed JSON first)."""
    fmt = fmt.strip().lower()
    if fmt:
        return fmt in ("prometheus", "text", "openmetrics")
    ranges = []
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = max(0.0, min(1.0, float(value)))
                except ValueError:
                    q = 0.0
        if media:
            ranges.append((media.lower(), q, position))

    def preference(media_type: str) -> tuple[float, int]:
        """(q, -position) of the most specific range that matches ``media_type``."""
        kind = media_type.split("/")[0] + "/*"
        for pattern in (media_type, kind, "*/*"):
            found = [(q, -pos) for media, q, pos in ranges if media == pattern]
            if found:
                return max(found)
        return (0.0, 0)

    text = max(preference(t) for t in TEXT_TYPES)
    json_pref = preference("application/json")
    return text[0] > 0 and text > json_pref


def _query(environ: dict[str, Any]) -> dict[str, str]:
    parsed = parse_qs(str(environ.get("QUERY_STRING") or ""))
    return {k: v[-1] for k, v in parsed.items()}


def _by_status(status: str) -> int:
    return 503 if status == "unhealthy" else 200


def _send(
    start_response: StartResponse,
    status: int,
    body: Any,
    content_type: str,
    environ: dict[str, Any],
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body, default=str).encode()
    start_response(
        f"{status} {_REASONS.get(status, 'OK')}",
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            *(headers or []),
        ],
    )
    return [] if environ.get("REQUEST_METHOD", "GET").upper() == "HEAD" else [data]
