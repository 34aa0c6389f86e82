"""``path("health/", include("chresilient.contrib.django.urls"))``: the health endpoints
of :func:`chresilient.health_wsgi_app` (``clickhouse``, ``clickhouse/ready``, ...), with the
same status codes and bodies; ``POST clickhouse/reconnect`` with the bearer token of
``CHRESILIENT_RECONNECT_TOKEN``."""

from __future__ import annotations

from django.urls import re_path

from .views import health

app_name = "chresilient"
urlpatterns = [
    re_path(r"^clickhouse/?$", health, name="health"),  # the WSGI app takes a trailing /
    re_path(r"^clickhouse/(?P<subpath>[a-z]+)/?$", health, name="health-sub"),
]
