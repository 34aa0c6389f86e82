"""The README's main job: a private local ClickHouse, a resilient client, a real outage.

``python -m chresilient.demo`` starts Debian's ``clickhouse-server`` as a private process
(or uses ``--url``), connects a :class:`ClickHouseConnectionManager`, runs queries,
restarts the server underneath the pool, freezes it to show the breaker failing fast,
and prints the health and metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .config import CircuitBreakerConfig, Config, RetryConfig
from .errors import ClickHouseUnavailableError, describe
from .manager import ClickHouseConnectionManager
from .testing.server import LocalClickHouse


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run(server: LocalClickHouse | None, cfg: Config) -> int:
    mgr = ClickHouseConnectionManager(cfg)
    try:
        mgr.start(wait=True, timeout=30)
        version = mgr.execute("SELECT version()")[0][0]
        say(f"connected to ClickHouse {version} at {cfg.safe_url()}")
        rows = mgr.execute("SELECT number, number * number FROM system.numbers LIMIT 5")
        say(f"query result: {rows}")
        if server is not None:
            say("restarting the server under a warm pool ...")
            server.restart()
            started = time.monotonic()
            mgr.execute("SELECT 1")
            say(
                f"first query after the restart succeeded in {time.monotonic() - started:.3f}s "
                f"(errors seen by the caller: {mgr.metrics()['query_errors_total']})"
            )
            say("freezing the server (SIGSTOP) ...")
            server.freeze()
            for i in range(4):
                started = time.monotonic()
                try:
                    mgr.execute("SELECT 1")
                except ClickHouseUnavailableError as err:
                    say(
                        f"call {i + 1}: {type(err).__name__} after "
                        f"{time.monotonic() - started:.3f}s: {describe(err)}"
                    )
            server.thaw()
            say("server thawed; waiting for the breaker's recovery timeout ...")
            time.sleep(cfg.breaker.recovery_timeout + 0.1)
            say(f"query after recovery: {mgr.execute('SELECT 42')}")
        say("health: " + json.dumps(mgr.health(), default=str))
        metrics: dict[str, Any] = mgr.metrics()
        say("metrics: " + json.dumps({k: v for k, v in metrics.items() if k != "hosts"}))
        return 0
    finally:
        mgr.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chresilient.demo", description=__doc__)
    parser.add_argument(
        "--url", help="use this server instead of a private local one (no fault injection then)"
    )
    args = parser.parse_args(argv)
    fast = dict(
        retry=RetryConfig(
            max_attempts=2, initial_delay=0.05, max_delay=0.2, timeout_per_attempt=1.0
        ),
        breaker=CircuitBreakerConfig(failure_threshold=2, recovery_timeout=1.0),
    )
    if args.url:
        return run(None, Config.from_url(args.url, **fast))
    say("starting a private clickhouse-server on loopback ...")
    with LocalClickHouse() as server:
        say(f"server pid {server.pid} on 127.0.0.1:{server.port}")
        return run(server, Config(host=server.host, port=server.port, **fast))  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
