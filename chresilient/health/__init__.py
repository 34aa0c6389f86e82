"""Health: the monitor thread, dependency validation, analytics consistency, WSGI endpoints."""

from .consistency import check_consistency
from .dependencies import validate_dependencies
from .monitor import HealthMonitor
from .status import build_health
from .wsgi import HealthApp, HealthSource, health_wsgi_app

__all__ = [
    "HealthApp",
    "HealthMonitor",
    "HealthSource",
    "build_health",
    "check_consistency",
    "health_wsgi_app",
    "validate_dependencies",
]
