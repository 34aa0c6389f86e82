"""Bad input: what a caller gets for malformed queries, params and rows.

The wrapper must not disguise the caller's mistakes: a malformed query or bad params give
exactly the error the client driver gives for the same input, after one attempt, without
touching the breaker; rows that cannot be inserted fail before the spool whenever that can
be known. Bad env/URL configuration: tests/test_config.py (hypothesis).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client
from clickhouse_driver import errors as driver_errors
from helpers import make_config, wait_for_recovery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chresilient import ClickHouseConnectionManager, InvalidBatchError

# Pieces of SQL a hurried caller might combine. Nothing here can run long or write:
# row sources are system.one and numbers(3) only.
TOKENS = (
    "SELECT", "FROM", "WHERE", "GROUP BY", "ORDER BY", "LIMIT", "AS", "AND", "NOT",
    "1", "2.5", "-", "+", "*", "/", "=", ",", "(", ")", "[", "]", "'x'", "'", "''", "`",
    "\\", "--", ";", "%", "%s", "NULL", "a", "number", "system.one", "numbers(3)",
    "no_such_table_q", "toUInt8", "unknown_fn(", "arrayJoin([1, 2])", "count()", "é",
)  # fmt: skip
TEMPLATES = (
    "SELECT %(a)s",
    "SELECT %(a)s, %(b)s",
    "SELECT %(a)s + %(b)s",
    "SELECT toString(%(a)s)",
    "SELECT length(%(a)s)",
    "SELECT [%(a)s, %(b)s]",
    "SELECT %(a)s %(b)s",
    "SELECT 1 FROM system.one WHERE %(a)s",
    "SELECT %(c)s",
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dates(min_value=dt.date(1970, 1, 2), max_value=dt.date(2100, 1, 1)),
)
HYPOTHESIS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """What a caller observes: the result, or the error's type, code and full message."""
    try:
        return ("result", repr(call()))
    except driver_errors.ServerException as err:
        return ("server error", type(err), err.code, err.message)
    except Exception as err:
        return ("client error", type(err), str(err))


# ClickHouse 18.16's parser reads past the end of an unbalanced query: for "(" or
# "SELECT [1" its message is one of two texts, at random (measured with the client driver:
# 150/50 and 178/22 in 200 tries). So the wrapper's outcome must be one the client driver
# produces for the same input, not necessarily the one it produced last.
DRIVER_TRIES = 200


def assert_as_from_the_driver(ours: tuple[Any, ...], bare_call: Callable[[], Any]) -> None:
    """``ours`` is an outcome the client driver gives for the same call (bounded retries)."""
    seen: list[tuple[Any, ...]] = []
    for _ in range(DRIVER_TRIES):
        theirs = outcome(bare_call)
        if theirs == ours:
            return
        if theirs not in seen:
            seen.append(theirs)
    pytest.fail(f"the wrapper gave {ours!r}; the client driver only ever gave {seen!r}")


def _assert_untouched(mgr: ClickHouseConnectionManager) -> None:
    """Caller mistakes are not retried and say nothing about the server's health."""
    metrics = mgr.metrics()
    assert metrics["retry_attempts"] == 0
    assert metrics["circuit_breaker_state"] == "closed"
    assert metrics["consecutive_failures"] == 0


@HYPOTHESIS
@given(st.lists(st.sampled_from(TOKENS), max_size=8).map(" ".join))
def test_malformed_queries_give_the_servers_error_unchanged(
    mgr: ClickHouseConnectionManager, client: Client, query: str
) -> None:
    before = mgr.metrics()
    assert_as_from_the_driver(outcome(lambda: mgr.execute(query)), lambda: client.execute(query))
    after = mgr.metrics()
    checkouts = after["pool_hits"] + after["pool_misses"]
    assert checkouts - (before["pool_hits"] + before["pool_misses"]) == 1  # one attempt
    _assert_untouched(mgr)


@HYPOTHESIS
@given(
    st.sampled_from(TEMPLATES),
    st.dictionaries(st.sampled_from(("a", "b", "x")), VALUES, max_size=3),
)
def test_malformed_params_give_the_drivers_error_unchanged(
    mgr: ClickHouseConnectionManager, client: Client, query: str, params: dict[str, Any]
) -> None:
    """Missing keys, unencodable text, values the server cannot parse: same as the driver."""
    ours = outcome(lambda: mgr.execute(query, params))
    assert_as_from_the_driver(ours, lambda: client.execute(query, params))
    _assert_untouched(mgr)


