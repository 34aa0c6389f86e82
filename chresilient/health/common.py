"""Small pieces the health modules share: timestamps, scrubbing, single flight."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from concurrent.futures import Future
from typing import Any, Callable, Generic, TypeVar

import structlog

from .. import fork

log = structlog.get_logger("chresilient.health")

T = TypeVar("T")
Report = dict[str, Any]


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()`` value)."""
    return round((time.perf_counter() - started) * 1000, 3)


def scrub(value: Any, secret: str) -> Any:
    """``value`` (JSON-like) with ``secret`` replaced in every string: a last line of defence.

    Secrets shorter than 4 characters are left alone; replacing them would garble every
    string while protecting nothing that a guess would not find.
    """
    if len(secret) < 4:
        return value
    if isinstance(value, str):
        return value.replace(secret, "***")
    if isinstance(value, Mapping):
        return {k: scrub(v, secret) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secret) for v in value]
    return value


class Cancellation:
    """Ends a check blocked on a socket: :meth:`cancel` marks the check cancelled and shuts
    down the sockets of the driver clients it registered (a frozen server would otherwise
    hold the check for its whole timeout after the manager closed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: set[Any] = set()
        self._cancelled = False

    def __call__(self) -> bool:
        return self._cancelled

    def track(self, client: Any) -> None:
        with self._lock:
            self._clients.add(client)
        if self._cancelled:
            self.cancel()

    def untrack(self, client: Any) -> None:
        with self._lock:
            self._clients.discard(client)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            clients = list(self._clients)
        for client in clients:
            sock = getattr(client.connection, "socket", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._clients = set()


class SingleFlight(Generic[T]):
    """Run ``fn`` in a thread this object owns, at most one run at a time.

    Callers that arrive while a run is in flight wait for that run instead of starting
    another, and every caller waits at most its own timeout (the run goes on without it):
    a burst of requests costs one check, and no request hangs on a frozen server.
    :meth:`join` waits for the run in flight (the owner's ``stop``). The thread is a
    daemon only so that an interpreter exiting without ``close()`` is not held up by a
    check bounded by its own timeouts.
    """

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._fn = fn
        self._name = name
        self._lock = threading.Lock()
        self._current: Future[T] | None = None
        self._thread: threading.Thread | None = None
        fork.register(self)

    def submit(self) -> Future[T]:
        """The run in flight, or a new one."""
        with self._lock:
            future = self._current
            if future is None or future.done():
                future = self._current = Future()
                self._thread = threading.Thread(
                    target=self._work, args=(future,), name=self._name, daemon=True
                )
                self._thread.start()
        return future

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the run in flight; True when none is left."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(max(timeout, 0.0))
        if thread.is_alive():
            log.warning("check_still_running", check=self._name, waited=round(timeout, 3))
            return False
        return True

    def after_fork_in_child(self) -> None:
        """The parent's run does not exist here: forget it, and the parent's lock."""
        self._lock = threading.Lock()
        self._current, self._thread = None, None

    def run(self, timeout: float) -> T:
        """The result of the run in flight, or of a new one; ``TimeoutError`` after ``timeout``."""
        try:
            return self.submit().result(timeout)
        except futures.TimeoutError as err:
            # Before Python 3.11 this is not the built-in TimeoutError that callers catch.
            raise TimeoutError(f"{self._name} still running after {timeout:.1f}s") from err

    @property
    def running(self) -> bool:
        future = self._current
        return future is not None and not future.done()

    def _work(self, future: Future[T]) -> None:
        try:
            future.set_result(self._fn())
        except BaseException as exc:  # handed to every waiting caller
            future.set_exception(exc)


class ReportCache:
    """The latest report of a check and when it was made, refreshed by a single flight."""

    def __init__(self, run: Callable[[], Report], name: str) -> None:
        self._run = run
        self._flight: SingleFlight[Report] = SingleFlight(self._run_and_store, name)
        self.latest: Report | None = None
        self.runs_total = 0  # checks actually run (requests that shared a run not counted)
        self.at_wall: float | None = None
        self._at: float | None = None

    def age(self) -> float | None:
        """Seconds since the latest report was made (None: never)."""
        return None if self._at is None else time.monotonic() - self._at

    def refresh(self, timeout: float) -> Report:
        """A new report (shared with concurrent callers); ``TimeoutError`` after ``timeout``."""
        return self._flight.run(timeout)

    def submit(self) -> Future[Report]:
        """Start a new report unless one is being made; do not wait for it."""
        return self._flight.submit()

    def report(self, timeout: float, max_age: float | None = None) -> Report:
        """A new report, or (with ``max_age``) the latest one if it is young enough."""
        return self.refresh(timeout) if max_age is None else self.get(max_age, timeout)

    def get(self, max_age: float, timeout: float) -> Report:
        """The latest report if younger than ``max_age``, else a new one."""
        age, latest = self.age(), self.latest
        if latest is not None and age is not None and age <= max_age:
            return latest
        return self.refresh(timeout)

    @property
    def running(self) -> bool:
        return self._flight.running

    def join(self, timeout: float) -> bool:
        return self._flight.join(timeout)

    def _run_and_store(self) -> Report:
        self.runs_total += 1
        report = self._run()
        self.latest, self.at_wall, self._at = report, time.time(), time.monotonic()
        return report
