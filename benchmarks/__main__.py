"""``python -m benchmarks``: run the scenarios, print the table, write RESULTS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import clickhouse_driver

from chresilient.testing.server import LocalClickHouse

from .scenarios import SCENARIOS, Row, Size

DEFAULT_OUTPUT = Path(__file__).with_name("RESULTS.md")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _table(rows: Sequence[Row]) -> list[str]:
    lines = ["| scenario | candidate | figure | ratio vs bare | target | met | note |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row.ratio:.3f}x" if row.ratio is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        lines.append(f"| {row.scenario} | {row.candidate} | {row.figure} | {ratio} | "
                     f"{row.target} | {met} | {row.note} |")
    return lines


def report(rows: Sequence[Row], server_version: str, size_name: str) -> str:
    header = [
        "# Benchmark results",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {_cpu_model()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}",
        f"- Python {platform.python_version()}, clickhouse-driver {clickhouse_driver.__version__}",
        f"- ClickHouse server {server_version} (private local process on loopback)",
        f"- run: `python -m benchmarks{' --quick' if size_name == 'quick' else ''}`",
        "",
        "Ratios compare per-call medians of single calls interleaved in a shuffled order",
        "with the bare driver in the same run; absolute times vary between runs and machines.",
        "",
    ]
    return "\n".join(header + _table(rows)) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where to write the Markdown report (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    size = Size.quick() if args.quick else Size.full()
    rows: list[Row] = []
    with LocalClickHouse() as server:
        version = server.version or "unknown"
        for scenario in SCENARIOS:
            print(f"running {scenario.__name__} ...", file=sys.stderr, flush=True)
            rows.extend(scenario(server, size))
    text = report(rows, version, "quick" if args.quick else "full")
    print(text)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
