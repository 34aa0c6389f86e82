"""Flask glue: ``init_app(app)`` serves the health endpoints and closes the manager at exit.

The routes are registered on the app (so they appear in ``app.url_map`` and pass through
Flask's request handling) and answered by :func:`chresilient.health_wsgi_app`, so Flask
and any other WSGI server give the same answers.
"""

from __future__ import annotations

import atexit
from typing import Any

from flask import Flask, Response, request
from werkzeug.wrappers import Response as BaseResponse

from ..client import get_clickhouse_client
from ..health.wsgi import BASE, health_wsgi_app
from ..manager import ClickHouseConnectionManager

EXTENSION = "chresilient"


def init_app(
    app: Flask,
    mgr: ClickHouseConnectionManager | None = None,
    *,
    url_prefix: str = "",
    reconnect_token: str | None = None,
    show_details: bool = True,
    start: bool = True,
) -> ClickHouseConnectionManager:
    """Register ``{url_prefix}/health/clickhouse[/...]`` on ``app``; returns the manager.

    ``mgr`` defaults to the process-wide client's manager. ``reconnect_token`` defaults to
    ``app.config["CHRESILIENT_RECONNECT_TOKEN"]``. ``start=True`` starts the manager's
    background threads without waiting for ClickHouse (``start(wait=False)``), so app
    creation never blocks on the database; readiness reports it until it answers.
    """
    mgr = mgr if mgr is not None else get_clickhouse_client().manager
    token = reconnect_token or app.config.get("CHRESILIENT_RECONNECT_TOKEN") or None
    health_app = health_wsgi_app(mgr, reconnect_token=token, show_details=show_details)
    prefix = url_prefix.rstrip("/")

    def view(subpath: str = "") -> BaseResponse:
        environ = dict(request.environ)
        environ["SCRIPT_NAME"] = str(environ.get("SCRIPT_NAME", "")) + prefix
        environ["PATH_INFO"] = BASE + (f"/{subpath}" if subpath else "")
        return Response.from_app(health_app, environ)

    methods = ["GET", "HEAD", "POST"]
    app.add_url_rule(f"{prefix}{BASE}", "chresilient_health", view, methods=methods)
    app.add_url_rule(
        f"{prefix}{BASE}/<path:subpath>", "chresilient_health_sub", view, methods=methods
    )
    app.extensions[EXTENSION] = mgr
    atexit.register(mgr.close)
    if start and not mgr.started and not mgr.closed:
        mgr.start(wait=False)
    return mgr


def manager_for(app: Any) -> ClickHouseConnectionManager:
    """The manager ``init_app`` attached to ``app``."""
    mgr: ClickHouseConnectionManager = app.extensions[EXTENSION]
    return mgr
