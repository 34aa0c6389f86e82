"""Keeping the schema there: applied again after ClickHouse recovers, before the spool
replays into it.

A server restarted from an empty volume has lost its tables (and the record of them).
The keeper marks the schema *stale* when the connection state recovers, or when a call
finds a table of the schema missing; its thread then applies the schema again (a no-op
when nothing was lost) and wakes the replayer, which does not replay while it is stale.
"""

from __future__ import annotations

import threading
from typing import Callable

import structlog
from clickhouse_driver import errors as driver_errors

from .. import fork
from ..errors import server_code
from .apply import Schema

log = structlog.get_logger("chresilient.schema")

# UNKNOWN_TABLE, UNKNOWN_DATABASE: a table of the schema is gone (check it again).
GONE_CODES = frozenset({60, 81})
# NO_SUCH_COLUMN_IN_TABLE, UNKNOWN_IDENTIFIER: while the schema is being applied again,
# a table may be back without the columns later files add.
INCOMPLETE_CODES = frozenset({16, 47})
# Waits between attempts while the schema cannot be applied.
FIRST_WAIT, MAX_WAIT = 0.5, 10.0


class SchemaKeeper:
    """The background service of ``mgr.schema`` (see the module docstring)."""

    def __init__(self, schema: Schema, then: Callable[[], None] = lambda: None) -> None:
        self.schema = schema
        self.then = then  # called once the schema is current again (wakes the replayer)
        self._stale = schema.configured  # until the first apply succeeds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        fork.register(self)

    def ready(self) -> bool:
        """The schema was applied or checked since the last recovery."""
        return not self._stale

    def stale(self, **_: object) -> None:
        """Check the schema again soon (an event listener: keyword arguments ignored)."""
        if self.schema.configured:
            self._stale = True
            self._wake.set()

    def lost(self, table: str, error: BaseException) -> bool:
        """``error`` says a table of the schema is gone (mark stale), or is being made
        again: True, the caller keeps the rows for later. False for any other error, and
        for a table the schema does not make."""
        if not isinstance(error, driver_errors.ServerException) or not self.schema.owns(table):
            return False
        code = server_code(error)
        if code in GONE_CODES:
            log.warning("schema_table_missing", table=table)
            self.stale()
            return True
        return code in INCOMPLETE_CODES and self._stale

    def apply_now(self, timeout: float | None = None) -> None:
        """Apply in this thread (``mgr.start()``); raises like :meth:`Schema.apply`."""
        if self.schema.configured:
            self.schema.apply(timeout)
            self._current()

    def _current(self) -> None:
        self._stale = False
        self.last_error = None
        self.then()

    # -- BackgroundService --------------------------------------------------------------
    def start(self) -> None:
        if not self.schema.configured or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="chresilient-schema", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(timeout, 0.0))

    def after_fork_in_child(self) -> None:
        fork.reinit_event(self._wake)
        fork.reinit_event(self._stop)
        self._thread = None

    def _run(self) -> None:
        wait = FIRST_WAIT
        while not self._stop.is_set():
            if not self._stale:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self.schema.apply()
            except Exception as exc:  # logged, tried again; start() raised it already
                message = str(exc)
                if message != self.last_error:
                    log.error("schema_not_applied", error=message)
                self.last_error = message
                self._stop.wait(wait)
                wait = min(wait * 2, MAX_WAIT)
                continue
            wait = FIRST_WAIT
            self._current()
