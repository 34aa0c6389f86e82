"""Circuit breaker for ClickHouse calls: closed -> open -> half-open -> closed.

Hand-written on purpose: pybreaker-style libraries either hold their lock while the
protected call runs (one slow query serialises every caller) or have no bounded
half-open state (the moment the timeout expires, every caller becomes a trial). This
one is pure state: its lock is never held across a call or a callback, at most
``half_open_max_calls`` trials run at once, and a health monitor can report probes.
Outcomes of permits issued before the latest transition are ignored as stale.
"""

from __future__ import annotations

import enum
import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional, TypeVar, cast

import structlog

from . import fork
from .config import CircuitBreakerConfig
from .errors import CircuitOpenError, describe, trips_breaker

log = structlog.get_logger("chresilient.breaker")
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class CircuitState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_EVENTS = {
    CircuitState.OPEN: "circuit_breaker_opened",
    CircuitState.HALF_OPEN: "circuit_breaker_half_open",
    CircuitState.CLOSED: "circuit_breaker_closed",
}
# (old, new, consecutive_failures, last_error): collected under the lock, reported after.
_Move = tuple[CircuitState, CircuitState, int, Optional[BaseException]]


class Permit:
    """Leave for one call; end it with one of success/failure/neutral (repeats are no-ops)."""

    __slots__ = ("_breaker", "_done", "_generation", "trial")

    def __init__(self, breaker: CircuitBreaker, generation: int, trial: bool) -> None:
        self._breaker, self._generation, self.trial = breaker, generation, trial
        self._done = False

    def success(self) -> None:
        self._breaker._release(self, "success", None)

    def failure(self, exc: BaseException | None = None) -> None:
        self._breaker._release(self, "failure", exc)

    def neutral(self) -> None:
        """The call failed in a way that says nothing about the server's health."""
        self._breaker._release(self, "neutral", None)


