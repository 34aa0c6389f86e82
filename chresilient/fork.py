"""The library's one fork registry: objects that must repair themselves in a child.

Sockets, threads and locks do not survive ``fork()`` (gunicorn ``--preload``): a child
must not use its parent's pooled sockets or SQLite handles, and a lock some parent
thread held at fork time stays held forever in the child. Every such object registers
here once; one set of ``os.register_at_fork`` hooks tells each of them: ``before_fork``
(optional: quiesce, e.g. hold locks so no thread is inside a library at fork time) in
reverse registration order, then ``after_fork_in_parent`` (optional) or
``after_fork_in_child`` in registration order.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Protocol

import structlog

log = structlog.get_logger("chresilient.fork")


class ForkAware(Protocol):
    def after_fork_in_child(self) -> None:
        """Drop what belongs to the parent; must not take a lock the parent may hold."""


# Reentrant: a finalizer run by the garbage collector may register an object too.
_lock = threading.RLock()
_participants: weakref.WeakKeyDictionary[ForkAware, int] = weakref.WeakKeyDictionary()
_order = 0


def register(obj: ForkAware) -> None:
    """Call ``obj.after_fork_in_child()`` in every child forked while ``obj`` lives."""
    global _order
    with _lock:
        _order += 1
        _participants[obj] = _order


class ChildLock:
    """A lock that every forked child gets anew (``with lock.held():``), for locks that
    live as long as a module: a parent thread may hold one at fork time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        register(self)

    def held(self) -> threading.Lock:
        """The lock to hold now (a child replaces it: take it anew for every use)."""
        return self._lock

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


class QuiescingLock(ChildLock):
    """A :class:`ChildLock` also held across ``fork()`` (waiting at most ``WAIT``
    seconds), so no parent thread is inside what it guards when the process is copied:
    for a library whose own lock a child would inherit held (prometheus_client's)."""

    WAIT = 5.0

    def __init__(self) -> None:
        self._held_at_fork = False
        super().__init__()

    def before_fork(self) -> None:
        self._held_at_fork = self._lock.acquire(timeout=self.WAIT)

    def after_fork_in_parent(self) -> None:
        if self._held_at_fork:
            self._held_at_fork = False
            self._lock.release()

    def after_fork_in_child(self) -> None:
        super().after_fork_in_child()
        self._held_at_fork = False


def reinit_event(event: threading.Event) -> None:
    """Make an inherited ``threading.Event`` usable in the child, keeping its flag.

    A parent thread waiting on it or setting it at fork time leaves its internal lock
    held in the child; CPython re-creates that lock for its own events the same way.
    """
    event._at_fork_reinit()  # type: ignore[attr-defined]


def _reinit_log_locks() -> None:
    """structlog's PrintLogger keeps one lock per output file and does not reset it in a
    child: a parent thread logging at fork time would make every log call in the child
    wait forever (the stdlib's logging module resets its own handler locks)."""
    try:
        from structlog import _output
    except ImportError:  # pragma: no cover - structlog changed its layout
        return
    for lock in list(getattr(_output, "WRITE_LOCKS", {}).values()):
        reinit = getattr(lock, "_at_fork_reinit", None)
        if reinit is not None:
            reinit()


def _in_order() -> list[ForkAware]:
    with _lock:  # another thread may be registering an object while this one forks
        entries = list(_participants.items())
    return [obj for obj, _ in sorted(entries, key=lambda item: item[1])]


def _call(objects: list[ForkAware], hook: str) -> None:
    for obj in objects:
        method = getattr(obj, hook, None)
        if method is None:
            continue
        try:
            method()
        except Exception as exc:  # one broken participant must not stop the others
            log.warning("fork_hook_failed", hook=hook, participant=type(obj).__name__,
                        error=str(exc))


def _before_fork() -> None:
    _call(list(reversed(_in_order())), "before_fork")


def _after_fork_in_parent() -> None:
    _call(_in_order(), "after_fork_in_parent")


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # the parent may have held it at fork time
    _reinit_log_locks()
    _call(_in_order(), "after_fork_in_child")


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
