"""``path("health/", include("chresilient.contrib.django.urls"))``: the health endpoints
of :func:`chresilient.health_wsgi_app` (``clickhouse``, ``clickhouse/ready``, ...), with the
same status codes and bodies; ``POST clickhouse/reconnect`` with the bearer token of
``CHRESILIENT_RECONNECT_TOKEN``."""

from __future__ import annotations

from django.urls import path, re_path

from .views import health

app_name = "chresilient"
urlpatterns = [
    path("clickhouse", health, name="health"),
    re_path(r"^clickhouse/(?P<subpath>[a-z]+)$", health, name="health-sub"),
]
