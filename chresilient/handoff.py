"""The SQLAlchemy ``QueuePool`` the host pools use: idle connections handed straight to
the thread that has waited longest, and a checkout bounded by the caller's attempt.

SQLAlchemy's own queue wakes one waiter per returned connection and lets it re-check the
queue; under many more threads than connections the returning thread usually takes the
connection back before the woken one runs (it still holds the GIL), so most wake-ups find
nothing and wait again: context switches that cost CPU the server needs too. Here a
returned connection goes to the oldest waiter itself: one wake-up per connection, FIFO
among waiters, LIFO among idle connections. QueuePool itself is unchanged: its
``_do_get``/``_do_return_conn`` only see a queue with the same ``get``/``put`` contract
(Python's ``queue.Queue`` and SQLAlchemy's have no hand-off mode, hence this small one).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy.pool import PoolProxiedConnection, QueuePool
from sqlalchemy.util.queue import Empty, Full

_NOTHING: Any = object()
_CLOSED: Any = object()


class PoolClosedError(Exception):
    """Raised to a thread waiting for a connection when its pool is closed or replaced."""


class _Waiter:
    """One thread waiting in :meth:`HandoffQueue.get`: its own lock, released on hand-off."""

    __slots__ = ("item", "ready")

    def __init__(self) -> None:
        self.item = _NOTHING
        self.ready = threading.Lock()
        self.ready.acquire()


class HandoffQueue:
    """A LIFO stack of idle items whose ``put`` hands an item to the oldest waiter."""

    use_lifo = True

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._idle: list[Any] = []
        self._waiters: deque[_Waiter] = deque()
        # Reentrant, like SQLAlchemy's own queue: the garbage collector may finalize a
        # connection nobody checked in (a weakref callback that puts it back) at any
        # allocation, also in a thread that holds this lock.
        self._mutex = threading.RLock()
        self._closed = False

    def qsize(self) -> int:
        return len(self._idle)

    def empty(self) -> bool:
        return not self._idle

    def full(self) -> bool:
        return len(self._idle) >= self.maxsize

    def waiting(self) -> int:
        """Threads waiting for an item now."""
        return len(self._waiters)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Give ``item`` to the oldest waiter, or keep it idle; ``Full`` past ``maxsize``
        (never blocks: QueuePool closes the surplus connection)."""
        with self._mutex:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.item = item
                waiter.ready.release()
                return
            if len(self._idle) >= self.maxsize:
                raise Full
            self._idle.append(item)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The most recently returned idle item, or (``block``) the next one handed over
        within ``timeout`` seconds; ``Empty`` otherwise."""
        with self._mutex:
            if self._idle:
                return self._idle.pop()
            if not block:
                raise Empty
        waiter = _Waiter()  # made outside the lock: an allocation may run such a callback
        with self._mutex:
            if self._idle:  # put back meanwhile
                return self._idle.pop()
            if self._closed:
                raise PoolClosedError("the pool was closed")
            self._waiters.append(waiter)
        waiter.ready.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))
        with self._mutex:
            if waiter.item is _NOTHING:  # timed out, and nobody handed it anything since
                self._waiters.remove(waiter)
                raise Empty
        if waiter.item is _CLOSED:
            raise PoolClosedError("the pool was closed while waiting for a connection")
        return waiter.item

    def close(self) -> None:
        """Wake every waiter with :class:`PoolClosedError`; a later ``get`` that would wait
        raises it at once (idle items are still handed out, for ``dispose``)."""
        with self._mutex:
            self._closed = True
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.item = _CLOSED
                waiter.ready.release()

    def select_idle(self, choose: Callable[[Any], bool]) -> list[Any]:
        """The idle items for which ``choose(item)`` is true, decided under the queue's
        lock: none of them can be checked out while ``choose`` looks at it."""
        with self._mutex:
            return [item for item in self._idle if choose(item)]


class HandoffPool(QueuePool):
    """A ``QueuePool`` on a :class:`HandoffQueue` whose checkout waits at most what the
    calling attempt has left.

    QueuePool reads its wait from ``_timeout`` in ``_do_get``; that one attribute becomes
    per thread here (the narrow seam: the rest of the pool is SQLAlchemy's own).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._waits = threading.local()
        super().__init__(*args, **kwargs)
        self._pool: HandoffQueue = HandoffQueue(self._pool.maxsize)  # type: ignore[assignment]

    @property
    def _timeout(self) -> float:
        return float(getattr(self._waits, "seconds", self._configured_timeout))

    @_timeout.setter
    def _timeout(self, seconds: float) -> None:
        self._configured_timeout = seconds

    def recreate(self) -> HandoffPool:
        """A new pool with the same settings and listeners (QueuePool's own)."""
        return cast(HandoffPool, super().recreate())

    def connect_within(self, seconds: float) -> PoolProxiedConnection:
        """``connect()``, waiting at most ``seconds`` for a free connection."""
        if seconds >= self._configured_timeout:  # the common case: the pool's own wait
            return self.connect()
        self._waits.seconds = seconds
        try:
            return self.connect()
        finally:
            del self._waits.seconds

    def select_idle(self, choose: Callable[[Any], bool]) -> list[Any]:
        """The idle connection records ``choose(record)`` picks (see HandoffQueue)."""
        return self._pool.select_idle(choose)

    def close_waits(self) -> None:
        """End the waits for a free connection (the pool is closed or replaced): those
        threads get :class:`PoolClosedError` instead of waiting out their timeout."""
        self._pool.close()
