"""The documented import path of the Prometheus collector (see chresilient.observability)."""

from .observability.prometheus import (
    ManagerCollector,
    MetricsSource,
    exposition,
    multiprocess_dir,
    register_collector,
)

__all__ = [
    "ManagerCollector",
    "MetricsSource",
    "exposition",
    "multiprocess_dir",
    "register_collector",
]
