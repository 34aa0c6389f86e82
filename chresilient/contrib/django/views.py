"""One view that hands the request to the WSGI health app, so Django answers exactly as
:func:`chresilient.health_wsgi_app` does (it is the same code)."""

from __future__ import annotations

import threading
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from ...health.wsgi import BASE, HealthApp, health_wsgi_app
from .runtime import get_manager, option

_lock = threading.Lock()
_apps: dict[int, HealthApp] = {}


def _health_app() -> HealthApp:
    mgr = get_manager()
    with _lock:  # one app per manager: its single-flight reconnect is shared
        app = _apps.get(id(mgr))
        if app is None or app.mgr is not mgr:
            app = health_wsgi_app(
                mgr,
                reconnect_token=option("RECONNECT_TOKEN", None),
                show_details=bool(option("SHOW_DETAILS", True)),
            )
            _apps.clear()
            _apps[id(mgr)] = app
        return app


def _health(request: HttpRequest, subpath: str = "") -> HttpResponse:
    environ = dict(request.META)
    environ["PATH_INFO"] = BASE + (f"/{subpath}" if subpath else "")
    environ["REQUEST_METHOD"] = request.method or "GET"
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        captured["status"], captured["headers"] = status, headers

    body = b"".join(_health_app()(environ, start_response))
    response = HttpResponse(body, status=int(captured["status"].split()[0]))
    for name, value in captured["headers"]:
        response[name] = value
    return response


# POST /reconnect authenticates with a bearer token, not a session cookie.
health = csrf_exempt(_health)