def test_server_errors_are_the_drivers_own_exception(
    mgr: ClickHouseConnectionManager, client: Client
) -> None:
    """Not a subclass or a wrapper: ``except ServerException`` code keeps matching exactly."""
    for query in ("SELEC 1", "", "SELECT * FROM no_such_table_q", "SELECT unknown_fn(1)"):
        with pytest.raises(driver_errors.ServerException) as ours:
            mgr.execute(query)
        with pytest.raises(driver_errors.ServerException) as theirs:
            client.execute(query)
        assert type(ours.value) is type(theirs.value) is driver_errors.ServerException
        assert (ours.value.code, ours.value.message) == (theirs.value.code, theirs.value.message)
    _assert_untouched(mgr)


# -- rows that cannot be inserted ----------------------------------------------------------
BAD_ROWS = {
    "string for UInt32": [(1, "a"), ("x", "b")],
    "negative for UInt32": [(-1, "a")],
    "float for UInt32": [(1.5, "a")],
    "None for UInt32": [(None, "a")],
    "int for String": [(1, 2)],
    "too wide for the table": [(1, "a", 3)],
    "too narrow for the table": [(1,)],
}


def _spool_is_empty(mgr: ClickHouseConnectionManager) -> None:
    spool = mgr.spool
    assert spool is not None
    status = spool.status()
    assert (status["pending_batches"], status["failed_batches"]) == (0, 0), status
    assert mgr.metrics()["spool_batches_written"] == 0


def test_bad_rows_fail_before_the_spool_while_clickhouse_is_up(
    clickhouse: Any, client: Client, tmp_path: Path
) -> None:
    """Wrong types or a width that does not match the table: the driver's own error, as the
    client driver raises it, and nothing spooled, sent or counted against the server.

    The driver learns the column types from the server (the INSERT's sample block) and
    serializes client side, so its error comes before any row leaves the process.
    """
    mgr = ClickHouseConnectionManager(make_config(clickhouse, spool_dir=str(tmp_path)))
    table = f"bad_rows_{uuid.uuid4().hex[:8]}"
    client.execute(f"CREATE TABLE {table} (id UInt32, s String) ENGINE = MergeTree ORDER BY id")
    try:
        for case, rows in BAD_ROWS.items():
            ours = outcome(lambda rows=rows: mgr.insert(table, rows))
            assert ours[0] == "client error", (case, ours)
            assert ours == outcome(
                lambda rows=rows: client.execute(f"INSERT INTO {table} VALUES", rows)
            ), case
        # A width that contradicts the given column names is caught before any connection
        # (tests/test_spool.py::test_bad_rows_fail_before_anything_is_sent_or_spooled).
        with pytest.raises(InvalidBatchError):
            mgr.insert(table, [(1, "a", 3)], ["id", "s"])
        assert client.execute(f"SELECT count() FROM {table}") == [(0,)]
        _spool_is_empty(mgr)
        _assert_untouched(mgr)
        assert mgr.insert(table, [(1, "a")]).delivered  # and the manager is fine
    finally:
        client.execute(f"DROP TABLE {table}")
        mgr.close()


def test_bad_rows_while_clickhouse_is_down_are_spooled_then_set_aside(
    clickhouse: Any, fault_proxy: Any
) -> None:
    """The honest limit: without the server the column types are unknown, so a bad batch
    is spooled like any other. Replay then meets the driver's error, sets that batch
    aside (kept for inspection, never retried in a loop) and delivers the rest.
    """
    mgr = ClickHouseConnectionManager(make_config(fault_proxy, auth=clickhouse))
    table = f"bad_rows_{uuid.uuid4().hex[:8]}"
    mgr.execute(f"CREATE TABLE {table} (id UInt32, s String) ENGINE = MergeTree ORDER BY id")
    try:
        fault_proxy.refuse()
        fault_proxy.reset_active()
        results = [
            mgr.insert(table, [(1, "good")]),
            mgr.insert(table, BAD_ROWS["string for UInt32"]),
            mgr.insert(table, BAD_ROWS["too wide for the table"]),
            mgr.insert(table, [(2, "good")]),
        ]
        assert all(r.spooled for r in results)
        spool = mgr.spool
        assert spool is not None and spool.pending().batches == 4
        fault_proxy.pass_through()
        wait_for_recovery(mgr)
        report = spool.replay()
        assert (report.outcome, report.batches, report.set_aside) == ("drained", 2, 2)
        assert mgr.execute(f"SELECT id, s FROM {table} ORDER BY id") == [(1, "good"), (2, "good")]
        status = spool.status()
        assert (status["pending_batches"], status["failed_batches"]) == (0, 2)
        assert mgr.metrics()["spool_batches_set_aside"] == 2
        # The driver's own words may quote the bad value: kept as type (and code) only.
        assert str(report.last_error).startswith(("TypeMismatchError 53", "ValueError"))
        assert "withheld" in str(report.last_error)
    finally:
        fault_proxy.pass_through()
        mgr.execute(f"DROP TABLE {table}")
        mgr.close()
