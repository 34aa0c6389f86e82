"""Retry: full-jitter exponential backoff, per-attempt and overall deadlines, a retry budget.

The loop is written by hand rather than with tenacity on purpose: it sits on every query's
hot path, and tenacity's per-call machinery measured 12-28 us here (5-10% of a loopback
``SELECT 1``); the loop also has to hand each attempt its own time bound, which tenacity's
callback structure makes awkward. :class:`RetryPolicy` is immutable, like urllib3's
``Retry``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from . import fork
from .config import RetryConfig
from .errors import (
    REFUSED_BEFORE_WRITE_CODES,
    SLOW_DOWN_CODES,
    UNAVAILABLE_KINDS,
    CircuitOpenError,
    ClickHouseUnavailableError,
    ConnectFailedError,
    classify,
    describe,
    server_code,
)
from .statement import READ, Statement

T = TypeVar("T")
log = structlog.get_logger("chresilient.retry")

# Longest wait before a retry that fails over to a host the call has not tried yet: that
# host did not fail, so waiting for the failed one to recover gains nothing.
FAILOVER_MAX_DELAY = 0.05


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry one call, and whether it may be retried.

    The one place that decides retryability (:meth:`is_retry`), as urllib3's ``Retry``
    does: nothing else in the library second-guesses it.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    max_delay: float = 30.0
    exponential_base: float = 2.0
    jitter: bool = True
    timeout_per_attempt: float = 15.0
    total_timeout: float | None = 60.0

    @classmethod
    def from_config(cls, cfg: RetryConfig) -> RetryPolicy:
        return cls(
            max_attempts=cfg.max_attempts,
            initial_delay=cfg.initial_delay,
            max_delay=cfg.max_delay,
            exponential_base=cfg.exponential_base,
            jitter=cfg.jitter,
            timeout_per_attempt=cfg.timeout_per_attempt,
            total_timeout=cfg.total_timeout,
        )

    def is_retry(self, exc: BaseException, statement: Statement = READ) -> bool:
        """Whether another attempt of ``statement`` after ``exc`` is safe and useful.

        Only transport and transient errors are worth another attempt. A read can always
        be repeated, and so can a write that never reached a server (its connect failed) or
        that the server refused up front (``REFUSED_BEFORE_WRITE_CODES``). A write whose
        outcome is unknown (the connection broke, 319, a memory limit mid-way) is repeated
        only when the server deduplicates it by token; data from a one-shot iterator is
        never sent twice.
        """
        if not statement.replayable or classify(exc) not in UNAVAILABLE_KINDS:
            return False
        return (
            not statement.is_write
            or statement.deduplicated
            or isinstance(exc, ConnectFailedError)  # the connect failed: nothing was sent
            or server_code(exc) in REFUSED_BEFORE_WRITE_CODES
        )

    def backoff(
        self,
        retry_number: int,
        *,
        slow_down: bool = False,
        rng: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry ``retry_number`` (1 = the first retry).

        Full jitter: uniform in ``[0, min(max_delay, initial * base**(n-1))]``. After an
        error that asks the client to slow down (TOO_MANY_PARTS, memory limit) the whole
        step is taken, without jitter.
        """
        exponent = min(retry_number - 1, 64)
        cap = min(self.max_delay, self.initial_delay * self.exponential_base**exponent)
        if self.jitter and not slow_down:
            return rng() * cap
        return cap


class RetryBudget:
    """A token bucket that caps retries at a share of recent calls.

    Every call deposits ``ratio`` tokens (up to ``burst``); every retry takes one. While the
    server is healthy the bucket stays full; during an outage retries stop once they exceed
    ``ratio`` of the calls plus the burst, so retries cannot multiply the load.
    """

    def __init__(self, ratio: float = 0.2, burst: float = 10.0) -> None:
        self.ratio = ratio
        self.burst = burst
        self._tokens = burst
        self._lock = threading.Lock()
        self.exhausted_total = 0
        fork.register(self)

    def deposit(self) -> None:
        # Full, as while the server is healthy: no lock (beside a racing withdrawal this
        # may skip one deposit, which a budget can afford).
        if self._tokens >= self.burst:
            return
        with self._lock:
            self._tokens = min(self.burst, self._tokens + self.ratio)

    def withdraw(self) -> bool:
        with self._lock:
            if self._tokens >= 1.0 - 1e-9:  # deposits of 0.2 add up to 0.999...
                self._tokens -= 1.0
                return True
            self.exhausted_total += 1
            return False

    @property
    def tokens(self) -> float:
        return self._tokens

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


