"""``manage.py check``: the settings make a valid Config, and ClickHouse takes it.

``chresilient.E001`` a bad ``CLICKHOUSE`` / ``CHRESILIENT_*`` setting; ``chresilient.E002``
ClickHouse refused the credentials or the database (waiting cannot fix it);
``chresilient.W001`` ClickHouse did not answer within ``CHRESILIENT_CHECK_TIMEOUT`` (5 s):
the site can run degraded, so it is a warning.
"""

from __future__ import annotations

from typing import Any

from django.core import checks

from ...errors import ConfigError, StartupError, StartupTimeoutError, describe
from ...manager import ClickHouseConnectionManager
from .runtime import config_from_settings, option, startup_policy

HINT_CONFIG = "settings.CLICKHOUSE maps onto chresilient.Config (docs/django.md)"


def clickhouse_check(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from django.conf import settings

    try:
        cfg = config_from_settings(getattr(settings, "CLICKHOUSE", None))
        startup_policy()
    except ConfigError as err:
        return [checks.Error(str(err), hint=HINT_CONFIG, id="chresilient.E001")]
    timeout = float(option("CHECK_TIMEOUT", 5.0))
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
