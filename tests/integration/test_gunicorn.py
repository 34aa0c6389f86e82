"""A real deployment: gunicorn --preload, 3 workers x 4 threads, through a ClickHouse outage.

The example backend (examples/flask_app.py) takes events while ClickHouse is killed and
restarted. Every worker keeps answering its health endpoint (200 or 503, never an error
or a hang), every accepted event is in ClickHouse afterwards, and each worker reports
healthy again on its own (seen through the per-worker series of the Prometheus endpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, subprocess_env, wait_until
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).with_name("gunicorn")
WORKERS = 3
REQUEST_TIMEOUT = 20.0  # a request slower than this counts as hung (expected: < 1 s)


# Each worker dumps every thread's stack to the log on SIGUSR2 (gunicorn leaves that
# signal alone in a worker; the master would re-exec on it, so only workers get it).
STACK_DUMP_CONF = """
import faulthandler, signal, sys

def post_worker_init(worker):
    faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
"""


def _dump_worker_stacks(master: int, log: Path) -> None:
    """Print the stacks of every worker (a failed wait may be a hung worker) and the log."""
    pids = [
        pid
        for children in Path(f"/proc/{master}/task").glob("*/children")
        for pid in children.read_text().split()
    ]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGUSR2)
    time.sleep(2.0)
    print(f"workers {pids}; gunicorn log:\n" + log.read_text(errors="replace")[-60_000:])


def _request(url: str, body: Any = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _worker_states(base: str) -> dict[str, str]:
    """pid -> connection state, from the workers that answered 30 metrics scrapes."""
    states: dict[str, str] = {}
    for _ in range(30):
        status, body = _request(base + "/health/clickhouse/metrics?format=prometheus")
        assert status == 200
        for family in text_string_to_metric_families(body.decode()):
            if family.name == "chresilient_connection_state":
                for sample in family.samples:
                    if sample.value == 1.0:
                        states[sample.labels["pid"]] = sample.labels["state"]
    return states


@pytest.mark.slow
def test_gunicorn_preload_workers_through_an_outage(clickhouse_server: Any, tmp_path: Path) -> None:
    server = clickhouse_server
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "prom").mkdir()
    env = subprocess_env(
        server,
        tmp_path,
        CLICKHOUSE_HEALTH_CHECK_INTERVAL="0.5",
        CLICKHOUSE_BREAKER_FAILURE_THRESHOLD="3",
        CLICKHOUSE_BREAKER_RECOVERY_TIMEOUT="1",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
        PYTHONPATH=str(ROOT),
    )
    log = (tmp_path / "gunicorn.log").open("wb")
    conf = tmp_path / "gunicorn_conf.py"
    conf.write_text(STACK_DUMP_CONF)
    proc = subprocess.Popen(
        [
            str(GUNICORN),
            "-c",
            str(conf),
            "--preload",
            "-w",
            str(WORKERS),
            "--threads",
            "4",
            "-b",
            f"127.0.0.1:{port}",
            "--chdir",
            str(ROOT / "examples"),
            "--graceful-timeout",
            "5",
            "--timeout",
            "60",
            "flask_app:app",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    accepted: list[int] = []
    problems: list[str] = []
    health_seen: dict[str, int] = {}
    spooled = [0]
    stop = threading.Event()
    lock = threading.Lock()

    def post(n_thread: int) -> None:
        n = 0
        while not stop.is_set() and n < 50_000:  # bounded in count; stop ends it first
            ids = [n_thread * 1_000_000 + n + i for i in range(5)]
            n += 5
            try:
                status, body = _request(
                    base + "/events", [{"id": i, "user": "u", "name": "e"} for i in ids]
                )
            except Exception as exc:  # a hang (timeout) or a dropped connection
                with lock:
                    problems.append(f"POST /events: {exc!r}")
                continue
            with lock:
                if status == 202:
                    accepted.extend(ids)
                    spooled[0] += bool(json.loads(body)["spooled"])
                else:
                    problems.append(f"POST /events: {status} {body[:200]!r}")
            time.sleep(0.01)

    def watch_health() -> None:
        while not stop.is_set():
            try:
                status, body = _request(base + "/health/clickhouse")
                verdict = json.loads(body)["status"]
            except Exception as exc:
                with lock:
                    problems.append(f"GET /health/clickhouse: {exc!r}")
                continue
            expected = {200: ("healthy", "degraded"), 503: ("unhealthy",)}
            with lock:
                if verdict not in expected.get(status, ()):
                    problems.append(f"health answered {status} {verdict}")
                health_seen[verdict] = health_seen.get(verdict, 0) + 1
            time.sleep(0.02)

    try:
        wait_until(lambda: _is_up(base), timeout=60, what="gunicorn to serve")
        threads = [threading.Thread(target=post, args=(t,)) for t in range(4)]
        threads += [threading.Thread(target=watch_health) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        server.kill()
        time.sleep(4.0)
        server.start()
        time.sleep(4.0)
        stop.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT + 5)
        assert not any(t.is_alive() for t in threads), "a client thread hangs"
        assert not problems, problems[:5]
        assert health_seen.get("unhealthy", 0) > 0 and health_seen.get("healthy", 0) > 0
        assert spooled[0] > 0  # some events arrived while ClickHouse was down
        # No row lost: the workers' spools drain into ClickHouse.
        client = server.client(connect_timeout=5, send_receive_timeout=30)
        query = "SELECT uniqExact(id), count() FROM events"
        wait_until(
            lambda: client.execute(query)[0][0] == len(accepted), timeout=60, what="spool drain"
        )
        stored = {row[0] for row in client.execute("SELECT id FROM events")}
        assert stored == set(accepted) and len(accepted) > 100
        print(
            f"accepted {len(accepted)} events ({spooled[0]} requests spooled), "
            f"health answers {health_seen}"
        )
        # Every worker reports healthy again, each from its own connections.
        wait_until(
            lambda: (lambda s: len(s) == WORKERS and set(s.values()) == {"healthy"})(
                _worker_states(base)
            ),
            timeout=30,
            what="every worker healthy",
        )
        # Totals over all workers: whichever worker answers the scrape sums every process
        # that runs a manager (the workers, and the master that built the app: --preload).
        wait_until(
            lambda: _totals(base)["chresilient_all_processes_rows_inserted_total"] >= len(accepted),
            timeout=30,
            what="the summed inserted rows",
        )
        # Rows spooled during the outage, by whichever workers, were all replayed (by
        # whichever workers), and the shared spool is empty.
        prefix = "chresilient_all_processes_spool_rows"

        def drained(totals: dict[str, float]) -> bool:
            written = totals[f"{prefix}_written_total"]
            replayed = totals[f"{prefix}_replayed_total"]
            pending = totals["chresilient_all_processes_spool_pending_rows"]
            return written > 0 and replayed == written and pending == 0

        wait_until(lambda: drained(_totals(base)), timeout=30, what="the summed spool counts")
        totals = _totals(base)
        assert totals["chresilient_all_processes_spool_dropped_rows_total"] == 0
        assert totals["chresilient_all_processes_retry_attempts_total"] > 0  # the outage
        for name in ("query_errors_total", "checked_out_connections"):
            assert f"chresilient_all_processes_{name}" in totals, name
        assert totals["chresilient_all_processes_healthy"] >= WORKERS
        summed = totals["chresilient_all_processes_queries_total"]
        assert summed > totals["chresilient_queries_total"]  # more than the answering worker
    except BaseException:
        _dump_worker_stacks(proc.pid, tmp_path / "gunicorn.log")
        raise
    finally:
        stop.set()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def _totals(base: str) -> dict[str, float]:
    """Unlabelled samples (the all-workers sums) plus the answering worker's query count."""
    status, body = _request(base + "/health/clickhouse/metrics?format=prometheus")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.startswith("chresilient_all_processes_") or (
                sample.name == "chresilient_queries_total"
            ):
                out[sample.name] = sample.value
    return out


def _is_up(base: str) -> bool:
    try:
        return _request(base + "/health/clickhouse")[0] == 200
    except OSError:
        return False
