"""Benchmarks of chresilient against the bare clickhouse-driver and other pools.

Run ``python -m benchmarks`` (or ``tox -e bench``): it starts a private ClickHouse, prints a
table of ratios against the bare driver measured in the same run, and writes
``benchmarks/RESULTS.md``.
"""
