"""``application = get_wsgi_application()`` in the project's wsgi.py: Django's application,
with the manager started by ``CHRESILIENT_STARTUP`` before the first request (so a
worker of gunicorn or uWSGI waits for ClickHouse when the policy says so, and management
commands never do)."""

from __future__ import annotations

from typing import Any

from django.core.wsgi import get_wsgi_application as django_wsgi_application

from .runtime import start


def get_wsgi_application() -> Any:
    application = django_wsgi_application()
    start()
    return application
