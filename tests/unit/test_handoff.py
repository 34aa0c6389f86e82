"""The hand-off queue under the host pools: LIFO idle items, FIFO waiters, one hand-off
per returned item, bounded waits (real threads, no server)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy.util.queue import Empty, Full

from chresilient.handoff import HandoffPool, HandoffQueue, PoolClosedError

HANG = 10.0  # guards against a hang only


def test_idle_items_come_back_last_in_first_out() -> None:
    queue = HandoffQueue(3)
    for item in ("a", "b", "c"):
        queue.put(item, False)
    assert queue.qsize() == 3 and queue.full()
    with pytest.raises(Full):
        queue.put("d", False)
    assert [queue.get(False) for _ in range(3)] == ["c", "b", "a"]
    assert queue.empty()
    with pytest.raises(Empty):
        queue.get(False)


def _waiting(queue: HandoffQueue, count: int) -> None:
    deadline = time.monotonic() + HANG
    while queue.waiting() < count:
        assert time.monotonic() < deadline, "waiters did not queue up"
        time.sleep(0.001)


def test_a_returned_item_goes_to_the_oldest_waiter_not_to_the_idle_stack() -> None:
    queue = HandoffQueue(1)
    got: dict[str, Any] = {}

    def wait(name: str) -> None:
        got[name] = queue.get(True, HANG)

    first = threading.Thread(target=wait, args=("first",))
    first.start()
    _waiting(queue, 1)
    second = threading.Thread(target=wait, args=("second",))
    second.start()
    _waiting(queue, 2)
    queue.put("x", False)
    first.join(HANG)
    assert got == {"first": "x"} and queue.qsize() == 0  # handed over, never idle
    queue.put("y", False)
    second.join(HANG)
    assert got == {"first": "x", "second": "y"}


def test_a_wait_ends_empty_at_its_timeout_and_leaves_no_waiter_behind() -> None:
    queue = HandoffQueue(1)
    with pytest.raises(Empty):
        queue.get(True, 0.05)
    queue.put("x", False)  # nobody waits any more: it stays idle
    assert queue.qsize() == 1 and queue.get(False) == "x"


def test_an_item_handed_over_as_the_wait_times_out_is_not_lost() -> None:
    queue = HandoffQueue(1)
    results: list[Any] = []
    for _ in range(200):  # the hand-off races the timeout: either way nothing is lost
        waiter = threading.Thread(target=lambda: results.append(_get_or_none(queue, 0.001)))
        waiter.start()
        queue.put("x", False)
        waiter.join(HANG)
        taken = results.pop()
        if taken is None:
            assert queue.get(False) == "x"
        else:
            assert taken == "x" and queue.empty()


def _get_or_none(queue: HandoffQueue, timeout: float) -> Any:
    try:
        return queue.get(True, timeout)
    except Empty:
        return None


def test_select_idle_sees_only_idle_items() -> None:
    queue = HandoffQueue(3)
    for item in (1, 2, 3):
        queue.put(item, False)
    taken = queue.get(False)
    assert taken == 3
    assert queue.select_idle(lambda item: item % 2 == 1) == [1]


class _Conn:
    closed = 0

    def close(self) -> None:
        _Conn.closed += 1

    def rollback(self) -> None:
        pass


def test_the_pool_keeps_queuepool_accounting_and_its_wait_per_thread() -> None:
    pool = HandoffPool(_Conn, pool_size=1, max_overflow=1, timeout=HANG, reset_on_return=None)
    one, two = pool.connect(), pool.connect()  # the second is overflow
    assert pool.checkedout() == 2
    with pytest.raises(Exception, match="timed out"):
        pool.connect_within(0.05)  # this thread's bound, not the pool's 10 s
    assert pool.timeout() == HANG
    two.close()
    one.close()  # the pool is full: the overflow connection is closed instead
    assert pool.checkedout() == 0 and pool.checkedin() == 1
    pool.dispose()
    assert pool.checkedin() == 0


def test_close_ends_every_wait_at_once_and_refuses_new_ones() -> None:
    queue = HandoffQueue(1)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            queue.get(True, HANG)
        except BaseException as exc:
            errors.append(exc)

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for thread in waiters:
        thread.start()
    _waiting(queue, 3)
    started = time.monotonic()
    queue.close()
    for thread in waiters:
        thread.join(HANG)
    assert time.monotonic() - started < HANG / 2  # woken, not timed out
    assert len(errors) == 3 and all(isinstance(e, PoolClosedError) for e in errors)
    assert queue.waiting() == 0
    with pytest.raises(PoolClosedError):
        queue.get(True, HANG)  # would wait: refused at once
    queue.put("x", False)
    assert queue.get(False) == "x"  # idle items still come out (dispose)


def test_a_put_from_inside_the_queue_lock_does_not_deadlock() -> None:
    # What a garbage-collected, never checked-in connection does: its weakref callback
    # puts it back from whatever the thread was doing, also from inside the queue.
    queue = HandoffQueue(3)
    queue.put("a", False)
    done = threading.Event()

    def choose_and_put_back(item: Any) -> bool:
        if item == "a":
            queue.put("b", False)
        return False

    def run() -> None:
        queue.select_idle(choose_and_put_back)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG)
    assert done.is_set(), "the queue deadlocked on a reentrant put"
    assert sorted(queue.get(False) for _ in range(queue.qsize())) == ["a", "b"]
