"""fork() (gunicorn --preload, multiprocessing): every path is safe in a child.

Children are real ``os.fork()`` processes; each reports through a pipe and ends with
``os._exit``. A child that does not answer within its bound is killed and counted as hung.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections import deque
from typing import Any, Callable

import structlog
from helpers import make_config

from chresilient import ClickHouseConnectionManager, ConnectionPoolConfig
from chresilient.observability.multiprocess import process_totals
from chresilient.observability.prometheus import exposition

CHILD_BOUND = 60.0  # seconds a child may take before it counts as hung (expected: < 2 s)


def fork_child(work: Callable[[], dict[str, Any]]) -> tuple[int, int]:
    """Fork a child that runs ``work`` and writes its JSON result; returns (pid, fd)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            # A child about to count as hung shows where it is (stderr, in the report).
            faulthandler.dump_traceback_later(CHILD_BOUND * 0.8, exit=False)
            os.close(read_end)
            os.write(write_end, json.dumps(work(), default=str).encode())
            code = 0
        except BaseException as exc:
            os.write(write_end, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def collect(children: list[tuple[int, int]]) -> tuple[list[dict[str, Any]], int]:
    """Results of the children that answered in time, and how many hung (killed)."""
    results, hung = [], 0
    deadline = time.monotonic() + CHILD_BOUND
    for pid, fd in children:
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            hung += 1
            os.close(fd)
            continue
        with os.fdopen(fd) as pipe:
            results.append(json.loads(pipe.read() or '{"error": "no answer"}'))
    return results, hung


def test_every_path_in_a_forked_child_uses_the_childs_own_sockets(clickhouse: Any) -> None:
    cfg = make_config(clickhouse, pool=ConnectionPoolConfig(health_check_interval=0.5))
    mgr = ClickHouseConnectionManager(cfg)
    try:
        mgr.start(wait=True, timeout=10)
        for _ in range(3):  # pooled sockets the children must leave alone
            assert mgr.execute("SELECT 1") == [(1,)]

        def work() -> dict[str, Any]:
            health = mgr.health()  # first thing in the child: before any execute()
            metrics = mgr.metrics()
            deps = mgr.validate_service_dependencies(timeout=30)
            consistency = mgr.ensure_analytics_consistency(timeout=30)
            rows = mgr.execute("SELECT 42")
            reconnected = mgr.reconnect()["reconnected"]
            mgr.close()
            return {
                "health": health["status"],
                "probe_ok": all(r["ok"] for r in (health["probe"] or {"hosts": {}})["hosts"]
                                .values()),
                "errors": metrics["query_errors_total"],
                "deps": deps["overall_status"],
                "consistent": consistency["overall_consistent"],
                "rows": rows,
                "reconnected": reconnected,
            }

        results, hung = collect([fork_child(work) for _ in range(4)])
        assert hung == 0
        for result in results:
            assert result == {
                "health": "healthy", "probe_ok": True, "errors": 0, "deps": "passed",
                "consistent": True, "rows": [[42]], "reconnected": True,
            }, result
        # The parent's pooled sockets survived four children and their close().
        assert mgr.execute("SELECT 7") == [(7,)]
        assert mgr.health()["status"] == "healthy"
        assert mgr.metrics()["query_errors_total"] == 0
    finally:
        mgr.close()


def test_forks_under_spool_load_never_hang_in_sqlite(clickhouse: Any, tmp_path: Any) -> None:
    # The parent keeps SQLite busy (a writer and a reader thread) while it forks pairs of
    # workers; each worker reads the spool's gauges, spools a batch and queries.
    mgr = ClickHouseConnectionManager(make_config(clickhouse, spool_dir=str(tmp_path)))
    spool = mgr.spool
    assert spool is not None
    stop = threading.Event()

    def write_load() -> None:
        n = 0
        while not stop.is_set() and n < 20_000:
            spool.store.put("`t`", ("x",), [(n,)] * 50, batch_id=f"load-{n}")
            n += 1

    def read_load() -> None:
        while not stop.is_set():
            spool.pending()
            spool.health()

    loaders = [threading.Thread(target=write_load), threading.Thread(target=read_load)]
    for thread in loaders:
        thread.start()

    def work() -> dict[str, Any]:
        pending = mgr.metrics()["pending_batches"]
        spool.store.put("`t`", ("x",), [(1,)], batch_id=f"child-{os.getpid()}")
        return {"pending": pending, "rows": mgr.execute("SELECT 1")}

    try:
        children = []
        for _ in range(12):  # 24 workers, two forked at once each time
            children += [fork_child(work), fork_child(work)]
            time.sleep(0.01)
        results, hung = collect(children)
    finally:
        stop.set()
        for thread in loaders:
            thread.join(30)
        mgr.close()
    assert hung == 0, f"{hung} of 24 forked workers hung"
    assert all(r.get("rows") == [[1]] for r in results), results[:3]
    store = ClickHouseConnectionManager(make_config(clickhouse, spool_dir=str(tmp_path)))
    try:
        assert store.spool is not None
        ids = {b for b in _batch_ids(store)}
        assert sum(i.startswith("child-") for i in ids) == 24  # every child's batch stored
    finally:
        store.close()


def _batch_ids(mgr: ClickHouseConnectionManager) -> list[str]:
    assert mgr.spool is not None
    ids = []
    while True:
        batch = mgr.spool.store.claim(lease_seconds=60)
        if batch is None:
            return ids
        ids.append(batch.batch_id)
        mgr.spool.store.ack(batch)


def test_forks_while_parent_threads_log_wake_and_check_never_hang(clickhouse: Any) -> None:
    # Parent threads that log, wake the services and read health at the moment of fork()
    # leave locks of structlog, of threading.Events and of the manager held in the child.
    cfg = make_config(clickhouse, pool=ConnectionPoolConfig(health_check_interval=0.05))
    mgr = ClickHouseConnectionManager(cfg)
    log = structlog.get_logger("fork-test")
    stop = threading.Event()
    old_interval = sys.getswitchinterval()

    def busy(action: Callable[[], Any]) -> None:
        while not stop.is_set():
            action()

    assert mgr.spool is not None
    totals = process_totals()  # gunicorn's multiprocess totals take a lock too
    actions: list[Callable[[], Any]] = [
        lambda: log.info("parent_is_logging"),
        mgr.spool.replayer.wake,
        mgr.monitor.wake,
        mgr.health,
        lambda: totals.publish({"queries_total": 1}),
    ]
    threads = [threading.Thread(target=busy, args=(a,)) for a in actions]
    try:
        mgr.start(wait=True, timeout=10)
        sys.setswitchinterval(1e-5)  # switch threads often: fork lands inside more locks
        for thread in threads:
            thread.start()

        def work() -> dict[str, Any]:
            health = mgr.health()["status"]
            process_totals().publish(mgr.metrics())
            rows = mgr.execute("SELECT 1")
            mgr.close()
            return {"health": health, "rows": rows}

        children = []
        for _ in range(20):
            children.append(fork_child(work))
            time.sleep(0.005)
        results, hung = collect(children)
    finally:
        sys.setswitchinterval(old_interval)
        stop.set()
        for thread in threads:
            thread.join(30)
        mgr.close()
    assert hung == 0, f"{hung} of 20 children hung"
    assert all(r == {"health": "healthy", "rows": [[1]]} for r in results), results[:3]


# Run in a fresh interpreter: prometheus_client picks its multiprocess values (one lock
# per process for all of them) when it is imported, from PROMETHEUS_MULTIPROC_DIR.
GAUGES_CREATED_AT_FORK = """
import faulthandler, os, sys, threading, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from chresilient.observability.multiprocess import WorkerTotals, process_totals
sys.setswitchinterval(1e-6)
hung = 0
for i in range(40):
    # What gunicorn --preload does: a monitor's first round creates the totals' gauges
    # while the master forks its workers.
    creator = threading.Thread(target=lambda: WorkerTotals().publish({"queries_total": 1}))
    creator.start()
    time.sleep(i % 7 * 1e-4)
    pid = os.fork()
    if pid == 0:
        faulthandler.dump_traceback_later(20, exit=True)  # a hung child ends, counted
        process_totals().publish({"queries_total": 2})
        os._exit(0)
    creator.join()
    hung += os.waitpid(pid, 0)[1] != 0
print("hung", hung)
"""


def test_forks_while_a_thread_creates_the_worker_totals_never_hang(tmp_path: Any) -> None:
    script = tmp_path / "gauges_at_fork.py"
    script.write_text(GAUGES_CREATED_AT_FORK)
    (tmp_path / "prom").mkdir()
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "prom")],
        capture_output=True, text=True, timeout=40 * 25,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["hung", "0"], done.stderr[-3000:]


