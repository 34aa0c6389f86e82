"""The listener registry the core publishes to, in the spirit of SQLAlchemy's PoolEvents.

The core (breakers, the call path, the connection state) says what happened; services
(health monitor, spool replayer, instrumentation) subscribe. The core never imports a
service: adding one means adding a listener, not an import.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from typing import Any, Callable

import structlog

from . import fork

log = structlog.get_logger("chresilient.events")

Listener = Callable[..., None]


class Event(str, enum.Enum):
    """What the core publishes, and the keyword arguments each listener receives."""

    BREAKER_OPENED = "breaker_opened"  # host: str
    BREAKER_CLOSED = "breaker_closed"  # host: str
    CALL_FAILED = "call_failed"  # host: str, error: BaseException (a countable failure)
    CALL_SUCCEEDED = "call_succeeded"  # host: str
    RECOVERED = "recovered"  # previous_state: str (the connection state became healthy)
    CLOSING = "closing"  # (no arguments) the manager is closing
    PROBED = "probed"  # state: str (the health monitor finished a round of probes)


class Events:
    """Per-manager listener registry. ``fire`` never raises: a broken listener is logged.

    Listeners run in the thread that fired the event, after the core released its locks;
    they must be quick (wake a thread, bump a counter) and must not call back into the
    call path.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Copy-on-write tuples: fire() reads without a lock.
        self._listeners: dict[Event, tuple[Listener, ...]] = {}
        fork.register(self)

    def listen(self, event: Event, listener: Listener) -> None:
        with self._lock:
            self._listeners[event] = (*self._listeners.get(event, ()), listener)

    def remove(self, event: Event, listener: Listener) -> None:
        with self._lock:
            self._listeners[event] = tuple(
                fn for fn in self._listeners.get(event, ()) if fn != listener
            )

    def has_listeners(self, event: Event) -> bool:
        return bool(self._listeners.get(event))

    @property
    def on_call_succeeded(self) -> tuple[Listener, ...]:
        """The listeners of :attr:`Event.CALL_SUCCEEDED`, read once per call by the hot
        path (which then skips the event entirely while there are none)."""
        return self._listeners.get(Event.CALL_SUCCEEDED, ())

    def fire(self, event: Event, **payload: Any) -> None:
        for listener in self._listeners.get(event, ()):
            try:
                listener(**payload)
            except Exception as exc:  # the call that fired must not fail for a listener
                with contextlib.suppress(Exception):
                    log.warning("event_listener_failed", published=event.value, error=repr(exc))

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
