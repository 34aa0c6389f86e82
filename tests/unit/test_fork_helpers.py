"""The fork helpers (real fork(), no server): module locks made anew in a child, and the
multiprocess scrape that leaves out files still being created."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from chresilient import fork
from chresilient.observability.multiprocess import SettledFilesCollector

HANG = 30.0  # seconds: a bound against a hang (expected: milliseconds)


def _child_takes(lock: fork.ChildLock) -> int:
    """Fork while another thread holds ``lock``; the child's exit status after taking it."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock.held():
            holding.set()
            release.wait(HANG)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(HANG)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0 if lock.held().acquire(timeout=HANG) else 3)
    finally:
        release.set()
        holder.join(HANG)
    return os.waitpid(pid, 0)[1]


def test_a_child_lock_held_by_a_parent_thread_is_free_in_the_child() -> None:
    assert _child_takes(fork.ChildLock()) == 0


def test_a_quiescing_lock_waits_for_its_holder_then_is_free_in_the_child() -> None:
    lock = fork.QuiescingLock()
    lock.WAIT = 0.2  # the holder keeps it: fork() goes on after the wait
    assert _child_takes(lock) == 0
    assert lock.held().acquire(timeout=HANG)  # released again in the parent
    lock.held().release()


def _write_gauge(path: Path, pid: int, value: float) -> None:
    values = MmapedDict(str(path / f"gauge_livesum_{pid}.db"))
    values.write_value(mmap_key("m", "m", [], [], "help"), value, 0.0)
    values.close()


def test_a_file_still_being_created_does_not_fail_the_scrape(tmp_path: Path) -> None:
    _write_gauge(tmp_path, 101, 2.0)
    _write_gauge(tmp_path, 102, 3.0)
    (tmp_path / "gauge_livesum_103.db").touch()  # a worker between create and resize
    try:
        MultiProcessCollector(None, path=str(tmp_path)).collect()  # type: ignore[no-untyped-call]
    except Exception as exc:  # prometheus_client's own collector fails on it
        failed: Exception | None = exc
    else:
        failed = None
    assert failed is not None
    families = list(SettledFilesCollector(CollectorRegistry(), str(tmp_path)).collect())
    assert [(s.name, s.value) for f in families for s in f.samples] == [("m", 5.0)]
