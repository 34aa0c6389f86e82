"""Installed as the driver's ``conftest.py``: with CHRESILIENT_DRIVER_SWAP=1 every name
the driver's tests bind to ``clickhouse_driver.Client`` becomes ``chresilient.Client``.

With the variable unset the same tests run against the bare driver, so the two PASSED
sets can be compared on the same server. ``clickhouse_driver.client.Client`` itself is
left alone: the driver's own code refers to it (``super(Client, self)``).
"""

import os
import sys

SWAP = os.environ.get("CHRESILIENT_DRIVER_SWAP") == "1"

if SWAP:
    import clickhouse_driver
    import clickhouse_driver.dbapi.connection

    import chresilient

    # Retries as in production but with short pauses, so the tests that break the
    # network on purpose do not wait out a real backoff.
    CONFIG = chresilient.Config(
        spool_enabled=False,
        retry=chresilient.RetryConfig(initial_delay=0.05, max_delay=0.5),
    )

    class Client(chresilient.Client):
        """``chresilient.Client`` with the configuration above."""

        def __init__(self, *args, config=None, **kwargs):
            super().__init__(*args, config=config or CONFIG, **kwargs)

    DRIVER_CLIENT = clickhouse_driver.Client
    clickhouse_driver.Client = Client
    clickhouse_driver.dbapi.connection.Client = Client


def pytest_collection_modifyitems(session, config, items):
    """Test modules (and tests.testcase) imported the driver's class by name: rebind."""
    if not SWAP:
        return
    for name, module in list(sys.modules.items()):
        if name.startswith("tests") and getattr(module, "Client", None) is DRIVER_CLIENT:
            module.Client = Client
