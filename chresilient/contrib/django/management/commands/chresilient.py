"""``manage.py chresilient <wait|check|health|metrics|spool|schema> ...``: the chresilient
command with the project's settings (``CLICKHOUSE``) as its configuration; the same
subcommands, options and exit codes (docs/operations.md). Logging stays the project's."""

from __future__ import annotations

import argparse
from typing import Any, TextIO, cast

from django.core.management.base import BaseCommand, CommandError, CommandParser

from .....cli import EXIT_USAGE, main
from .....errors import ConfigError
from ...runtime import config_from_settings


class Command(BaseCommand):  # type: ignore[misc]  # Django has no types
    help = "chresilient's command (wait, check, health, metrics, spool, schema) on settings"
    # It checks ClickHouse itself, and its stdout must stay machine-readable (--json).
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", help="instead of settings.CLICKHOUSE")
        parser.add_argument("--log-level", dest="cli_log_level", default=None)
        parser.add_argument("cli_args", nargs=argparse.REMAINDER, help="e.g. health --json")

    def handle(self, *args: Any, **options: Any) -> None:
        from django.conf import settings

        argv = list(options["cli_args"])
        if options.get("url"):
            argv = ["--url", options["url"], *argv]
        if options.get("cli_log_level"):
            argv = ["--log-level", options["cli_log_level"], *argv]
        try:
            config = config_from_settings(getattr(settings, "CLICKHOUSE", None))
        except ConfigError as err:
            raise CommandError(f"configuration error: {err}", returncode=EXIT_USAGE) from None
        out = cast(TextIO, _Verbatim(self.stdout))
        code = main(argv, out=out, config=config)
        if code:
            raise CommandError(
                f"chresilient {' '.join(argv[:1])} exited with {code}", returncode=code
            )


class _Verbatim:
    """Django's OutputWrapper ends every write with a newline; JSON is written in pieces."""

    def __init__(self, out: Any) -> None:
        self._out = out

    def write(self, text: str) -> int:
        self._out.write(text, ending="")
        return len(text)

    def flush(self) -> None:
        self._out.flush()
