"""The outage demo: a backend keeps taking analytics events while ClickHouse is down.

1. starts a private ClickHouse (Debian's clickhouse-server, loopback, temporary data dir);
2. runs ``examples/flask_app.py`` under waitress (a real WSGI server) in a subprocess;
3. sends events at it, kills ClickHouse (SIGKILL) for a few seconds, restarts it;
4. shows that the backend kept answering (degraded), that events spooled and were
   replayed, and ends with a report: events sent, rows in ClickHouse, rows lost, time to
   recover. Everything it started is stopped at the end.

Run from the repository root: ``.venv/bin/python examples/demo.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chresilient.testing.server import LocalClickHouse

HERE = Path(__file__).resolve().parent
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f}s] {text}", flush=True)


def http(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read() or b"null")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sender:
    """Posts batches of events with consecutive ids until stopped."""

    url: str
    batch: int = 10
    pause: float = 0.05
    accepted: int = 0
    delivered: int = 0
    spooled: int = 0
    failed: int = 0
    worst_latency: float = 0.0
    next_id: int = 1
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            events = [{"id": self.next_id + i, "user": f"u{(self.next_id + i) % 7}",
                       "name": "page_view"} for i in range(self.batch)]
            started = time.monotonic()
            try:
                status, body = http("POST", self.url + "/events", events)
            except OSError:
                status, body = 0, None
            self.worst_latency = max(self.worst_latency, time.monotonic() - started)
            if status == 202:
                self.accepted += len(events)
                self.next_id += len(events)
                if body["delivered"]:
                    self.delivered += len(events)
                else:
                    self.spooled += len(events)
            else:
                self.failed += 1  # these ids are sent again with the next batch
            self.stop.wait(self.pause)


def start_backend(server: LocalClickHouse, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(HERE),
        CLICKHOUSE_HOST=server.host,
        CLICKHOUSE_PORT=str(server.port),
        CLICKHOUSE_SPOOL_DIR=str(workdir / "spool"),
        CLICKHOUSE_HEALTH_CHECK_INTERVAL="0.5",
        CLICKHOUSE_RETRY_MAX_ATTEMPTS="2",
        CLICKHOUSE_RETRY_INITIAL_DELAY="0.05",
        CLICKHOUSE_RETRY_MAX_DELAY="0.2",
        CLICKHOUSE_RETRY_TIMEOUT_PER_ATTEMPT="1",
        CLICKHOUSE_BREAKER_FAILURE_THRESHOLD="3",
        CLICKHOUSE_BREAKER_RECOVERY_TIMEOUT="2",
    )
    log = open(workdir / "backend.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "waitress", f"--listen=127.0.0.1:{port}", "--threads=8",
         "flask_app:app"],
        cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for(predicate: Any, timeout: float, what: str) -> float:
    """Poll ``predicate`` every 50 ms; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(OSError, ValueError):
            if predicate():
                return time.monotonic() - started
        time.sleep(0.05)
    raise SystemExit(f"demo failed: timed out after {timeout:.0f}s waiting for {what}")


def run(quick: bool) -> int:
    before, outage, after = (1.5, 3.0, 1.5) if quick else (3.0, 6.0, 3.0)
    workdir = Path(tempfile.mkdtemp(prefix="chresilient-demo-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    say("starting a private clickhouse-server on loopback ...")
    with LocalClickHouse(data_dir=workdir / "clickhouse") as server:
        say(f"ClickHouse {server.version} on 127.0.0.1:{server.port} (pid {server.pid})")
        backend = start_backend(server, port, workdir)
        try:
            wait_for(lambda: http("GET", base + "/health/clickhouse/ready")[0] == 200, 60,
                     "the backend to become ready")
            say(f"backend (examples/flask_app.py under waitress) ready on {base}")
            sender = Sender(base)
            thread = threading.Thread(target=sender.run, daemon=True)
            thread.start()
            time.sleep(before)
            say(f"{sender.accepted} events sent so far; killing ClickHouse (SIGKILL) ...")
            server.kill()
            time.sleep(min(1.5, outage / 2))
            status, health = http("GET", base + "/health/clickhouse")
            code, _ = http("GET", base + "/events/count")
            say(f"while down: GET /health/clickhouse -> {status} {health['status']}; "
                f"GET /events/count -> {code}; events still accepted: {sender.accepted}, "
                f"spooled: {sender.spooled}")
            time.sleep(outage - min(1.5, outage / 2))
            say("restarting ClickHouse ...")
            server.start()
            restarted = time.monotonic()
            recovery = wait_for(lambda: http("GET", base + "/health/clickhouse")[0] == 200, 30,
                                "the backend to see ClickHouse again")
            say(f"backend healthy again {recovery:.2f}s after ClickHouse accepted queries")
            time.sleep(after)
            sender.stop.set()
            thread.join(timeout=10)

            def drained() -> bool:
                spool = http("GET", base + "/health/clickhouse")[1].get("spool", {})
                return spool.get("pending_batches", 1) == 0

            wait_for(drained, 60, "the spool to drain")
            drained_at = time.monotonic() - restarted
            say(f"spool drained {drained_at:.2f}s after the restart")
            rows, distinct = server.client().execute(
                "SELECT count(), uniqExact(id) FROM events WHERE id < %(n)s",
                {"n": sender.next_id})[0]
        finally:
            backend.send_signal(signal.SIGTERM)
            try:
                backend.wait(timeout=10)
            except subprocess.TimeoutExpired:
                backend.kill()
                backend.wait(timeout=5)
    lost = sender.accepted - distinct
    report = {
        "events sent (accepted by the backend)": sender.accepted,
        "delivered at once": sender.delivered,
        "spooled during the outage": sender.spooled,
        "requests refused by the backend": sender.failed,
        "slowest request (s)": round(sender.worst_latency, 3),
        "rows in ClickHouse": rows,
        "distinct events in ClickHouse": distinct,
        "rows lost": lost,
        "duplicates (at-least-once on servers without dedup tokens)": rows - distinct,
        "time to recover (s)": round(recovery, 3),
        "time to drain the spool after restart (s)": round(drained_at, 3),
    }
    print("\n== report ==")
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key.ljust(width)}  {value}")
    with contextlib.suppress(OSError):
        for path in sorted(workdir.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() else path.rmdir()
        workdir.rmdir()
    return 0 if lost == 0 and sender.accepted > 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a shorter outage (for tests)")
    return run(parser.parse_args().quick)


if __name__ == "__main__":
    sys.exit(main())
