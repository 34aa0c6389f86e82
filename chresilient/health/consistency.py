"""Analytics consistency: do the tables the analytics code expects exist as expected?

For each configured :class:`~chresilient.config.AnalyticsTable` it checks existence,
columns and types, the engine, and that a read works; a write is verified through a probe
table this module owns (created if the user may, otherwise reported as not verifiable).
Names reach SQL only as query parameters or backtick-quoted identifiers.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any, Callable

from clickhouse_driver.errors import ServerException

from ..config import Config
from ..config_values import AnalyticsTable
from ..errors import describe
from ..hosts import HostState, first_usable
from ..metrics import utc_iso
from ..statement import qualified
from .common import Report, elapsed_ms

Query = Callable[..., Any]


def check_consistency(
    cfg: Config,
    hosts: Sequence[HostState],
    closed: Callable[[], bool],
    expected: Sequence[AnalyticsTable] | None = None,
) -> Report:
    """The consistency report (see the module docstring); never raises for server trouble."""
    started = time.perf_counter()
    host = first_usable(hosts)
    tables: list[dict[str, Any]] = []
    write: dict[str, Any] = {"status": "not_verifiable", "reason": "not reached"}
    error = None
    try:
        with host.pool.connection(cfg.health_probe_timeout) as conn:

            def query(sql: str, params: Any = None) -> Any:
                return conn.client.execute(sql, params)

            for table in cfg.analytics_tables if expected is None else expected:
                if closed():
                    break
                tables.append(_check_table(query, table, cfg.database))
            write = _write_probe(query, cfg)
    except Exception as exc:  # the connection broke: what was not checked is unknown
        error = describe(exc)
    problems = [f"{t['database']}.{t['table']}: {p}" for t in tables for p in t["problems"]]
    if write["status"] == "failed":
        problems.append(f"write probe: {write['error']}")
    if error is not None:
        problems.append(f"could not complete the check: {error}")
    return {
        "overall_consistent": not problems,
        "checked_at": utc_iso(time.time()),
        "duration_ms": elapsed_ms(started),
        "host": host.label,
        "tables": tables,
        "write_probe": write,
        "problems": problems,
        "error": error,
    }


def normalize_type(text: str) -> str:
    """A type without insignificant whitespace: ``Decimal(12,3)`` == ``Decimal(12, 3)``."""
    out, quoted = [], False
    for char in text.strip():
        if char == "'":
            quoted = not quoted
        if quoted or not char.isspace():
            out.append(char)
    return "".join(out)


def _check_table(query: Query, table: AnalyticsTable, default_db: str) -> dict[str, Any]:
    db = table.database or default_db
    where = {"db": db, "name": table.name}
    finding: dict[str, Any] = {"table": table.name, "database": db, "exists": False}
    problems: list[str] = []
    finding["problems"] = problems
    found = query(
        "SELECT engine FROM system.tables WHERE database = %(db)s AND name = %(name)s", where
    )
    if not found:
        problems.append("table is missing")
        finding["consistent"] = False
        return finding
    finding["exists"] = True
    actual = dict(
        query(
            "SELECT name, type FROM system.columns WHERE database = %(db)s AND table = %(name)s",
            where,
        )
    )
    missing, mismatched = [], []
    for name, expected in table.columns:
        if name not in actual:
            missing.append(name)
            problems.append(f"column {name!r} is missing (expected {expected})")
        elif normalize_type(actual[name]) != normalize_type(expected):
            mismatched.append({"column": name, "expected": expected, "actual": actual[name]})
            problems.append(f"column {name!r} has type {actual[name]} (expected {expected})")
    expected_names = {name for name, _ in table.columns}
    finding.update(
        missing_columns=missing,
        type_mismatches=mismatched,
        extra_columns=[c for c in actual if table.columns and c not in expected_names],
    )
    engine = found[0][0]
    finding["engine"] = {"expected": table.engine, "actual": engine}
    if table.engine is not None and engine != table.engine:
        problems.append(f"engine is {engine} (expected {table.engine})")
    finding["read"] = _read(query, db, table.name)
    if not finding["read"]["ok"]:
        problems.append(f"read failed: {finding['read']['error']}")
    finding["consistent"] = not problems
    return finding


def _read(query: Query, db: str, name: str) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        query(f"SELECT 1 FROM {qualified(db, name)} LIMIT 1")
    except ServerException as exc:
        return {"ok": False, "duration_ms": elapsed_ms(started), "error": describe(exc)}
    return {"ok": True, "duration_ms": elapsed_ms(started), "error": None}


def _write_probe(query: Query, cfg: Config) -> dict[str, Any]:
    """Insert a row into the probe table and read it back."""
    name = cfg.analytics_probe_table
    if name is None:
        return {"status": "not_verifiable", "reason": "write probe disabled"}
    db = cfg.database
    target = qualified(db, name)
    report: dict[str, Any] = {"table": f"{db}.{name}", "created": False}
    started = time.perf_counter()
    exists = query(
        "SELECT count() FROM system.tables WHERE database = %(db)s AND name = %(name)s",
        {"db": db, "name": name},
    )[0][0]
    if not exists:
        try:
            query(
                f"CREATE TABLE IF NOT EXISTS {target} "
                "(writer String, token String, written_at DateTime) "
                "ENGINE = ReplacingMergeTree ORDER BY writer"
            )
        except ServerException as exc:
            reason = f"may not create the probe table: {describe(exc)}"
            return {**report, "status": "not_verifiable", "reason": reason}
        report["created"] = True
    token = uuid.uuid4().hex
    try:
        query(
            f"INSERT INTO {target} (writer, token, written_at) SELECT %(writer)s, %(token)s, now()",
            {"writer": f"{socket.gethostname()}:{os.getpid()}", "token": token},
        )
        seen = query(f"SELECT count() FROM {target} WHERE token = %(token)s", {"token": token})
    except ServerException as exc:
        return {**report, "status": "failed", "error": describe(exc)}
    report["duration_ms"] = elapsed_ms(started)
    if not seen[0][0]:
        return {**report, "status": "failed", "error": "the row written is not readable"}
    return {**report, "status": "ok"}
