"""Content negotiation of /health/clickhouse/metrics: q-values and order, not substrings."""

from __future__ import annotations

import pytest

from chresilient.health.wsgi import wants_prometheus

PROMETHEUS_SCRAPER = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("fmt", "accept", "text"),
    [
        ("", "", False),
        ("", "*/*", False),
        ("", "application/json, text/plain, */*", False),  # axios, Angular
        ("", "text/plain", True),
        ("", "text/plain;q=0.9, application/json;q=0.5", True),
        ("", "application/json;q=0.5, text/plain;q=0.9", True),
        ("", "text/plain;q=0", False),
        # Equal q: the range listed first wins, whichever it is.
        ("", "text/plain, application/json", True),
        ("", "text/plain;q=0.5, application/json;q=0.5", True),
        ("", "application/json, text/plain", False),
        ("", "text/*", True),
        ("", PROMETHEUS_SCRAPER, True),
        ("", "text/html, application/xhtml+xml, */*;q=0.8", False),  # a browser
        ("PROMETHEUS", "application/json", True),
        ("Text", "", True),
        ("json", "text/plain", False),
        ("", "text/plain;q=abc, application/json", False),
    ],
)
def test_metrics_format(fmt: str, accept: str, text: bool) -> None:
    assert wants_prometheus(fmt, accept) is text
