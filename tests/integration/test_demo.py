"""The README's main job, end to end: the outage demo must report no row lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def test_outage_demo_loses_no_row() -> None:
    result = subprocess.run([sys.executable, str(DEMO), "--quick"], capture_output=True,
                            text=True, timeout=240, stdin=subprocess.DEVNULL, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    report = dict(line.rsplit("  ", 1) for line in out.split("== report ==")[1].splitlines()
                  if "  " in line)
    report = {k.strip(): v.strip() for k, v in report.items()}
    assert report["rows lost"] == "0"
    assert int(report["spooled during the outage"]) > 0
    assert int(report["events sent (accepted by the backend)"]) == int(
        report["distinct events in ClickHouse"])
    assert "GET /health/clickhouse -> 503" in out  # the outage was visible
