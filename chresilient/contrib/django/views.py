"""One view that hands the request to the WSGI health app, so Django answers exactly as
:func:`chresilient.health_wsgi_app` does (it is the same code)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from ... import fork
from ...health.wsgi import BASE, HealthApp, health_wsgi_app
from .runtime import get_manager, options

_lock = fork.ChildLock()  # a parent thread may hold it when gunicorn forks
_apps: dict[tuple[int, str | None, bool], HealthApp] = {}


def _health_app() -> HealthApp:
    mgr, opts = get_manager(), options()
    key = (id(mgr), opts.reconnect_token, opts.show_details)
    with _lock.held():  # one app per manager and settings: its single-flight reconnect is shared
        app = _apps.get(key)
        if app is None or app.mgr is not mgr:
            app = health_wsgi_app(
                mgr, reconnect_token=opts.reconnect_token, show_details=opts.show_details
            )
            _apps.clear()
            _apps[key] = app
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