REGISTERED_DURING_FORK = """
import os, sys, threading
from chresilient import fork

class Marker:
    repaired = False
    def before_fork(self): pass
    def after_fork_in_child(self): Marker.repaired = True

marker = Marker()
fork.register(marker)
stop = threading.Event()

def register_more():
    while not stop.is_set():
        fork.register(Marker())  # dies at once: the registry grows and shrinks

thread = threading.Thread(target=register_more)
thread.start()
sys.setswitchinterval(1e-6)
failed = 0
for _ in range(200):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if Marker.repaired else 3)
    failed += os.waitpid(pid, 0)[1] != 0
stop.set()
thread.join()
print("failed", failed)
"""


def test_fork_hooks_run_while_another_thread_registers_objects(tmp_path: Any) -> None:
    script = tmp_path / "registered_during_fork.py"
    script.write_text(REGISTERED_DURING_FORK)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["failed", "0"], done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]


LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


def _locks_of(*roots: object) -> list[Any]:
    """Every lock reachable from ``roots`` through chresilient's objects, SQLAlchemy's
    pools and the containers and threading objects they hold, except those of objects
    with a ``before_fork`` hook (fork() takes them itself)."""
    found: dict[int, Any] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, LOCK_TYPES):
            found[id(obj)] = obj
            continue
        if hasattr(type(obj), "before_fork") and not isinstance(obj, type):
            continue  # a lock its fork hook takes: fork() waits for it (bounded), by design
        if isinstance(obj, types.ModuleType):  # the registry's own lock: fork() takes it
            walk = obj.__name__.startswith("chresilient") and obj.__name__ != "chresilient.fork"
        elif isinstance(obj, type):
            walk = False
        else:
            module = str(getattr(type(obj), "__module__", ""))
            walk = isinstance(obj, (dict, list, set, tuple, deque, types.MethodType)) or (
                module.startswith(("chresilient", "sqlalchemy.pool", "threading", "weakref"))
            )
        if walk:
            stack.extend(gc.get_referents(obj))
    return list(found.values())


