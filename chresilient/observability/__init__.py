"""Metrics as a dict (``mgr.metrics()``) and as Prometheus text, from snapshots."""

from .prometheus import ManagerCollector, exposition, register_collector
from .snapshot import metrics_snapshot

__all__ = ["ManagerCollector", "exposition", "metrics_snapshot", "register_collector"]
