"""The ``chresilient`` command: wait, check, health, metrics, spool, schema, serve.

Configured like the library: ``CLICKHOUSE_*`` variables, or ``--url``. Exit codes, the
same for every subcommand: 0 success, 1 the check failed (not ready, unhealthy, a
scenario failed, schema drift), 2 bad usage or configuration, 3 an error waiting cannot
fix (wrong credentials, unknown database, a refused or changed schema file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, TextIO

import structlog

from . import cli_spool
from .config import Config
from .errors import ConfigError, StartupError, StartupTimeoutError, describe
from .manager import ClickHouseConnectionManager

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FATAL = 0, 1, 2, 3
RECONNECT_TOKEN_ENV = "CHRESILIENT_RECONNECT_TOKEN"


def _configure_logging(level: str) -> None:
    """Logs go to stderr so that stdout stays machine-readable (``--json``)."""
    numeric = getattr(logging, level.upper())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # The driver logs a traceback for every failed connect; our own logs say it shorter.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)


def _config(args: argparse.Namespace) -> Config:
    given: Config | None = getattr(args, "config", None)  # main(config=...): Django
    if given is not None and not args.url:
        return given
    return Config.from_url(args.url) if args.url else Config.from_env()


def _print_json(data: Any, out: TextIO) -> None:
    json.dump(data, out, indent=2, default=str, sort_keys=True)
    out.write("\n")


# -- verbs ----------------------------------------------------------------------------
def cmd_wait(args: argparse.Namespace, out: TextIO) -> int:
    cfg = _config(args)
    print(
        f"waiting up to {args.timeout:.0f}s for ClickHouse at {cfg.safe_url()} ...",
        file=sys.stderr,
        flush=True,
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        try:
            waited = mgr.wait_until_ready(args.timeout)
        except StartupTimeoutError as err:
            print(f"not ready: {err}", file=sys.stderr)
            return EXIT_FAILED
    print(f"ClickHouse is ready ({waited:.2f}s)", file=out)
    return EXIT_OK


def _started(args: argparse.Namespace) -> ClickHouseConnectionManager:
    mgr = ClickHouseConnectionManager(_config(args))
    mgr.start(wait=True, timeout=args.timeout, required=False)
    return mgr


def cmd_health(args: argparse.Namespace, out: TextIO) -> int:
    with _started(args) as mgr:
        report = mgr.health()
    if args.json:
        _print_json(report, out)
    else:
        print(f"status: {report['status']}", file=out)
        print(f"connection_state: {report.get('connection_state')}", file=out)
        for key in ("dependency_validation", "analytics_consistency", "spool"):
            if isinstance(report.get(key), dict):
                summary = {k: v for k, v in report[key].items() if not isinstance(v, (dict, list))}
                print(f"{key}: {json.dumps(summary, default=str)}", file=out)
    return EXIT_OK if report["status"] in ("healthy", "degraded") else EXIT_FAILED


def cmd_metrics(args: argparse.Namespace, out: TextIO) -> int:
    with _started(args) as mgr:
        if args.prometheus:
            from .prometheus import exposition

            body, _ = exposition(mgr)
            out.write(body.decode())
        else:
            _print_json(mgr.metrics(), out)
    return EXIT_OK


def cmd_spool(args: argparse.Namespace, out: TextIO) -> int:
    return cli_spool.run(args, _config(args), out, _print_json)


def cmd_schema(args: argparse.Namespace, out: TextIO) -> int:
    with ClickHouseConnectionManager(_config(args)) as mgr:
        if not mgr.schema.configured:
            print("no schema: set CLICKHOUSE_SCHEMA_DIR", file=sys.stderr)
            return EXIT_USAGE
        mgr.wait_until_ready(args.timeout)
        if args.action == "apply":
            _print_json(mgr.schema.apply(args.timeout), out)
            return EXIT_OK
        if args.action == "status":
            files = mgr.schema.status(args.timeout)
            _print_json(files, out)
            return EXIT_OK if all(f["state"] == "applied" for f in files) else EXIT_FAILED
        tables = mgr.schema.diff(args.timeout)
        _print_json(tables, out)
        drift = any(t["missing"] or t["changed"] or not t["exists"] for t in tables)
        return EXIT_FAILED if drift else EXIT_OK


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    from .checks import ValidationRun

    run = ValidationRun(_config(args), startup_timeout=args.timeout)
    results = run.run(simulate_failure=args.simulate_failure)
    ok = all(r.ok for r in results)
    if args.json:
        _print_json({"ok": ok, "scenarios": [r.as_dict() for r in results]}, out)
    else:
        width = max(len(r.scenario) for r in results)
        for r in results:
            verdict = "PASS" if r.ok else "FAIL"
            detail = r.figure if r.ok else r.reason
            if args.verbose and r.ok and r.reason:
                detail += f" ({r.reason})"
            print(f"{verdict}  {r.scenario.ljust(width)}  {detail}", file=out)
        print(f"{sum(r.ok for r in results)}/{len(results)} scenarios passed", file=out)
    if run.fatal is not None:
        return EXIT_FATAL
    return EXIT_OK if ok else EXIT_FAILED


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from wsgiref.simple_server import make_server

    from .health.wsgi import health_wsgi_app

    mgr = _started(args)
    app = health_wsgi_app(mgr, reconnect_token=os.environ.get(RECONNECT_TOKEN_ENV) or None)
    try:
        from waitress import create_server  # optional: a production WSGI server
    except ImportError:
        server: Any = make_server(args.host, args.port, app)
        serve, stop = server.serve_forever, server.shutdown
        port = server.server_port
    else:
        server = create_server(app, host=args.host, port=args.port, threads=4)
        serve, stop = server.run, server.close
        port = server.effective_port
    print(
        f"serving health endpoints on http://{args.host}:{port}/health/clickhouse",
        file=out,
        flush=True,
    )

    def on_signal(signum: int, frame: Any) -> None:
        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        serve()
    except OSError:  # waitress raises when its socket is closed under it
        pass
    finally:
        mgr.close()
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chresilient",
        description="Resilient ClickHouse connection tools.",
        epilog="Configuration comes from CLICKHOUSE_* variables unless --url is given.",
    )
    parser.add_argument(
        "--url",
        help="clickhouse://user:password@host:9000/db "
        "(prefer CLICKHOUSE_URL: arguments are visible in ps)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    wait = verbs.add_parser("wait", help="block until ClickHouse answers (startup gate)")
    wait.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    wait.set_defaults(func=cmd_wait, log_level_min="info")

    check = verbs.add_parser("check", help="the validation run: every scenario, pass/fail")
    check.add_argument("--verbose", action="store_true")
    check.add_argument("--json", action="store_true", help="machine-readable report")
    check.add_argument(
        "--simulate-failure",
        action="store_true",
        help="also inject faults through an in-process TCP proxy",
    )
    check.add_argument(
        "--timeout", type=float, default=5.0, help="startup wait, seconds (default 5)"
    )
    check.set_defaults(func=cmd_check)

    health = verbs.add_parser("health", help="print the health report")
    health.add_argument("--json", action="store_true")
    health.add_argument("--timeout", type=float, default=10.0)
    health.set_defaults(func=cmd_health)

    metrics = verbs.add_parser("metrics", help="print the metrics")
    metrics.add_argument("--prometheus", action="store_true", help="Prometheus text format")
    metrics.add_argument("--timeout", type=float, default=10.0)
    metrics.set_defaults(func=cmd_metrics)

    schema = verbs.add_parser(
        "schema", help="the tables of CLICKHOUSE_SCHEMA_DIR: status, apply, diff"
    )
    schema.add_argument("action", choices=["status", "apply", "diff"])
    schema.add_argument("--timeout", type=float, default=30.0)
    schema.set_defaults(func=cmd_schema)

    cli_spool.add_parser(verbs)
    verbs.choices["spool"].set_defaults(func=cmd_spool)

    serve = verbs.add_parser("serve", help="serve the health endpoints (a sidecar)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8081)
    serve.add_argument("--timeout", type=float, default=30.0)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, config: Config | None = None
) -> int:
    """The command line; ``config`` replaces the environment (``--url`` still wins)."""
    args = build_parser().parse_args(argv)
    args.config = config
    level = args.log_level
    if getattr(args, "log_level_min", None) == "info" and level == "warning":
        level = "info"  # wait shows its progress by default
    if config is None or not structlog.is_configured():  # else the host app's (Django's)
        _configure_logging(level)
    try:
        code: int = args.func(args, out or sys.stdout)
        return code
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as err:  # any subcommand: waiting cannot fix it
        print(f"not ready: {err}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as err:
        print(f"error: {describe(err)}", file=sys.stderr)
        return EXIT_FAILED
