"""Settings of the test project: ClickHouse from CLICKHOUSE_URL (the tests point it at a
private server), fast retries so an outage shows within a second."""

import os
import tempfile

SECRET_KEY = "only-for-the-tests"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["chresilient.contrib.django"]
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
DATABASES: dict = {}
USE_TZ = True

CLICKHOUSE = {
    "url": os.environ.get("CLICKHOUSE_URL", "clickhouse://default@127.0.0.1:9000/default"),
    "spool_dir": tempfile.mkdtemp(prefix="chresilient-django-"),
    "retry": {"initial_delay": 0.05, "max_delay": 0.2, "timeout_per_attempt": 2.0,
              "total_timeout": 3.0},
    "pool": {"health_check_interval": 0.3},
    "breaker": {"recovery_timeout": 1.0},
}
CHRESILIENT_STARTUP = "background"
CHRESILIENT_RECONNECT_TOKEN = "reconnect-token-for-tests"
CHRESILIENT_CHECK_TIMEOUT = 3.0
