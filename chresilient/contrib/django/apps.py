"""The Django app: registers the system checks; builds nothing until it is used."""

from __future__ import annotations

from django.apps import AppConfig


class ChresilientConfig(AppConfig):  # type: ignore[misc]  # Django has no types
    name = "chresilient.contrib.django"
    label = "chresilient"
    verbose_name = "chresilient (ClickHouse)"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the checks
