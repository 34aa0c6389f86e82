"""clickhouse-driver's ``Client(...)`` arguments as a :class:`Config`.

What makes ``from chresilient import Client`` a one-line migration: the arguments are
bound against the driver's own ``Connection`` signature, so the same calls work and an
unknown keyword is the same ``TypeError``; URLs are parsed by the driver's ``parse_url``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from clickhouse_driver.connection import Connection

from .config import Config
from .config_values import DRIVER_OPTIONS

_CONNECTION = inspect.signature(Connection.__init__)

# The driver's defaults that mean "whatever Config says" here (None timeouts included:
# the driver waits forever, a pooled client never does).
_UNSET: Mapping[str, Any] = {
    "port": None,
    "database": "",
    "alt_hosts": None,
    "connect_timeout": None,
    "send_receive_timeout": None,
}
# The driver's own default: a statement may be silent this long (OPTIMIZE, big INSERT
# ... SELECT). Used when neither the arguments nor ``config`` say otherwise.
DRIVER_SEND_RECEIVE_TIMEOUT = 300.0


def config_from_driver_args(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], base: Config | None = None
) -> Config:
    """A Config for ``clickhouse_driver.Client(*args, **kwargs)``; pool, retry, breaker and
    spool settings come from ``base`` (defaults: no spool, nothing read from the
    environment). Raises ``TypeError`` for arguments the driver would not take."""
    kwargs = dict(kwargs)
    settings = dict(kwargs.pop("settings", None) or {})
    round_robin = bool(kwargs.pop("round_robin", False))
    try:
        given = _CONNECTION.bind(None, *args, **kwargs).arguments
    except TypeError as err:
        raise TypeError(f"Client(): {err}") from None
    given.pop("self")
    cfg = base if base is not None else Config(spool_enabled=False)
    fields: dict[str, Any] = {}
    options = dict(cfg.driver_options)
    if base is None and given.get("send_receive_timeout") is None:
        timeout = DRIVER_SEND_RECEIVE_TIMEOUT
        fields["retry"] = dataclasses.replace(cfg.retry, timeout_per_attempt=timeout)
    for name, value in given.items():
        if name in _UNSET and (value == _UNSET[name] or value is None):
            continue
        if name == "alt_hosts" and not value:
            continue
        if name in DRIVER_OPTIONS:
            options[name] = value
        elif name == "connect_timeout":
            fields["pool"] = dataclasses.replace(cfg.pool, connect_timeout=float(value))
        elif name == "send_receive_timeout":
            fields["retry"] = dataclasses.replace(cfg.retry, timeout_per_attempt=float(value))
        elif name == "alt_hosts":
            fields[name] = value  # Config parses "host:port,host" as the driver does
        elif name == "port":
            fields[name] = int(value)
        else:  # host, database, user, password, client_name, compression, secure, verify, ...
            fields[name] = value
    if "port" not in fields and "secure" in fields:
        fields["port"] = 0  # the native port for the new ``secure``
    if settings:
        fields["settings"] = {**cfg.settings, **settings}
    if round_robin:
        fields["load_balancing"] = "round_robin"
    return dataclasses.replace(cfg, driver_options=options, **fields)
