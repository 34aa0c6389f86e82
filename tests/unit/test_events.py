"""The listener registry and the connection state: pure logic, no server."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from chresilient.errors import (
    CircuitOpenError,
    ClickHouseUnavailableError,
    ConfigError,
    InsertSourceError,
    SessionStateError,
    SpoolFullError,
    StartupError,
)
from chresilient.events import Event, Events
from chresilient.state import ConnectionState, ConnectionStatus


def test_a_broken_listener_never_reaches_the_publisher() -> None:
    events, seen = Events(), []

    def broken(**_: Any) -> None:
        raise TypeError("listener bug")

    events.listen(Event.CALL_FAILED, broken)
    events.listen(Event.CALL_FAILED, lambda **payload: seen.append(payload))
    events.fire(Event.CALL_FAILED, host="h:9000", error=ConnectionError("x"))  # no raise
    assert [p["host"] for p in seen] == ["h:9000"]  # later listeners still run
    events.remove(Event.CALL_FAILED, broken)
    events.fire(Event.CALL_FAILED, host="h:9000", error=None)
    assert len(seen) == 2
    assert events.on_call_succeeded == ()


def test_status_is_the_one_writer_and_publishes_recovery() -> None:
    events, recovered = Events(), []
    events.listen(Event.RECOVERED, lambda previous_state: recovered.append(previous_state))
    status = ConnectionStatus(events)
    assert status.state is ConnectionState.CONNECTING
    status.succeeded()  # the first success: healthy, and replayers may drain
    assert recovered == ["connecting"]
    assert status.failed(all_open=False) == 1 and status.state is ConnectionState.DEGRADED
    assert status.failed(all_open=True) == 2 and status.state is ConnectionState.UNHEALTHY
    status.succeeded()
    assert recovered == ["connecting", "unhealthy"] and status.consecutive_failures == 0
    status.close()
    status.succeeded()  # closed is final
    assert status.state is ConnectionState.CLOSED


def test_state_reads_as_its_value() -> None:
    state = ConnectionState.HEALTHY
    assert state == "healthy" and str(state) == "healthy"
    assert f"{state}" == "healthy" and "%s" % state == "healthy"  # noqa: UP031 (logging style)
    assert f"{state:>8}" == " healthy"


@pytest.mark.parametrize(
    "error",
    [
        CircuitOpenError("h:9000", 2.5, ConnectionError("down")),
        ConfigError("port", "bad"),
        ClickHouseUnavailableError("gave up", EOFError(), attempts=3),
        SessionStateError("USE refused"),
        StartupError("auth", last_error=ValueError("x")),
        SpoolFullError("full"),
        InsertSourceError("source failed", totals={"rows": 25}, next_row=25),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_cross_process_boundaries(error: Exception) -> None:
    # multiprocessing pickles a task's exception: a failed unpickle hangs the pool.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert vars(copy).keys() == vars(error).keys()
