"""``manage.py check``: the settings make a valid Config, and ClickHouse takes it.

``chresilient.E001`` a bad ``CLICKHOUSE`` / ``CHRESILIENT_*`` setting; ``chresilient.E002``
ClickHouse refused the credentials or the database (waiting cannot fix it);
``chresilient.W001`` ClickHouse did not answer within ``CHRESILIENT_CHECK_TIMEOUT`` (5 s):
the site can run degraded, so it is a warning. Django runs system checks before most
commands (``migrate``, ``runserver``); the settings are checked every time, ClickHouse
only by ``manage.py check`` itself (``CHRESILIENT_CHECK_CONNECTION``: True always,
False never).
"""

from __future__ import annotations

import sys
from typing import Any

from django.core import checks

from ...errors import ConfigError, StartupError, StartupTimeoutError, describe
from ...manager import ClickHouseConnectionManager
from .runtime import config_from_settings, options

HINT_CONFIG = "settings.CLICKHOUSE maps onto chresilient.Config (docs/django.md)"


def clickhouse_check(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from django.conf import settings

    try:
        cfg = config_from_settings(getattr(settings, "CLICKHOUSE", None))
        opts = options()
    except ConfigError as err:
        return [checks.Error(str(err), hint=HINT_CONFIG, id="chresilient.E001")]
    connect = opts.check_connection
    if connect is False or (connect is None and not _running("check")):
        return []
    timeout = opts.check_timeout
    # A manager of its own: the check must not start the site's threads or pools.
    with ClickHouseConnectionManager(cfg) as mgr:
        try:
            mgr.wait_until_ready(timeout)
        except StartupError as err:
            return [checks.Error(str(err), id="chresilient.E002")]
        except StartupTimeoutError as err:
            return [
                checks.Warning(
                    f"ClickHouse at {cfg.safe_url()} did not answer within {timeout:g}s: "
                    f"{describe(err)}",
                    hint="the site starts degraded; see CHRESILIENT_STARTUP",
                    id="chresilient.W001",
                )
            ]
    return []


checks.register(clickhouse_check, "chresilient")


def _running(command: str) -> bool:
    """This process is ``manage.py <command>`` (or ``django-admin <command>``)."""
    return sys.argv[1:2] == [command]
