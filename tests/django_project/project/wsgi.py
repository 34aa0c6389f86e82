"""The project's WSGI entry point: Django's application, ClickHouse started by the
CHRESILIENT_STARTUP policy."""

import os

from chresilient.contrib.django.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
application = get_wsgi_application()
