"""The benchmark scenarios. Each returns rows for the results table.

Every figure that compares speed is a ratio against the bare clickhouse-driver ``Client``
measured in the same run, by :func:`benchmarks.timing.interleaved`.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import threading
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from clickhouse_driver import Client

from chresilient import (
    CircuitBreakerConfig,
    CircuitOpenError,
    ClickHouseConnectionManager,
    Config,
    ConnectionPoolConfig,
    RetryConfig,
    tracing,
)
from chresilient.connection import make_client
from chresilient.spool.store import SpoolStore
from chresilient.sqlalchemy import create_engine as chresilient_engine
from chresilient.statement import READ
from chresilient.testing.server import LocalClickHouse

from .timing import interleaved


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    scenario: str
    candidate: str
    figure: str
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass(frozen=True)
class Size:
    """How long to run: ``quick`` is the smoke run of the test suite."""

    select1_rounds: int
    rows_rounds: int
    concurrency_seconds: float
    failfast_calls: int
    frozen_calls: int
    frozen_cap: float
    recovery_timeout: float
    spool_rows: int

    @classmethod
    def full(cls) -> Size:
        return cls(3000, 200, 5.0, 2000, 3, 2.0, 5.0, 1_000_000)

    @classmethod
    def quick(cls) -> Size:
        return cls(30, 5, 0.3, 50, 1, 0.5, 1.0, 5_000)


def _config(server: LocalClickHouse, **changes: Any) -> Config:
    # The spool lives beside the benchmark's private server, not in the user's cache.
    spool = str(server.base_dir / "spool")
    return Config(host=server.host, port=server.port, spool_dir=spool, **changes)


def _bare(server: LocalClickHouse, **kwargs: Any) -> Client:
    return Client(server.host, port=server.port, **kwargs)


PING_FREE = "ping-free driver (the limit)"


@contextmanager
def _candidates(server: LocalClickHouse) -> Iterator[dict[str, Callable[[str], Any]]]:
    """Every client under test, each as ``run(query) -> rows``."""
    from clickhouse_pool import ChPool  # the bench extra

    bare = _bare(server)
    cfg = _config(server)
    mgr = ClickHouseConnectionManager(cfg)
    # The driver without its ping before every query: the floor for any pooled client.
    ping_free = make_client(cfg, (server.host, server.port), cfg.retry.timeout_per_attempt)
    ch_pool = ChPool(host=server.host, port=server.port, connections_min=1, connections_max=10)
    url = f"clickhouse+native://default@{server.host}:{server.port}/default"
    sa_plain = sa.create_engine(url)
    sa_ping = sa.create_engine(url, pool_pre_ping=True)
    ours_sa = chresilient_engine(_config(server))

    def via_pool(query: str) -> Any:
        with ch_pool.get_client() as client:
            return client.execute(query)

    def via_engine(engine: sa.Engine) -> Callable[[str], Any]:
        def run(query: str) -> Any:
            with engine.connect() as conn:
                return conn.exec_driver_sql(query).fetchall()

        return run

    try:
        yield {
            "bare driver Client": bare.execute,
            PING_FREE: ping_free.execute,
            "chresilient": mgr.execute,
            "clickhouse-pool": via_pool,
            "SQLAlchemy native": via_engine(sa_plain),
            "SQLAlchemy native, pool_pre_ping": via_engine(sa_ping),
            "chresilient.sqlalchemy engine": via_engine(ours_sa),
        }
    finally:
        mgr.close()
        bare.disconnect()
        ping_free.disconnect()
        ch_pool.cleanup()
        for engine in (sa_plain, sa_ping, ours_sa):
            engine.dispose()


def per_call(server: LocalClickHouse, size: Size) -> list[Row]:
    """Scenario 1: one thread, SELECT 1 and a 10,000-row select; then what chresilient's
    own path costs per call, warm (no query: the pool alone, then the whole call)."""
    rows: list[Row] = []
    queries = [
        ("SELECT 1", "SELECT 1", size.select1_rounds, 0.90),
        ("10,000-row select",
         "SELECT number, toString(number) FROM system.numbers LIMIT 10000",
         size.rows_rounds, 0.97),
    ]
    with _candidates(server) as candidates:
        for label, query, rounds, target in queries:
            timings = interleaved({name: functools.partial(run, query)
                                   for name, run in candidates.items()}, rounds)
            base = timings["bare driver Client"].median
            for name, timing in timings.items():
                ratio = timing.median / base
                is_ours = name == "chresilient"
                note = ""
                if is_ours:
                    gap = (timing.median - timings[PING_FREE].median) * 1e6
                    note = f"{gap:+.0f} us vs the ping-free driver"
                rows.append(Row(
                    scenario=f"1. per call: {label}",
                    candidate=name,
                    figure=f"median {timing.median * 1e6:.0f} us",
                    ratio=ratio,
                    target=f"<= {target:.2f}x" if is_ours else "",
                    met=(ratio <= target) if is_ours else None,
                    note=note,
                ))
    return rows + _path_cost(server, size)


def _path_cost(server: LocalClickHouse, size: Size) -> list[Row]:
    """What chresilient's own per-call work costs, without a query: warm (a tight loop)
    and between real queries (each step added to a ping-free SELECT 1, interleaved)."""
    cfg = _config(server)
    mgr = ClickHouseConnectionManager(cfg)
    ping_free = make_client(cfg, (server.host, server.port), cfg.retry.timeout_per_attempt)
    try:
        mgr.execute("SELECT 1")
        host = mgr.hosts[0]
        queue_pool = host.pool.queue_pool

        def pool_only() -> None:
            queue_pool.connect().close()

        def host_pool() -> None:
            with host.pool.connection(cfg.retry.timeout_per_attempt):
                pass

        def whole_call() -> None:
            mgr.executor.call(lambda conn: None, READ)

        steps = {"SQLAlchemy QueuePool checkout + checkin": pool_only,
                 "HostPool.connection(): + liveness peek, timeout, close() tracking": host_pool,
                 "Executor.call(): + breaker, retry bookkeeping, metrics": whole_call}

        def with_query(step: Callable[[], None]) -> Callable[[], Any]:
            def run() -> Any:
                step()
                return ping_free.execute("SELECT 1")

            return run

        candidates: dict[str, Callable[[], Any]] = {"query": with_query(lambda: None)}
        candidates.update({label: with_query(step) for label, step in steps.items()})
        timings = interleaved(candidates, size.select1_rounds)
        base = timings["query"].median
        calls = max(200, size.select1_rounds * 3)
        rows = []
        for label, step in steps.items():
            warm = min(timeit.repeat(step, number=calls, repeat=5)) / calls
            cold = timings[label].median - base
            rows.append(Row("1. per call: chresilient's own path, no query", label,
                            f"warm {warm * 1e6:.1f} us per call; {cold * 1e6:+.0f} us "
                            "between real queries"))
        hooks = {"of which the metrics record (counters, duration histogram)":
                 lambda: mgr.metrics_registry.record_call(0.001),
                 "of which the tracing check with tracing off (no TracerProvider)":
                 tracing.wanted}
        for label, hook in hooks.items():
            warm = min(timeit.repeat(hook, number=calls, repeat=5)) / calls
            rows.append(Row("1. per call: chresilient's own path, no query", label,
                            f"warm {warm * 1e6:.2f} us per call"))
        return rows
    finally:
        mgr.close()
        ping_free.disconnect()


def _throughput(
    worker: Callable[[int, threading.Event], int], threads: int, seconds: float
) -> tuple[int, list[BaseException]]:
    stop = threading.Event()
    counts = [0] * threads
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            counts[i] = worker(i, stop)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join(timeout=30)
    return sum(counts), errors


def concurrency(server: LocalClickHouse, size: Size) -> list[Row]:
    """Scenario 2: 32 threads on pool 5 / max 10 vs 10 bare clients on 10 threads."""
    cfg = _config(server, pool=ConnectionPoolConfig(pool_size=5, max_connections=10))
    mgr = ClickHouseConnectionManager(cfg)
    observer = _bare(server)
    baseline = _tcp_connections(observer)
    peak = [0]

    def ours(_: int, stop: threading.Event) -> int:
        done = 0
        while not stop.is_set():
            mgr.execute("SELECT 1")
            done += 1
        return done

    sampling = threading.Event()

    def sample() -> None:  # one thread owns the observer: a driver Client is not thread-safe
        while not sampling.wait(0.02):
            peak[0] = max(peak[0], _tcp_connections(observer) - baseline)

    clients = [_bare(server) for _ in range(10)]

    def bare(i: int, stop: threading.Event) -> int:
        done = 0
        while not stop.is_set():
            clients[i].execute("SELECT 1")
            done += 1
        return done

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        ours_total, ours_errors = _throughput(ours, 32, size.concurrency_seconds)
        sampling.set()
        sampler.join(timeout=5)
        bare_total, bare_errors = _throughput(bare, 10, size.concurrency_seconds)
        # The same pool with as many threads as connections: no thread ever waits.
        ten_total, ten_errors = _throughput(ours, 10, size.concurrency_seconds)
    finally:
        sampling.set()
        mgr.close()
        observer.disconnect()
        for client in clients:
            client.disconnect()
    ratio = ours_total / bare_total if bare_total else 0.0
    per_s = lambda n: f"{n / size.concurrency_seconds:.0f} queries/s"  # noqa: E731
    return [
        Row("2. concurrency", "bare driver, 10 clients x 10 threads", per_s(bare_total), 1.0,
            note=f"errors {len(bare_errors)}"),
        Row("2. concurrency", "chresilient, 32 threads, pool 5/max 10", per_s(ours_total), ratio,
            target=">= 0.97x, 0 errors, <= 10 server connections",
            met=ratio >= 0.97 and not ours_errors and peak[0] <= 10,
            note=f"errors {len(ours_errors)}, peak server connections {peak[0]}"),
        Row("2. concurrency", "chresilient, 10 threads, pool 5/max 10", per_s(ten_total),
            ten_total / bare_total if bare_total else 0.0,
            note=f"errors {len(ten_errors)}; no thread waits for a connection: the "
                 "difference to 32 threads is the cost of handing connections over"),
    ]


def fail_fast(server: LocalClickHouse, size: Size) -> list[Row]:
    """Scenario 3: a call while the breaker is open vs the bare driver on a frozen server."""
    cfg = _config(
        server,
        retry=RetryConfig(max_attempts=1, timeout_per_attempt=size.frozen_cap),
        breaker=CircuitBreakerConfig(failure_threshold=1, recovery_timeout=3600),
    )
    mgr = ClickHouseConnectionManager(cfg)
    bare = _bare(server, send_receive_timeout=size.frozen_cap,
                 connect_timeout=size.frozen_cap, sync_request_timeout=size.frozen_cap)
    bare.execute("SELECT 1")
    mgr.execute("SELECT 1")
    server.freeze()
    try:
        with contextlib.suppress(Exception):  # expected to fail: it trips the breaker
            mgr.execute("SELECT 1")
        refused = []
        for _ in range(size.failfast_calls):
            started = time.perf_counter()
            try:
                mgr.execute("SELECT 1")
            except CircuitOpenError:
                refused.append(time.perf_counter() - started)
        frozen = []
        for _ in range(size.frozen_calls):
            started = time.perf_counter()
            try:
                bare.execute("SELECT 1")
            except Exception:
                frozen.append(time.perf_counter() - started)
    finally:
        server.thaw()
        mgr.close()
        bare.disconnect()
    ordered = sorted(refused)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return [
        Row("3. fail fast", "chresilient, breaker open", f"p50 {p50 * 1e6:.0f} us, "
            f"p99 {p99 * 1e6:.0f} us", target="p99 < 1 ms", met=p99 < 0.001,
            note=f"{len(refused)} calls, all CircuitOpenError"
            if len(refused) == size.failfast_calls else "not all calls were refused"),
        Row("3. fail fast", "bare driver, frozen server",
            f"median {statistics.median(frozen):.2f} s" if frozen else "no timeout",
            note=f"bounded by this benchmark's cap of {size.frozen_cap:.1f} s per timeout; "
                 "the driver's defaults are 10 s connect and 300 s send/receive"),
    ]


def startup_gate(server: LocalClickHouse, size: Size) -> list[Row]:
    """Scenario 5: time from the server answering to ``start()`` returning."""
    server.stop()
    mgr = ClickHouseConnectionManager(_config(server))
    gate_done: list[float] = []
    ready_at: list[float] = []

    def gate() -> None:
        mgr.start(wait=True, timeout=60)
        gate_done.append(time.monotonic())

    def poll() -> None:  # an independent, tight readiness poll: the reference clock
        probe = _bare(server, connect_timeout=0.2, send_receive_timeout=1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                probe.execute("SELECT 1")
            except Exception:
                time.sleep(0.005)
                continue
            ready_at.append(time.monotonic())
            probe.disconnect()
            return

    threads = [threading.Thread(target=gate, daemon=True), threading.Thread(target=poll,
                                                                         daemon=True)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    server.start()
    for t in threads:
        t.join(timeout=60)
    mgr.close()
    if not gate_done or not ready_at:
        return [Row("5. startup gate", "chresilient start(wait=True)", "did not finish",
                    target="<= 1 s", met=False)]
    lag = max(0.0, gate_done[0] - ready_at[0])
    return [Row("5. startup gate", "chresilient start(wait=True)",
                f"{lag * 1000:.0f} ms after the server answered", target="<= 1 s",
                met=lag <= 1.0)]


def recovery(server: LocalClickHouse, size: Size) -> list[Row]:
    """Scenario 4: server back -> first successful application query, with/without monitor."""
    rows = []
    for with_monitor in (True, False):
        cfg = _config(
            server,
            retry=RetryConfig(max_attempts=1, timeout_per_attempt=1.0),
            breaker=CircuitBreakerConfig(failure_threshold=1,
                                         recovery_timeout=size.recovery_timeout),
            pool=ConnectionPoolConfig(health_check_interval=0.5),
        )
        mgr = ClickHouseConnectionManager(cfg)
        try:
            mgr.execute("SELECT 1")
            if with_monitor:
                mgr.start(wait=False)  # the health monitor probes every 0.5 s
            server.kill()
            with contextlib.suppress(Exception):
                mgr.execute("SELECT 1")  # fails: the breaker opens
            server.start()  # returns once the server answers
            back = time.monotonic()
            deadline = back + size.recovery_timeout + 10
            while time.monotonic() < deadline:
                try:
                    mgr.execute("SELECT 1")
                    break
                except Exception:
                    time.sleep(0.01)
            lag = time.monotonic() - back
        finally:
            mgr.close()
        if with_monitor:
            rows.append(Row("4. recovery", "chresilient, monitor every 0.5 s",
                            f"{lag * 1000:.0f} ms to the first successful query",
                            target="<= 1 s", met=lag <= 1.0))
        else:
            rows.append(Row("4. recovery", "chresilient, no monitor",
                            f"{lag * 1000:.0f} ms", note="waits out the breaker's "
                            f"recovery_timeout ({size.recovery_timeout:.0f} s)"))
    return rows


def spool(server: LocalClickHouse, size: Size) -> list[Row]:
    """Scenario 6: rows/s into the spool and replayed from it, each interleaved in chunks
    with bare INSERTs of the same batches into a twin table (both tables grow alike, so
    the server's merges and part limits weigh on both); peak RSS; the steps of one batch."""
    mgr = ClickHouseConnectionManager(_config(server, spool_max_bytes=4 * 1024**3))
    bare = _bare(server)
    stamp = int(time.time())
    table, twin = f"bench_spool_{stamp}", f"bench_bare_{stamp}"
    for name in (table, twin):
        mgr.execute(f"CREATE TABLE {name} (id UInt64, name String) "
                    "ENGINE = MergeTree ORDER BY id")
    batch, chunk = 1000, 10
    chunks = max(1, size.spool_rows // batch // chunk)
    data = [(i, f"event-{i}") for i in range(batch)]

    def bare_chunk() -> float:
        started = time.perf_counter()
        for _ in range(chunk):
            bare.execute(f"INSERT INTO {twin} (id, name) VALUES", data)
        return time.perf_counter() - started

    def spool_chunk() -> float:
        started = time.perf_counter()
        for _ in range(chunk):
            assert mgr.insert(table, data, ["id", "name"]).spooled
        return time.perf_counter() - started

    try:
        rss_before = _rss_kib("VmRSS")
        mgr.hosts[0].breaker.force_open(ConnectionError("benchmark: spool everything"))
        write = bare_write = 0.0
        for _ in range(chunks):
            write += spool_chunk()
            bare_write += bare_chunk()
        peak = _rss_kib("VmHWM")
        mgr.hosts[0].breaker.reset()
        assert mgr.spool is not None
        replay = bare_replay = 0.0
        replayed, outcome = 0, "empty"
        inside: dict[str, float] = {}
        with _timing(inside, mgr.executor, "query", "INSERT through the call path"), \
                _timing(inside, mgr.spool.store, "claim", "claim"), \
                _timing(inside, mgr.spool.store, "ack", "ack (durable delete)"):
            for _ in range(chunks):
                started = time.perf_counter()
                report = mgr.spool.replay(limit=chunk)
                replay += time.perf_counter() - started
                replayed, outcome = replayed + report.rows, report.outcome
                bare_replay += bare_chunk()
        inside["the rest (decode, bookkeeping)"] = replay - sum(inside.values())
        stored = mgr.execute(f"SELECT count() FROM {table}")[0][0]
        steps = _spool_steps(server.base_dir / "spool-steps", data, max(10, chunks * 2))
    finally:
        for name in (table, twin):
            mgr.execute(f"DROP TABLE IF EXISTS {name}")
        mgr.close()
        bare.disconnect()
    rows_total = chunks * chunk * batch

    def rate(seconds: float) -> str:
        return f"{rows_total / seconds:,.0f} rows/s"

    out = [
        Row("6. spool", "bare driver INSERT, 1000-row batches, beside the writes",
            rate(bare_write), 1.0),
        Row("6. spool", "insert() into the spool (breaker open)", rate(write),
            bare_write / write, target=">= 2.00x", met=bare_write / write >= 2.0,
            note=f"{rows_total:,} rows in {batch}-row batches, {chunk} per chunk"),
        Row("6. spool", "bare driver INSERT, 1000-row batches, beside the replay",
            rate(bare_replay), 1.0),
        Row("6. spool", "replay into ClickHouse", rate(replay), bare_replay / replay,
            target=">= 0.95x", met=bare_replay / replay >= 0.95,
            note=f"{replayed:,} rows, last outcome {outcome}; "
                 f"{'all rows stored' if stored == rows_total else f'{stored} of {rows_total}'}"),
        Row("6. spool", "peak RSS of the benchmark process",
            f"{peak / 1024:.0f} MiB", note=f"RSS before spooling {rss_before / 1024:.0f} MiB"),
    ]
    batches = chunks * chunk
    out.append(Row("6. spool: one 1000-row batch, step by step", "bare INSERT (the server's "
                   "part and the send)", f"{bare_replay / batches * 1e6:.0f} us"))
    for label, seconds in inside.items():
        out.append(Row("6. spool: one 1000-row batch, step by step", f"in the replay: {label}",
                       f"{seconds / batches * 1e6:.0f} us"))
    for label, seconds in steps.items():
        out.append(Row("6. spool: one 1000-row batch, step by step", label,
                       f"{seconds * 1e6:.0f} us"))
    return out


@contextmanager
def _timing(totals: dict[str, float], owner: Any, method: str, label: str) -> Iterator[None]:
    """Add the wall time of every call of ``owner.method`` to ``totals[label]``."""
    original = getattr(owner, method)
    totals.setdefault(label, 0.0)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - started

    setattr(owner, method, timed)
    try:
        yield
    finally:
        delattr(owner, method)  # the class's method again


def _spool_steps(directory: Any, data: list[tuple[Any, ...]], count: int) -> dict[str, float]:
    """Mean seconds per batch of each spool step on its own (no server involved)."""
    store = SpoolStore(str(directory), target="loopback:9000/bench", max_bytes=1 << 32)
    put = claim = decode = ack = 0.0
    try:
        for i in range(count):
            started = time.perf_counter()
            store.put("t", ["id", "name"], data, batch_id=f"step-{i}")
            put += time.perf_counter() - started
        for _ in range(count):
            t0 = time.perf_counter()
            claimed = store.claim(lease_seconds=60.0)
            t1 = time.perf_counter()
            assert claimed is not None
            claimed.decode_rows()
            t2 = time.perf_counter()
            store.ack(claimed)
            t3 = time.perf_counter()
            claim, decode, ack = claim + t1 - t0, decode + t2 - t1, ack + t3 - t2
    finally:
        store.close()
    return {
        "put: encode and a durable (fsynced) write": put / count,
        "claim: choose and lease (not synced)": claim / count,
        "decode the stored rows": decode / count,
        "ack: a durable (fsynced) delete": ack / count,
    }


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _tcp_connections(client: Client) -> int:
    rows = client.execute("SELECT value FROM system.metrics WHERE metric = 'TCPConnection'")
    return int(rows[0][0])


def tracing_cost(server: LocalClickHouse, size: Size) -> list[Row]:
    """Scenario 7: what the OpenTelemetry hooks cost per SELECT 1, interleaved: turned off,
    the default (opentelemetry-api installed, no TracerProvider), and an SDK provider
    making spans that no exporter takes (chresilient.tracing.configure: nothing global)."""
    from opentelemetry.sdk.trace import TracerProvider  # the test extra

    bare = _bare(server)
    mgr = ClickHouseConnectionManager(_config(server))
    sdk = TracerProvider()

    def with_tracing(**setup: Any) -> Callable[[], Any]:
        def run() -> Any:
            tracing.configure(**setup)
            try:
                return mgr.execute("SELECT 1")
            finally:
                tracing.configure()

        return run

    def bare_call() -> Any:
        tracing.configure()  # the same bookkeeping as the others
        return bare.execute("SELECT 1")

    try:
        timings = interleaved(
            {
                "bare driver Client": bare_call,
                "chresilient, tracing off": with_tracing(enabled=False),
                "chresilient, OTel API, no TracerProvider": with_tracing(),
                "chresilient, SDK TracerProvider": with_tracing(provider=sdk),
            },
            size.select1_rounds,
        )
    finally:
        tracing.configure()
        mgr.close()
        bare.disconnect()
        sdk.shutdown()
    base = timings["bare driver Client"].median
    off = timings["chresilient, tracing off"].median
    rows = []
    for name, timing in timings.items():
        extra = (timing.median - off) * 1e6
        default = name == "chresilient, OTel API, no TracerProvider"
        rows.append(Row(
            scenario="7. tracing hooks: SELECT 1",
            candidate=name,
            figure=f"median {timing.median * 1e6:.0f} us",
            ratio=timing.median / base,
            target="within 2% of tracing off" if default else "",
            met=(timing.median <= off * 1.02) if default else None,
            note="" if name.startswith("bare") or name.endswith("off")
            else f"{extra:+.0f} us vs tracing off",
        ))
    return rows


SCENARIOS: list[Callable[[LocalClickHouse, Size], list[Row]]] = [
    per_call,
    concurrency,
    fail_fast,
    recovery,
    spool,
    tracing_cost,
    startup_gate,  # last: it stops and restarts the server
]
