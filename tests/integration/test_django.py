"""The Django test project (tests/django_project) in a pytest process of its own:
pytest-django needs Django configured for the whole run, and the rest of the suite is
not a Django project. It uses chresilient's pytest plugin for its ClickHouse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1] / "django_project"


def test_the_django_project_passes_its_tests_against_a_real_clickhouse() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT.parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "7 passed" in done.stdout, done.stdout[-3000:]
