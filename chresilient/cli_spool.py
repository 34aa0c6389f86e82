"""``chresilient spool ...``: what an operator does with the insert spool.

``status`` and ``replay`` for the queue; ``list``, ``show``, ``retry``, ``discard`` and
``export`` for batches set aside (rejected by the server, or out of attempts). Batches
are named by the ``seq`` number ``list`` prints. Nothing here prints row contents except
``export``, whose whole point is to write them to a file.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from .errors import StartupTimeoutError
from .manager import ClickHouseConnectionManager
from .spool import Spool
from .spool.export import FORMATS, load_command, write_batch
from .spool.records import SpooledBatch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ACTIONS = ("status", "replay", "purge", "list", "show", "retry", "discard", "export")


def add_parser(verbs: Any, parent: argparse.ArgumentParser | None = None) -> None:
    spool = verbs.add_parser(
        "spool",
        help="inspect and replay the insert spool; list, retry, discard or export set-aside "
        "batches",
    )
    spool.add_argument("action", choices=ACTIONS)
    spool.add_argument("ids", nargs="*", type=int, help="batch numbers (seq, from `list`)")
    spool.add_argument("--all", action="store_true", help="every set-aside batch")
    spool.add_argument("--yes", action="store_true", help="confirm purge or discard")
    spool.add_argument("--limit", type=int, default=None, help="replay at most N batches")
    spool.add_argument("--format", choices=sorted(FORMATS), default="jsonl")
    spool.add_argument("--output", default=None, help="export: a file (one batch) or dir")
    spool.add_argument("--timeout", type=float, default=30.0)


def run(args: argparse.Namespace, cfg: Any, out: TextIO, print_json: Any) -> int:
    with ClickHouseConnectionManager(cfg) as mgr:
        spool = mgr.spool
        if spool is None:
            print("the spool is disabled", file=sys.stderr)
            return EXIT_USAGE
        if args.action == "status":
            print_json(spool.status(), out)
            return EXIT_OK
        if args.action == "replay":
            return _replay(mgr, spool, args, out, print_json)
        if args.action == "purge":
            if not args.yes:
                print("purge deletes undelivered rows for good: add --yes", file=sys.stderr)
                return EXIT_USAGE
            removed = spool.purge(confirm=True)
            print(f"purged {removed.batches} batches, {removed.rows} rows", file=out)
            return EXIT_OK
        if args.action == "list":
            print_json([_summary(b) for b in spool.set_aside(args.ids or None)], out)
            return EXIT_OK
        ids = _chosen(args)
        if ids is None:
            return EXIT_USAGE
        batches = spool.set_aside(ids or None)
        missing = sorted(set(ids) - {b.seq for b in batches}) if ids else []
        if missing:
            print(f"no set-aside batch {', '.join(map(str, missing))}", file=sys.stderr)
            return EXIT_FAILED
        return _on_batches(args, spool, batches, out, print_json)


def _on_batches(
    args: argparse.Namespace,
    spool: Spool,
    batches: list[SpooledBatch],
    out: TextIO,
    print_json: Any,
) -> int:
    seqs = [b.seq for b in batches]
    if args.action == "show":
        print_json([_summary(b, settings=True) for b in batches], out)
    elif args.action == "retry":
        count = spool.requeue_failed(seqs)
        print(f"{count} batches back in the queue; `chresilient spool replay` sends them", file=out)
    elif args.action == "discard":
        if not args.yes:
            print("discard deletes these rows for good: add --yes", file=sys.stderr)
            return EXIT_USAGE
        gone = spool.discard(seqs, confirm=True)
        print(f"discarded {gone.batches} batches, {gone.rows} rows", file=out)
    else:
        return _export(args, batches, out)
    return EXIT_OK


def _chosen(args: argparse.Namespace) -> list[int] | None:
    """The ids named, [] for --all, None (after a message) for neither."""
    if args.ids and args.all:
        print("give batch numbers or --all, not both", file=sys.stderr)
        return None
    if not args.ids and not args.all:
        print(
            f"spool {args.action}: give batch numbers (see `spool list`) or --all", file=sys.stderr
        )
        return None
    return list(args.ids)


def _export(args: argparse.Namespace, batches: list[SpooledBatch], out: TextIO) -> int:
    ext = args.format
    if len(batches) == 1 and (args.output is None or not os.path.isdir(args.output)):
        batch = batches[0]
        if args.output is None:
            write_batch(batch, ext, out)
            return EXIT_OK
        with open(args.output, "w", encoding="utf-8", newline="") as fh:
            rows = write_batch(batch, ext, fh)
        print(f"{rows} rows: {load_command(batch, ext, args.output)}", file=sys.stderr)
        return EXIT_OK
    if args.output is None:
        print("exporting several batches needs --output DIR", file=sys.stderr)
        return EXIT_USAGE
    os.makedirs(args.output, exist_ok=True)
    for batch in batches:
        path = os.path.join(args.output, f"batch-{batch.seq}.{ext}")
        with open(path, "w", encoding="utf-8", newline="") as fh:
            rows = write_batch(batch, ext, fh)
        print(f"{rows} rows: {load_command(batch, ext, path)}", file=sys.stderr)
    return EXIT_OK


def _replay(
    mgr: ClickHouseConnectionManager,
    spool: Spool,
    args: argparse.Namespace,
    out: TextIO,
    print_json: Any,
) -> int:
    try:
        mgr.wait_until_ready(args.timeout)
    except StartupTimeoutError as err:
        print(f"cannot replay: {err}", file=sys.stderr)
        return EXIT_FAILED
    report = spool.replay(limit=args.limit)
    print_json(report.as_dict(), out)
    left = spool.pending()
    return EXIT_OK if left.batches == 0 or args.limit else EXIT_FAILED


def _summary(batch: SpooledBatch, *, settings: bool = False) -> dict[str, Any]:
    """A batch without its rows (and without setting values unless asked: they may be
    anything the application passed)."""
    out: dict[str, Any] = {
        "seq": batch.seq,
        "batch_id": batch.batch_id,
        "table": batch.table,
        "rows": batch.rows,
        "bytes": batch.size,
        "attempts": batch.attempts,
        "created": batch.created,
        "last_error": batch.last_error,
    }
    if settings:
        out["columns"] = list(batch.columns) if batch.columns is not None else None
        out["settings"] = sorted(batch.settings or {})
    return out
