"""The connection state of one manager: an Enum with exactly one writer.

:class:`ConnectionStatus` is the only code that assigns the state. The call path reports
outcomes, the breakers report openings, the health monitor reports probe rounds; this
object turns those reports into the state and publishes :attr:`Event.RECOVERED`.
"""

from __future__ import annotations

import enum
import threading
import time

import structlog

from . import fork
from .events import Event, Events

log = structlog.get_logger("chresilient")


class ConnectionState(str, enum.Enum):
    CONNECTING = "connecting"  # nothing answered yet
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # serving, but a host or breaker is failing
    UNHEALTHY = "unhealthy"  # nothing serves
    CLOSED = "closed"  # final

    def __str__(self) -> str:  # "healthy" in logs, f-strings and templates, as before
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


class ConnectionStatus:
    """The state, the failure streak and the time of the last success."""

    def __init__(self, events: Events) -> None:
        self._events = events
        self._lock = threading.Lock()
        self._state = ConnectionState.CONNECTING
        self._failures = 0
        self.last_success_wall: float | None = None
        fork.register(self)

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    # -- reports ------------------------------------------------------------------------
    def succeeded(self) -> None:
        """A call or probe got an answer from ClickHouse."""
        self.last_success_wall = time.time()
        if self._failures:
            with self._lock:
                self._failures = 0
        if self._state is not ConnectionState.HEALTHY:
            self._set(ConnectionState.HEALTHY)

    def answered(self) -> None:
        """A probe succeeded: counts as a success for reporting, not for the state."""
        self.last_success_wall = time.time()

    def failed(self, *, all_open: bool) -> int:
        """A countable failure; returns the streak. ``all_open``: every breaker is open."""
        with self._lock:
            self._failures += 1
            streak = self._failures
        self._set(ConnectionState.UNHEALTHY if all_open else ConnectionState.DEGRADED)
        return streak

    def breaker_opened(self, *, all_open: bool) -> None:
        if all_open:
            self._set(ConnectionState.UNHEALTHY)

    def probed(self, state: ConnectionState) -> None:
        """The health monitor's verdict after a round of probes."""
        if state is ConnectionState.HEALTHY:
            self.succeeded()
        else:
            self._set(state)

    def started_degraded(self) -> None:
        """The startup gate gave up but the application starts anyway."""
        self._set(ConnectionState.UNHEALTHY)

    def close(self) -> None:
        self._set(ConnectionState.CLOSED)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    # -- the one writer -----------------------------------------------------------------
    def _set(self, new: ConnectionState) -> None:
        with self._lock:
            old = self._state
            if old is new or old is ConnectionState.CLOSED:
                return
            self._state = new
        if new is ConnectionState.HEALTHY:
            if old is not ConnectionState.CONNECTING:
                log.info("clickhouse_recovered", previous_state=old.value)
            self._events.fire(Event.RECOVERED, previous_state=old.value)
        elif new is not ConnectionState.CLOSED:
            log.warning("clickhouse_state_changed", state=new.value, previous_state=old.value)
