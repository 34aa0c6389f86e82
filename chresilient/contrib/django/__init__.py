"""Django glue: ``INSTALLED_APPS += ["chresilient.contrib.django"]``.

Settings: ``CLICKHOUSE`` (a dict of :class:`~chresilient.Config` fields, ``url`` allowed,
``retry``/``pool``/``breaker`` as dicts; unset fields come from the ``CLICKHOUSE_*``
environment), ``CHRESILIENT_STARTUP`` (``background``, ``wait`` or ``required``),
``CHRESILIENT_STARTUP_TIMEOUT``, ``CHRESILIENT_RECONNECT_TOKEN``,
``CHRESILIENT_SHOW_DETAILS``, ``CHRESILIENT_CHECK_TIMEOUT``. Health URLs:
``path("health/", include("chresilient.contrib.django.urls"))``. The WSGI entry point
applies the startup policy: :func:`chresilient.contrib.django.wsgi.get_wsgi_application`.
See docs/django.md.
"""

from __future__ import annotations

from .runtime import get_manager

__all__ = ["get_manager"]
