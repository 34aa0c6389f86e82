"""A tiny run of the benchmark code, so that it cannot rot. Asserts shape, never speed."""

from __future__ import annotations

from pathlib import Path

from benchmarks.__main__ import main


def test_quick_benchmark_run_writes_a_complete_table(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    assert main(["--quick", "--output", str(output)]) == 0
    text = output.read_text()
    for scenario in ("1. per call: SELECT 1", "1. per call: 10,000-row select",
                     "2. concurrency", "3. fail fast", "4. recovery", "5. startup gate",
                     "6. spool", "7. tracing hooks: SELECT 1"):
        assert scenario in text
    for candidate in ("bare driver Client", "ping-free driver (the limit)", "chresilient",
                      "clickhouse-pool",
                      "SQLAlchemy native, pool_pre_ping", "chresilient.sqlalchemy engine"):
        assert f"| {candidate} |" in text
    lines = text.splitlines()
    per_call = [line for line in lines if line.startswith("| 1. per call: SELECT 1 |")
                or line.startswith("| 1. per call: 10,000-row select |")]
    assert len(per_call) == 14
    own_path = [line for line in lines if line.startswith("| 1. per call: chresilient's own")]
    assert len(own_path) == 5 and all(" us per call" in line for line in own_path)
    assert sum("between real queries |" in line for line in own_path) == 3
    steps = [line for line in lines if line.startswith("| 6. spool: one 1000-row batch")]
    assert len(steps) == 9
    for line in per_call:
        ratio = line.split("|")[4].strip()
        assert ratio.endswith("x") and float(ratio[:-1]) > 0
    assert "ClickHouse server" in text and "did not finish" not in text
    assert "all rows stored" in text  # the spool scenario replayed every spooled row
