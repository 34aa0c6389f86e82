"""The startup gate: wait until a host answers ``SELECT 1``, within a timeout; and what
the background services started after it promise.

Not on the hot path, so tenacity's composable strategies drive it: waits grow from
``FIRST_STEP`` to ``MAX_STEP`` within the timeout, interruptible by ``close()``. An error
that waiting cannot fix (credentials, unknown database) ends the wait at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

import structlog
import tenacity

from .config import Config
from .errors import (
    ClientClosedError,
    StartupError,
    StartupTimeoutError,
    describe,
    refusal_advice,
)
from .hosts import HostState
from .retry import Deadline
from .state import ConnectionStatus

log = structlog.get_logger("chresilient")

# The first wait; it doubles up to MAX_STEP.
FIRST_STEP = 0.25
# The gate retries at least this often, so the backend comes up soon after ClickHouse is
# ready, and at most twice a second, so it does not hammer a booting server.
MAX_STEP = 0.5


class BackgroundService(Protocol):
    """A thread the manager owns: started after the startup gate, stopped by close()."""

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...


class StartupGate:
    """The gate of one manager: waits for a host, resets its breaker, reports success."""

    def __init__(
        self,
        hosts: Sequence[HostState],
        cfg: Config,
        status: ConnectionStatus,
        closing: threading.Event,
        attempt_timeout: float,
    ) -> None:
        self._hosts, self._cfg, self._status = hosts, cfg, status
        self._closing, self._attempt_timeout = closing, attempt_timeout

    def wait(self, timeout: float) -> float:
        """Block until a host answers; returns the seconds waited."""
        started = time.monotonic()
        host = wait_for_host(
            self._hosts,
            timeout=timeout,
            attempt_timeout=self._attempt_timeout,
            user=self._cfg.user,
            database=self._cfg.database,
            target=self._cfg.safe_url(),
            closing=self._closing,
        )
        host.breaker.reset()
        self._status.succeeded()
        return time.monotonic() - started

    def pass_or_degrade(self, timeout: float, required: bool, retry_every: float) -> None:
        """:meth:`wait`; on timeout raise, or (``required=False``) start degraded: the
        state says unhealthy and the health monitor keeps probing every ``retry_every``."""
        try:
            self.wait(timeout)
        except StartupTimeoutError:
            if required:
                raise
            self._status.started_degraded()
            log.warning(
                "startup_degraded",
                timeout=timeout,
                target=self._cfg.safe_url(),
                retrying_every=retry_every,
            )


class _NotReady(Exception):
    """No host answered this round (the cause says why)."""


def wait_for_host(
    hosts: Sequence[HostState],
    *,
    timeout: float,
    attempt_timeout: float,
    user: str,
    database: str,
    target: str,
    closing: threading.Event,
) -> HostState:
    """The first host that answers; raises StartupError, StartupTimeoutError or
    ClientClosedError (``closing`` was set)."""
    deadline = Deadline(timeout)
    started = time.monotonic()

    def first_answering(attempt_no: int) -> HostState:
        last: BaseException | None = None
        for host in hosts:
            try:
                with host.pool.connection(deadline.bound(attempt_timeout)) as conn:
                    conn.client.execute("SELECT 1")
                return host
            except Exception as exc:
                last = exc
                advice = refusal_advice(exc, user=user, database=database, host=host.label)
                if advice is not None:
                    raise StartupError(advice, last_error=exc) from exc
                log.info(
                    "waiting_for_clickhouse",
                    host=host.label,
                    attempt=attempt_no,
                    reason=wait_reason(exc),
                    remaining=round(max(deadline.remaining(), 0.0), 1),
                )
        raise _NotReady() from last

    retrying = tenacity.Retrying(
        stop=tenacity.stop_before_delay(timeout) | tenacity.stop_when_event_set(closing),
        wait=tenacity.wait_exponential(multiplier=FIRST_STEP, max=MAX_STEP),
        retry=tenacity.retry_if_exception_type(_NotReady),
        sleep=closing.wait,  # type: ignore[arg-type]  # close() interrupts the wait
    )
    try:
        for attempt in retrying:
            with attempt:
                host = first_answering(attempt.retry_state.attempt_number)
    except tenacity.RetryError as err:
        if closing.is_set():
            raise ClientClosedError("manager closed while waiting for ClickHouse") from None
        attempts = err.last_attempt.attempt_number
        raise StartupTimeoutError(
            f"ClickHouse at {target} not ready after {timeout:.1f}s ({attempts} attempts)",
            last_error=err.last_attempt.exception().__cause__,  # type: ignore[union-attr]
            attempts=attempts,
        ) from None
    log.info(
        "clickhouse_ready",
        host=host.label,
        attempts=attempt.retry_state.attempt_number,
        waited=round(time.monotonic() - started, 3),
    )
    return host


def wait_reason(exc: BaseException) -> str:
    """Why a host did not answer, in words an operator searches for."""
    text = describe(exc)
    low = text.lower()
    if "refused" in low:
        return f"connection refused: {text}"
    if "timed out" in low or "timeout" in low:
        return f"timeout: {text}"
    if "name or service not known" in low or "nodename" in low or "resolve" in low:
        return f"DNS: {text}"
    return text
