"""``tests.util`` as clickhouse-driver's tests use it (version skips, log capture, TZ)."""

import logging
import os
import time
from contextlib import contextmanager
from functools import wraps
from io import StringIO


def skip_by_server_version(testcase, version_required):
    testcase.skipTest(
        "Minimum server version required: {}".format(".".join(map(str, version_required)))
    )


def require_server_version(*version_required):
    def check(f):
        @wraps(f)
        def wrapper(self, *args, **kwargs):
            self.client.connection.connect()
            current = self.client.connection.server_info.version_tuple()
            if version_required <= current:
                return f(self, *args, **kwargs)
            skip_by_server_version(self, version_required)

        return wrapper

    return check


class capture_logging:  # the name the driver's tests import
    def __init__(self, logger_name, level):
        self.logger = logging.getLogger(logger_name)
        self.level = level

    def __enter__(self):
        self.buffer = StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.logger.addHandler(self.handler)
        self.old_level = self.logger.level
        self.logger.setLevel(self.level)
        return self.buffer

    def __exit__(self, *exc_info):
        self.logger.setLevel(self.old_level)
        self.logger.removeHandler(self.handler)


@contextmanager
def patch_env_tz(tz_name):
    old = os.environ.get("TZ")
    os.environ["TZ"] = tz_name
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()