class Deadline:
    """An overall time limit measured on the monotonic clock."""

    __slots__ = ("expires", "seconds")

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds  # as given: what an error message should say
        self.expires = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        if self.expires is None:
            return float("inf")
        return self.expires - time.monotonic()

    def bound(self, seconds: float) -> float:
        """``seconds`` cut down to what is left (never below a millisecond)."""
        return max(0.001, min(seconds, self.remaining()))


class AttemptClock:
    """An attempt's time bound, started when its network work starts (after the wait for a
    free connection): ``timeout``, cut to what the call's deadline has left by then."""

    __slots__ = ("_deadline", "_ends", "_timeout")

    def __init__(self, timeout: float, deadline: Deadline | None) -> None:
        self._timeout, self._deadline = timeout, deadline
        self._ends: float | None = None

    def remaining(self) -> float:
        if self._ends is None:
            limit = self._timeout
            if self._deadline is not None:
                limit = self._deadline.bound(limit)
            self._ends = time.monotonic() + limit
        return max(0.001, self._ends - time.monotonic())


@dataclass
class CallStats:
    """What happened during one call: read by the caller for metrics and errors."""

    attempts: int = 0
    retries: int = 0
    last_error: BaseException | None = None


def call_with_retry(
    attempt: Callable[[float], T],
    *,
    policy: RetryPolicy,
    statement: Statement = READ,
    budget: RetryBudget | None = None,
    sleep: Callable[[float], bool] | None = None,
    deadline: Deadline | None = None,
    stats: CallStats | None = None,
    failover: Callable[[], bool] | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    failed: Exception | None = None,
) -> T:
    """Run ``attempt(timeout)`` until it succeeds or ``policy`` no longer allows a retry.

    ``attempt`` gets the time bound of that attempt. A deterministic or auth error is
    raised unchanged after one attempt. When the call ends on a transport or transient
    error (retries spent, or not safe to repeat), :class:`ClickHouseUnavailableError` is
    raised with the last error attached.
    ``sleep(seconds)`` returns False when waiting was interrupted (the client closes).
    ``failover()`` says whether the next attempt goes to a host this call has not tried;
    then the wait is at most :data:`FAILOVER_MAX_DELAY` instead of the full backoff.
    ``on_retry(attempt, error, delay)`` hears of each retry before its wait (tracing).
    ``failed``: the caller already ran the first attempt (counted in ``stats``, its
    budget deposit made) and it raised this; the loop starts by judging it.
    """
    what = statement.what
    stats = stats if stats is not None else CallStats()
    deadline = deadline or Deadline(policy.total_timeout)
    sleep = sleep or _plain_sleep
    if budget is not None and failed is None:
        budget.deposit()
    error: Exception | None = failed
    while True:
        if error is None:
            stats.attempts += 1
            try:
                return attempt(deadline.bound(policy.timeout_per_attempt))
            except CircuitOpenError:
                raise
            except Exception as raised:
                error = raised
        exc, error = error, None
        assert exc is not None  # what the attempt (or the caller's first attempt) raised
        stats.last_error = exc
        if not policy.is_retry(exc, statement):
            if classify(exc) in UNAVAILABLE_KINDS:
                # e.g. an INSERT cut off mid-way: unsafe to repeat, and the server
                # did not give an answer the caller could act on.
                raise ClickHouseUnavailableError(
                    f"{what} failed and is not safe to repeat", last_error=exc,
                    attempts=stats.attempts,
                ) from exc
            raise exc
        reason = _stop_reason(stats, policy, deadline, budget)
        if reason is not None:
            raise ClickHouseUnavailableError(
                f"{what} failed after {stats.attempts} attempt(s): {reason}",
                last_error=exc,
                attempts=stats.attempts,
            ) from exc
        delay = policy.backoff(stats.attempts, slow_down=server_code(exc) in SLOW_DOWN_CODES)
        fresh_host = failover is not None and failover()
        if fresh_host:
            delay = min(delay, FAILOVER_MAX_DELAY)
        delay = min(delay, max(deadline.remaining(), 0.0))
        stats.retries += 1
        if on_retry is not None:
            on_retry(stats.attempts, exc, delay)
        log.info(
            "retrying",
            what=what,
            attempt=stats.attempts,
            delay=round(delay, 3),
            error=describe(exc),
            failover=fresh_host,
        )
        if not sleep(delay):
            raise ClickHouseUnavailableError(
                f"{what} abandoned: client is closing", last_error=exc, attempts=stats.attempts
            ) from exc


def _stop_reason(
    stats: CallStats,
    policy: RetryPolicy,
    deadline: Deadline,
    budget: RetryBudget | None,
) -> str | None:
    if stats.attempts >= policy.max_attempts:
        return "retries exhausted"
    if deadline.remaining() <= 0.001:
        return "deadline exceeded"
    if budget is not None and not budget.withdraw():
        return "retry budget exhausted (too many retries across recent calls)"
    return None


def _plain_sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True
