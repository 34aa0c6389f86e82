"""The manager of a Django project, built from its settings (no I/O until it is used)."""

from __future__ import annotations

import atexit
import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

from django.conf import settings

from ...config import CircuitBreakerConfig, Config, ConnectionPoolConfig, RetryConfig
from ...config_values import url_fields
from ...errors import ConfigError
from ...manager import ClickHouseConnectionManager

STARTUP_POLICIES = ("background", "wait", "required")
_SECTIONS = {"retry": RetryConfig, "pool": ConnectionPoolConfig, "breaker": CircuitBreakerConfig}

_lock = threading.Lock()
_manager: ClickHouseConnectionManager | None = None


def config_from_settings(values: Mapping[str, Any] | None) -> Config:
    """``settings.CLICKHOUSE`` over the ``CLICKHOUSE_*`` environment (``url`` first)."""
    base = Config.from_env()
    if not values:
        return base
    if not isinstance(values, Mapping):
        raise ConfigError("CLICKHOUSE", f"must be a dict, got {type(values).__name__}")
    values = dict(values)
    url = values.pop("url", None)
    if url:
        try:
            base = dataclasses.replace(base, **url_fields(str(url)))
        except ConfigError as err:
            raise ConfigError("CLICKHOUSE['url']", err.problem) from None
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError("CLICKHOUSE", f"unknown key(s) {', '.join(unknown)}")
    top = {k: v for k, v in values.items() if k not in _SECTIONS}
    return dataclasses.replace(base, **top, **_sections_of(base, values))


def _sections_of(base: Config, values: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, kind in _SECTIONS.items():
        section = values.get(name, {})
        if isinstance(section, kind):
            out[name] = section
            continue
        if not isinstance(section, Mapping):
            raise ConfigError(f"CLICKHOUSE[{name!r}]", f"must be a dict or a {kind.__name__}")
        try:
            out[name] = dataclasses.replace(getattr(base, name), **section)
        except TypeError as err:
            raise ConfigError(f"CLICKHOUSE[{name!r}]", str(err)) from None
    return out


def option(name: str, default: Any) -> Any:
    """A ``CHRESILIENT_<NAME>`` setting."""
    return getattr(settings, f"CHRESILIENT_{name}", default)


def startup_policy() -> str:
    policy = option("STARTUP", "background")
    if policy not in STARTUP_POLICIES:
        raise ConfigError(
            "CHRESILIENT_STARTUP", f"must be one of {', '.join(STARTUP_POLICIES)}, got {policy!r}"
        )
    return str(policy)


def get_manager() -> ClickHouseConnectionManager:
    """The project's manager, built on first use from the settings; closed at exit."""
    global _manager
    with _lock:
        if _manager is None or _manager.closed:
            cfg = config_from_settings(getattr(settings, "CLICKHOUSE", None))
            _manager = ClickHouseConnectionManager(cfg)
            atexit.register(_manager.close)
        return _manager


def start() -> ClickHouseConnectionManager:
    """Apply ``CHRESILIENT_STARTUP``: ``background`` starts the threads and returns at once,
    ``wait`` waits up to ``CHRESILIENT_STARTUP_TIMEOUT`` and goes on degraded,
    ``required`` raises if ClickHouse does not answer in time."""
    policy = startup_policy()
    mgr = get_manager()
    timeout = float(option("STARTUP_TIMEOUT", 60.0))
    if policy == "background":
        mgr.start(wait=False)
    else:
        mgr.start(wait=True, timeout=timeout, required=policy == "required")
    return mgr


def reset() -> None:
    """Close and forget the manager (tests; settings changed)."""
    global _manager
    with _lock:
        if _manager is not None:
            _manager.close()
        _manager = None