def test_a_child_forked_while_every_lock_is_held_still_serves_every_path(
    clickhouse: Any, tmp_path: Any
) -> None:
    # The worst moment for fork(): a parent thread holds every lock of the manager (and of
    # chresilient's modules). A child must not need any of them: each must be new there.
    cfg = make_config(clickhouse, pool=ConnectionPoolConfig(health_check_interval=0.5))
    mgr = ClickHouseConnectionManager(cfg)
    table = "fork_locks"
    try:
        mgr.start(wait=True, timeout=10)
        mgr.execute(f"DROP TABLE IF EXISTS {table}")
        mgr.execute(f"CREATE TABLE {table} (x UInt32) ENGINE = MergeTree ORDER BY x")
        mgr.insert(table, [(i,) for i in range(100)], ["x"])  # the parent's rows
        for _ in range(20):
            mgr.execute("SELECT 1")
        modules = [m for name, m in sys.modules.items() if name.startswith("chresilient")]
        locks = _locks_of(mgr, *modules)
        assert len(locks) > 20, len(locks)  # the walk finds them (pools, breakers, ...)
        holding, release = threading.Event(), threading.Event()

        def hold_all() -> None:
            held = [lock for lock in locks if lock.acquire(blocking=False)]
            holding.set()
            release.wait(CHILD_BOUND * 2)
            for lock in held:
                lock.release()

        def work() -> dict[str, Any]:
            health = mgr.health()["status"]
            spool = mgr.spool_health()["state"]
            rows = mgr.execute("SELECT 42")
            inserted = mgr.insert(table, [(1000,), (1001,), (1002,)], ["x"]).delivered
            metrics = mgr.metrics()
            body, _ = exposition(mgr)
            mgr.close()
            return {
                "health": health, "spool": spool, "rows": rows, "inserted": inserted,
                # This process's own counts: the parent's 100 rows are not its work.
                "rows_inserted": metrics["rows_inserted"],
                "queries_below_parents": metrics["queries_total"] < 20,
                "exposition": b"chresilient_queries_total" in body,
            }

        holder = threading.Thread(target=hold_all)
        holder.start()
        try:
            assert holding.wait(30)
            children = [fork_child(work)]
        finally:
            release.set()
            holder.join(CHILD_BOUND * 3)
        results, hung = collect(children)
        assert hung == 0, "the child hung on a lock a parent thread held at fork time"
        assert results == [{
            "health": "healthy", "spool": "ok", "rows": [[42]], "inserted": True,
            "rows_inserted": 3, "queries_below_parents": True, "exposition": True,
        }], results
        assert mgr.execute(f"SELECT count() FROM {table}") == [(103,)]
    finally:
        mgr.close()
