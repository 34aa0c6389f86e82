"""The manager of a Django project, built from its settings (no I/O until it is used)."""

from __future__ import annotations

import atexit
import dataclasses
from collections.abc import Mapping
from typing import Any

from django.conf import settings

from ... import fork
from ...config import CircuitBreakerConfig, Config, ConnectionPoolConfig, RetryConfig
from ...config_values import check, parse_bool, parse_float, positive, url_fields
from ...errors import ConfigError, describe
from ...manager import ClickHouseConnectionManager

STARTUP_POLICIES = ("background", "wait", "required")
_SECTIONS = {"retry": RetryConfig, "pool": ConnectionPoolConfig, "breaker": CircuitBreakerConfig}

_lock = fork.ChildLock()  # a parent thread may hold it when gunicorn forks
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
    unknown = sorted(map(str, set(values) - fields))
    if unknown:
        raise ConfigError("CLICKHOUSE", f"unknown key(s) {', '.join(unknown)}")
    top = {k: v for k, v in values.items() if k not in _SECTIONS}
    try:
        return dataclasses.replace(base, **top, **_sections_of(base, values))
    except (TypeError, ValueError) as err:  # a value of the wrong type deep in a field
        raise ConfigError("CLICKHOUSE", describe(err)) from None


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


@dataclasses.dataclass(frozen=True)
class Options:
    """The ``CHRESILIENT_*`` settings, checked: a bad one is a ConfigError naming it."""

    startup: str = "background"
    startup_timeout: float = 60.0
    check_timeout: float = 5.0
    check_connection: bool | None = None  # None: only when `manage.py check` runs
    reconnect_token: str | None = None
    show_details: bool = True


def options() -> Options:
    """Read and check every ``CHRESILIENT_*`` setting."""
    defaults = Options()
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Options):
        name = f"CHRESILIENT_{field.name.upper()}"
        value = getattr(settings, name, getattr(defaults, field.name))
        values[field.name] = _checked(name, field.name, value)
    return Options(**values)


def _checked(name: str, key: str, value: Any) -> Any:
    if key == "startup":
        check(value in STARTUP_POLICIES, name, f"must be one of {', '.join(STARTUP_POLICIES)}")
    elif key in ("startup_timeout", "check_timeout"):
        try:
            value = parse_float(value, name) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"must be a number of seconds, got {value!r}") from None
        positive(value, name)
    elif key in ("check_connection", "show_details"):
        if isinstance(value, str):
            value = parse_bool(value, name)
        check(
            isinstance(value, bool) or (value is None and key == "check_connection"),
            name,
            f"must be True or False, got {value!r}",
        )
    elif key == "reconnect_token":
        check(value is None or isinstance(value, str), name, "must be a string or None")
    return value


def startup_policy() -> str:
    return options().startup


def get_manager() -> ClickHouseConnectionManager:
    """The project's manager, built on first use from the settings; closed at exit."""
    global _manager
    with _lock.held():
        if _manager is None or _manager.closed:
            cfg = config_from_settings(getattr(settings, "CLICKHOUSE", None))
            _manager = ClickHouseConnectionManager(cfg)
            atexit.register(_manager.close)
        return _manager


def start() -> ClickHouseConnectionManager:
    """Apply ``CHRESILIENT_STARTUP``: ``background`` starts the threads and returns at once,
    ``wait`` waits up to ``CHRESILIENT_STARTUP_TIMEOUT`` and goes on degraded,
    ``required`` raises if ClickHouse does not answer in time."""
    opts = options()
    mgr = get_manager()
    if opts.startup == "background":
        mgr.start(wait=False)
    else:
        mgr.start(wait=True, timeout=opts.startup_timeout, required=opts.startup == "required")
    return mgr


def reset() -> None:
    """Close and forget the manager (tests; settings changed)."""
    global _manager
    with _lock.held():
        if _manager is not None:
            _manager.close()
        _manager = None
