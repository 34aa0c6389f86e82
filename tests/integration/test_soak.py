"""Soak: mixed traffic from 8 threads while a chaos thread breaks the server and the network.

Runs in the default suite for CHRESILIENT_SOAK_SECONDS (60 by default); set it higher for a
long soak, and CHRESILIENT_SOAK_SEED to replay a fault schedule (both are printed). Faults
come in rounds, each round every kind once in a seeded random order, a few seconds apart:
kill -9 and start, freeze and thaw, graceful restart (the private server), connection
reset, added latency and refused connects (the fault proxy in front of it).

What must hold: no row lost (every id of every accepted insert is in ClickHouse once the
spool drained; duplicates are possible without a dedup token on 18.16, at least once, and
are counted and printed), no exception but ClickHouseUnavailableError (and subclasses)
from reads, no wrong result, no thread stuck, the pool within its bounds at every sample,
and no file descriptor or thread left behind after close().
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import make_config, open_fds, poll

from chresilient import (
    CircuitBreakerConfig,
    ClickHouseConnectionManager,
    ClickHouseUnavailableError,
    ConnectionPoolConfig,
    RetryConfig,
)
from chresilient.errors import describe
from chresilient.testing.faultproxy import FaultProxy
from chresilient.testing.server import LocalClickHouse

SOAK_SECONDS = float(os.environ.get("CHRESILIENT_SOAK_SECONDS", "60"))
SEED = int(os.environ.get("CHRESILIENT_SOAK_SEED", "9"))
WORKERS = 8
POOL_SIZE, MAX_CONNECTIONS = 4, 8
INSERT_SHARE = 0.3
FAULT_GAP = (2.0, 3.0)  # seconds between two faults
COOL_DOWN = 3.0  # no fault starts this close to the end (about the longest one)
FAULT_KINDS = ("kill9", "freeze", "restart", "reset", "latency", "refuse")
# A worker's longest call: total_timeout plus a pool wait plus a spool write, with slack.
STUCK_AFTER = 20.0
MAX_OPS_PER_WORKER = 1_000_000  # bounds every loop by count as well as by time
FD_SLACK, THREAD_SLACK = 2, 0


@dataclass
class Tally:
    """What one worker did and saw."""

    reads_ok: int = 0
    reads_failed: Counter[str] = field(default_factory=Counter)
    delivered: int = 0
    spooled: int = 0
    accepted: list[tuple[int, int]] = field(default_factory=list)  # (first id, rows)
    unexpected: list[str] = field(default_factory=list)


def _read(mgr: ClickHouseConnectionManager, rng: random.Random) -> None:
    """One read whose answer is known, so a wrong result is caught as well as an error."""
    kind = rng.randrange(3)
    n = rng.randint(1, 200)
    if kind == 0:
        got = mgr.execute("SELECT number FROM numbers(%(n)s)", {"n": n})
        expected: Any = [(i,) for i in range(n)]
    elif kind == 1:
        got = list(mgr.execute_iter(f"SELECT number FROM numbers({n})"))
        expected = [(i,) for i in range(n)]
    else:
        got = mgr.execute("SELECT count() >= 0 FROM soak")
        expected = [(1,)]
    if got != expected:
        raise AssertionError(f"wrong result for read kind {kind}: {got!r:.200}")


def worker(
    mgr: ClickHouseConnectionManager, w: int, stop: threading.Event, deadline: float
) -> Tally:
    """Mixed reads and inserts until ``stop``; every id range is unique to its worker."""
    tally = Tally()
    rng = random.Random(SEED * 1000 + w)
    next_id = w * 10**9
    for _ in range(MAX_OPS_PER_WORKER):
        if stop.is_set() or time.monotonic() > deadline:
            break
        if rng.random() < INSERT_SHARE:
            rows = rng.randint(5, 100)
            batch = [(next_id + i, w, f"w{w}-{next_id + i}") for i in range(rows)]
            try:
                result = mgr.insert("soak", batch, ["id", "writer", "payload"])
            except Exception as exc:  # nothing else is allowed: unavailability spools
                tally.unexpected.append(f"insert: {type(exc).__name__}: {describe(exc)}")
            else:
                tally.accepted.append((next_id, rows))
                tally.delivered += result.delivered
                tally.spooled += result.spooled
            next_id += rows
        else:
            try:
                _read(mgr, rng)
                tally.reads_ok += 1
            except ClickHouseUnavailableError as exc:  # includes CircuitOpenError
                tally.reads_failed[type(exc).__name__] += 1
            except Exception as exc:
                tally.unexpected.append(f"read: {type(exc).__name__}: {describe(exc)}")
        stop.wait(rng.uniform(0.02, 0.08))
    return tally


class Chaos:
    """Injects one fault every few seconds, each undone before the next; logs the schedule."""

    def __init__(
        self, server: LocalClickHouse, proxy: FaultProxy, rng: random.Random, t0: float
    ) -> None:
        self.server, self.proxy, self.rng, self.t0 = server, proxy, rng, t0
        self.schedule: list[str] = []
        self.errors: list[str] = []

    def run(self, stop: threading.Event, deadline: float) -> None:
        faults: dict[str, Callable[[], str]] = {
            "kill9": self._kill9,
            "freeze": self._freeze,
            "restart": self._restart,
            "reset": self._reset,
            "latency": self._latency,
            "refuse": self._refuse,
        }
        round_: list[str] = []
        for _ in range(10_000):
            if stop.wait(self.rng.uniform(*FAULT_GAP)) or time.monotonic() > deadline:
                return
            if not round_:
                round_ = self.rng.sample(FAULT_KINDS, len(FAULT_KINDS))
            kind = round_.pop()
            started = time.monotonic() - self.t0
            try:
                detail = faults[kind]()
            except Exception as exc:  # the harness failing is a test failure, not chaos
                self.errors.append(f"{kind}: {exc!r}")
                detail = "FAILED"
            self.schedule.append(
                f"{started:6.1f}s {kind:8} {detail} ({time.monotonic() - self.t0 - started:.1f}s)"
            )

    def heal(self) -> None:
        """Whatever happened, leave the server running and the proxy passing."""
        self.server.thaw()
        self.proxy.pass_through()
        if not self.server.running:
            self.server.start()

    def _kill9(self) -> str:
        down = self.rng.uniform(0.5, 2.0)
        self.server.kill()
        time.sleep(down)
        self.server.start()
        return f"down {down:.1f}s"

    def _freeze(self) -> str:
        frozen = self.rng.uniform(1.0, 2.0)
        self.server.freeze()
        time.sleep(frozen)
        self.server.thaw()
        return f"frozen {frozen:.1f}s"

    def _restart(self) -> str:
        self.server.restart()
        return "graceful"

    def _reset(self) -> str:
        window = self.rng.uniform(0.2, 0.6)
        self.proxy.reset()  # active connections get an RST, new ones on their first bytes
        time.sleep(window)
        self.proxy.pass_through()
        return f"resets for {window:.1f}s"

    def _latency(self) -> str:
        latency, length = self.rng.uniform(0.05, 0.4), self.rng.uniform(1.0, 3.0)
        self.proxy.delay(latency)
        time.sleep(length)
        self.proxy.pass_through()
        return f"+{latency * 1000:.0f}ms for {length:.1f}s"

    def _refuse(self) -> str:
        length = self.rng.uniform(0.5, 2.0)
        self.proxy.refuse()
        self.proxy.reset_active()
        time.sleep(length)
        self.proxy.pass_through()
        return f"refused {length:.1f}s"


def _soak_config(proxy: FaultProxy) -> Any:
    return make_config(
        proxy,
        retry=RetryConfig(
            max_attempts=4,
            initial_delay=0.05,
            max_delay=0.5,
            timeout_per_attempt=1.0,
            total_timeout=4.0,
        ),
        breaker=CircuitBreakerConfig(failure_threshold=5, recovery_timeout=1.0),
        pool=ConnectionPoolConfig(
            pool_size=POOL_SIZE,
            max_connections=MAX_CONNECTIONS,
            connection_timeout=2.0,
            health_check_interval=0.5,
        ),
        health_probe_timeout=0.5,
        spool_replay_interval=0.5,
    )


@dataclass
class Run:
    """What the soak saw while it ran, for the summary and the assertions."""

    tallies: list[Tally]
    chaos: Chaos
    stuck: list[str]
    peak_checked_out: int = 0
    samples: int = 0
    over_bound: list[str] = field(default_factory=list)


def _soak(mgr: ClickHouseConnectionManager, chaos: Chaos, t0: float) -> Run:
    """Traffic from WORKERS threads and the chaos thread until SOAK_SECONDS have passed."""
    stop = threading.Event()
    end = t0 + SOAK_SECONDS
    run = Run(tallies=[Tally() for _ in range(WORKERS)], chaos=chaos, stuck=[])

    def run_worker(w: int) -> None:
        run.tallies[w] = worker(mgr, w, stop, end + STUCK_AFTER)

    threads = [
        threading.Thread(target=run_worker, args=(w,), name=f"soak-{w}", daemon=True)
        for w in range(WORKERS)
    ]
    # No fault starts in the last seconds, so the traffic ends on a healed server.
    threads.append(
        threading.Thread(
            target=chaos.run, args=(stop, end - COOL_DOWN), name="soak-chaos", daemon=True
        )
    )
    for t in threads:
        t.start()
    try:
        while time.monotonic() < end:  # sample the pool while the chaos runs
            for host in mgr.hosts:
                status = host.pool.status()
                run.samples += 1
                run.peak_checked_out = max(run.peak_checked_out, status["checked_out"])
                if status["checked_out"] > status["max_connections"]:
                    run.over_bound.append(f"{time.monotonic() - t0:.1f}s {status}")
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(STUCK_AFTER)
        chaos.heal()
    run.stuck = [t.name for t in threads if t.is_alive()]
    return run


@pytest.mark.faults
@pytest.mark.slow
def test_soak_under_chaos_loses_nothing(
    clickhouse_server: LocalClickHouse, record_property: Callable[[str, Any], None]
) -> None:
    server = clickhouse_server
    server.query(
        "CREATE TABLE soak (id UInt64, writer UInt8, payload String) ENGINE = MergeTree ORDER BY id"
    )
    proxy = FaultProxy((server.host, server.port)).start()
    gc.collect()
    fds_before, threads_before = open_fds(), threading.active_count()
    mgr = ClickHouseConnectionManager(_soak_config(proxy))
    try:
        mgr.start(wait=True, timeout=10)
        t0 = time.monotonic()
        run = _soak(mgr, Chaos(server, proxy, random.Random(SEED), t0), t0)
        # Everything accepted reaches ClickHouse once the spool drained (the replayer's job).
        spool = mgr.spool
        assert spool is not None
        stopped = time.monotonic()
        drained = poll(lambda: spool.pending().batches == 0, timeout=60, interval=0.1)
        drain_seconds = time.monotonic() - stopped
        status, metrics = spool.status(), mgr.metrics()
        closing = time.monotonic()
        mgr.close()
        close_seconds = time.monotonic() - closing
    finally:
        mgr.close()
        proxy.close()
    rows = server.query("SELECT id FROM soak", timeout=30)
    ((stored, unique),) = server.query("SELECT count(), uniqExact(id) FROM soak")
    present = Counter(row[0] for row in rows)
    tallies = run.tallies
    expected = {
        first + i for first, n in (a for t in tallies for a in t.accepted) for i in range(n)
    }
    lost = len(expected - present.keys())
    unknown = len(present.keys() - expected)
    duplicates = sum(present.values()) - len(present)

    # Nothing left behind: the manager closed, then the proxy (its threads end within 1 s).
    poll(lambda: threading.active_count() <= threads_before and open_fds() <= fds_before, 5.0)
    gc.collect()
    fd_delta = open_fds() - fds_before
    thread_delta = threading.active_count() - threads_before

    reads_failed = sum((t.reads_failed for t in tallies), Counter())
    unexpected = [u for t in tallies for u in t.unexpected]
    schedule = "\n  ".join(run.chaos.schedule)
    summary = (
        f"\nsoak: {SOAK_SECONDS:.0f}s seed={SEED} workers={WORKERS}\n"
        f"  reads ok {sum(t.reads_ok for t in tallies)}, failed {dict(reads_failed)}\n"
        f"  inserts delivered {sum(t.delivered for t in tallies)}, "
        f"spooled {sum(t.spooled for t in tallies)}, rows accepted {len(expected)}\n"
        f"  in ClickHouse: rows {sum(present.values())}, unique {len(present)}, "
        f"lost {lost}, duplicates {duplicates} (at least once: no dedup token on 18.16)\n"
        f"  spool: replayed {metrics['spool_batches_replayed']} batches, "
        f"set aside {status['failed_batches']}, left {status['pending_batches']}\n"
        f"  pool: peak checked out {run.peak_checked_out}/{MAX_CONNECTIONS} "
        f"over {run.samples} samples\n"
        f"  breaker opens {metrics['circuit_breaker_opens']}, "
        f"retries {metrics['retry_attempts']}, budget refusals "
        f"{metrics['retry_budget_exhausted']}\n"
        f"  fd delta {fd_delta:+d}, thread delta {thread_delta:+d}; after the run: "
        f"drained in {drain_seconds:.1f}s, close() took {close_seconds:.2f}s\n"
        f"  faults ({len(run.chaos.schedule)}):\n  {schedule}"
    )
    print(summary)
    for name, value in (("lost", lost), ("duplicates", duplicates), ("faults", schedule)):
        record_property(f"soak_{name}", value)

    assert not run.chaos.errors, f"the fault harness failed: {run.chaos.errors}{summary}"
    assert not run.stuck, f"threads stuck: {run.stuck}{summary}"
    assert not unexpected, f"unexpected errors: {Counter(unexpected).most_common(10)}{summary}"
    assert drained, f"the spool did not drain within 60 s{summary}"
    assert lost == 0, summary
    assert unknown == 0, summary  # only rows somebody inserted
    assert status["failed_batches"] == 0, summary  # nothing set aside: all rows were good
    assert duplicates == stored - unique, summary  # counted twice, both ways agree
    assert not run.over_bound, f"pool over its bound: {run.over_bound[:5]}{summary}"
    assert sum(t.reads_ok for t in tallies) > 0 and expected, summary
    if SOAK_SECONDS >= 40:
        kinds = {line.split()[1] for line in run.chaos.schedule}
        assert kinds == set(FAULT_KINDS), f"not every fault kind ran{summary}"
    assert close_seconds < 10.0, summary  # hang guard
    assert fd_delta <= FD_SLACK, f"file descriptors leaked{summary}"
    assert thread_delta <= THREAD_SLACK, f"threads leaked: {threading.enumerate()}{summary}"