class CircuitBreaker:
    """Thread-safe breaker state machine; see the module docstring."""

    def __init__(
        self,
        config: CircuitBreakerConfig,
        name: str = "clickhouse",
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[str, CircuitState, CircuitState], None] | None = None,
    ) -> None:
        self._config, self._name, self._clock = config, name, clock
        self._on_transition = on_transition
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._generation = 0  # bumped on every transition; older permits are stale
        self._failures = self._opens = self._in_flight = self._trial_successes = 0
        self._last_error: BaseException | None = None
        self._opened_at = self._changed_at = clock()
        fork.register(self)

    def acquire(self) -> Permit:
        """A permit for one call; raises :class:`CircuitOpenError` when refused."""
        generation = self._generation
        if self._state is CircuitState.CLOSED and generation == self._generation:
            # The hot path takes no lock: a closed breaker admits every call, and a call
            # racing with the opening transition is one that started a moment earlier.
            return Permit(self, generation, False)
        moves: list[_Move] = []
        with self._lock:
            now = self._clock()
            self._refresh(now, moves)
            if self._state is CircuitState.CLOSED:
                permit: Permit | None = Permit(self, self._generation, False)
            elif (self._state is CircuitState.HALF_OPEN
                  and self._in_flight < self._config.half_open_max_calls):
                self._in_flight += 1
                permit = Permit(self, self._generation, True)
            else:
                permit, retry_after, last_error = None, self._retry_after(now), self._last_error
        if moves:
            self._notify(moves)
        if permit is None:
            raise CircuitOpenError(self._name, retry_after, last_error)
        return permit

    def record(self, permit: Permit, exc: BaseException | None) -> None:
        """End ``permit`` by classifying ``exc`` (None means success)."""
        if exc is None:
            permit.success()
        elif trips_breaker(exc):
            permit.failure(exc)
        else:
            permit.neutral()

    @contextmanager
    def guard(self) -> Iterator[Permit]:
        """``with breaker.guard():`` acquire, run the block, record its outcome, re-raise."""
        permit = self.acquire()
        try:
            yield permit
        except BaseException as exc:
            self.record(permit, exc)
            raise
        self.record(permit, None)

    def __call__(self, fn: F) -> F:
        """``@breaker``: run ``fn`` under :meth:`guard`."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.guard():
                return fn(*args, **kwargs)

        return cast(F, wrapper)

    def record_probe(self, success: bool, error: BaseException | None = None) -> None:
        """An out-of-band probe: success closes an open/half-open breaker, failure
        restarts the recovery timer of an open one; nothing changes while closed."""

        def apply(now: float, moves: list[_Move]) -> None:
            if success and self._state is not CircuitState.CLOSED:
                self._move(CircuitState.CLOSED, now, moves)
            elif not success and self._state is CircuitState.OPEN:
                self._opened_at = now
                self._last_error = error if error is not None else self._last_error

        self._locked(apply, refresh=False)

    def reset(self) -> None:
        """Force closed; clears the failure streak and last error (not ``opens_total``)."""

        def apply(now: float, moves: list[_Move]) -> None:
            self._move(CircuitState.CLOSED, now, moves, force=True)
            self._last_error = None

        self._locked(apply, refresh=False)

    def force_open(self, error: BaseException | None = None) -> None:
        """Force open, (re)starting the recovery timer."""

        def apply(now: float, moves: list[_Move]) -> None:
            self._last_error = error if error is not None else self._last_error
            self._move(CircuitState.OPEN, now, moves, force=True)

        self._locked(apply, refresh=False)

    @property
    def config(self) -> CircuitBreakerConfig:
        return self._config

    @property
    def name(self) -> str:
        return self._name

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def opens_total(self) -> int:
        """Transitions from closed or half-open into open so far."""
        return self._opens

    @property
    def last_error(self) -> BaseException | None:
        return self._last_error

    @property
    def state(self) -> CircuitState:
        return self._locked(lambda now, moves: self._state)

    @property
    def closed(self) -> bool:
        """Closed right now (an open breaker past its timeout reads half-open)."""
        return self.state is CircuitState.CLOSED

    @property
    def retry_after(self) -> float:
        """Seconds until the breaker goes half-open; 0 unless open."""
        return self._locked(lambda now, moves: self._retry_after(now))

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe state for health endpoints and logs."""
        return self._locked(lambda now, moves: {
            "state": self._state.value,
            "consecutive_failures": self._failures,
            "opens_total": self._opens,
            "half_open_in_flight": self._in_flight,
            "retry_after": round(self._retry_after(now), 3),
            "last_error": None if self._last_error is None else describe(self._last_error),
            "last_state_change": max(0.0, now - self._changed_at),
        })

    def after_fork_in_child(self) -> None:
        """A parent thread may have held the lock at fork time; the parent's half-open
        trials do not run here, and ``opens_total`` counts this process's openings."""
        self._lock = threading.Lock()
        self._in_flight = self._opens = 0

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self._name!r} {self._state.value}>"

    # -- internals: everything below runs with the lock held, except _locked/_notify --
    def _locked(self, fn: Callable[[float, list[_Move]], T], refresh: bool = True) -> T:
        moves: list[_Move] = []
        with self._lock:
            now = self._clock()
            if refresh:
                self._refresh(now, moves)
            value = fn(now, moves)
        self._notify(moves)
        return value

    def _release(self, permit: Permit, outcome: str, exc: BaseException | None) -> None:
        if (outcome == "success" and not permit.trial and not permit._done
                and self._failures == 0 and permit._generation == self._generation):
            permit._done = True  # nothing to reset: the common case takes no lock
            return

        def apply(now: float, moves: list[_Move]) -> None:
            if permit._done:
                return
            permit._done = True
            if permit.trial:  # counted until it ends, whatever period it began in
                self._in_flight -= 1
            if permit._generation != self._generation:
                return
            if outcome == "failure":
                self._failures += 1
                self._last_error = exc if exc is not None else self._last_error
                if permit.trial or self._failures >= self._config.failure_threshold:
                    self._move(CircuitState.OPEN, now, moves)
            elif outcome == "success" and permit.trial:
                self._trial_successes += 1
                if self._trial_successes >= self._config.half_open_max_calls:
                    self._move(CircuitState.CLOSED, now, moves)
            elif outcome == "success":
                self._failures = 0

        self._locked(apply, refresh=False)

    def _refresh(self, now: float, moves: list[_Move]) -> None:
        if (self._state is CircuitState.OPEN
                and now - self._opened_at >= self._config.recovery_timeout):
            self._move(CircuitState.HALF_OPEN, now, moves)

    def _retry_after(self, now: float) -> float:
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._config.recovery_timeout - now)

    def _move(self, new: CircuitState, now: float, moves: list[_Move], force: bool = False) -> None:
        old = self._state
        if old is new and not force:
            return
        self._state, self._changed_at = new, now
        self._generation += 1
        self._trial_successes = 0  # trials in flight stay counted (see _release)
        if new is CircuitState.OPEN:
            self._opened_at = now
            if old is not CircuitState.OPEN:
                self._opens += 1
        elif new is CircuitState.CLOSED:
            self._failures = 0
        if old is not new:
            moves.append((old, new, self._failures, self._last_error))

    def _notify(self, moves: list[_Move]) -> None:
        for old, new, failures, error in moves:
            fields: dict[str, Any] = {"breaker": self._name, "consecutive_failures": failures,
                                      "previous_state": old.value}
            if new is CircuitState.OPEN:
                fields["last_error"] = None if error is None else describe(error)
                fields["retry_after"] = self._config.recovery_timeout
            (log.warning if new is CircuitState.OPEN else log.info)(_EVENTS[new], **fields)
            if self._on_transition is not None:
                try:
                    self._on_transition(self._name, old, new)
                except Exception as exc:
                    log.warning("circuit_breaker_callback_failed", breaker=self._name,
                                error=describe(exc))
