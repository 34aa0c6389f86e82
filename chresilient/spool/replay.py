"""Replaying the spool: the background thread that delivers stored batches.

A replay *pass* holds the target's replay lock (one replayer per spool directory and
target at a time, so N gunicorn workers do not all hammer a recovering server), then
claims batches in order per table, delivers each whole with its batch id as dedup token,
and deletes it only after ClickHouse acknowledged it. Live traffic goes first: one batch
at a time on one connection, with a short pause between batches while other calls hold
connections and a longer one while the pool is fully busy.

When a delivery fails, a probe decides whose fault it is. If ClickHouse does not answer,
or answers that it cannot take writes now (busy, read-only while ZooKeeper is away, too
many parts), the pass ends and the thread backs off until the next poll or ``wake()``;
the batch is not counted. If ClickHouse answers, the batch itself is the problem (a
*poison* batch: the server drops the connection on it, or rejects it): it counts an
attempt and waits (its table waits with it, other tables flow); after ``max_attempts``,
or at once for a deterministic rejection, it is set aside for the operator. Replay
deliveries never feed the circuit breaker, so one bad batch cannot refuse live traffic.

A batch delivered but not deleted (the disk is full) is remembered in memory (for all
replayers of the process) and never sent again by it: the pass keeps the replay lock and
retries the delete until it succeeds or the replayer stops.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog
from clickhouse_driver import errors as driver_errors

from .. import fork
from ..errors import (
    SERVER_STATE_CODES,
    CircuitOpenError,
    ClickHouseUnavailableError,
    ClientClosedError,
    ErrorKind,
    SpoolError,
    classify,
    describe_without_values,
    server_code,
)
from ..metrics import Metrics
from .codec import SpoolDecodeError
from .delivered import DELIVERED
from .records import SpooledBatch
from .store import SpoolStore

log = structlog.get_logger("chresilient.spool")

# Pause between two batches while other calls run; waits while the pool is all busy.
REPLAY_PAUSE, BUSY_WAIT, BUSY_WAITS_MAX = 0.002, 0.05, 10
# First backoff after an unavailable server; doubles up to the poll interval.
FIRST_BACKOFF = 0.5
# A failing batch waits FIRST_BACKOFF * 2**(attempts - 1), at most this long.
BATCH_BACKOFF_MAX = 60.0
# How long a manual replay retries deleting delivered batches on a full disk.
ACK_WAIT = 30.0
ACK_BACKOFF_MAX = 2.0


@dataclass
class ReplayReport:
    """What one replay pass did. ``outcome``: drained, partial (limit reached),
    unavailable, retrying (some batches wait for another attempt), busy (another replayer
    holds the lock), empty, stopped, spool_full (delivered batches could not be deleted),
    waiting (the schema is being applied again)."""

    outcome: str = "drained"
    batches: int = 0
    rows: int = 0
    set_aside: int = 0
    last_error: str | None = None
    retry_after: float | None = None
    seconds: float = 0.0
    skipped_tables: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SpoolReplayer:
    """The background service that drains the spool (see the module docstring)."""

    def __init__(
        self,
        store: SpoolStore,
        deliver: Callable[[SpooledBatch], None],
        *,
        metrics: Metrics,
        interval: float,
        lease_seconds: float,
        busy: Callable[[], bool] = lambda: False,
        in_use: Callable[[], bool] = lambda: True,
        probe: Callable[[], bool] = lambda: False,
        max_attempts: int = 10,
        ready: Callable[[], bool] = lambda: True,
        lost: Callable[[str, BaseException], bool] = lambda table, error: False,
        pause: float = REPLAY_PAUSE,
    ) -> None:
        self.store = store
        self._deliver = deliver
        self._metrics = metrics
        self.interval = interval
        self.lease_seconds = lease_seconds
        self._busy = busy
        self._in_use = in_use  # other calls hold connections right now
        self._probe = probe
        self.max_attempts = max_attempts
        self._ready = ready  # e.g. the schema is back after a recovery
        self._lost = lost  # the error says the table is gone and will come back
        self.pause = pause
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._backing_off = False
        self._spooled_since_pass = False
        self.last_error: str | None = None
        self.last_error_wall: float | None = None
        self.last_pass: ReplayReport | None = None
        self.last_delivery_wall: float | None = None
        fork.register(self)

    # -- service ------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="chresilient-spool-replayer", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float) -> None:
        """Ask the thread to stop and wait up to ``timeout`` s. A delivery in flight ends
        on its own (its lease keeps the batch safe); the thread is a daemon."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(max(timeout, 0.0))
            if thread.is_alive():
                log.warning("spool_replayer_still_running", waited=round(timeout, 3))
                return
        self.store.close()  # reopened on demand (status() after close still works)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def after_fork_in_child(self) -> None:
        """The parent's thread does not exist here; start() starts a new one."""
        self._lock = threading.Lock()
        fork.reinit_event(self._wake)
        fork.reinit_event(self._stop)
        self._thread = None

    def wake(self) -> None:
        """Replay now (the health monitor calls this when ClickHouse recovers)."""
        self._wake.set()

    def spooled(self) -> None:
        """This process just spooled a batch (see :meth:`nudge`)."""
        self._spooled_since_pass = True

    def nudge(self) -> None:
        """A live insert just succeeded: if replay was failing, or this process spooled
        since the last pass, the server is back and the spool should drain now."""
        if self._backing_off or self._spooled_since_pass:
            self._wake.set()

    def _run(self) -> None:
        delay = 0.0  # drain what an earlier run of the process left behind, at once
        backoff = FIRST_BACKOFF
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._spooled_since_pass = False
            try:
                report = self._replay(None, self._stop)
            except Exception as exc:  # e.g. the spool's disk failed; try again later
                report = ReplayReport(outcome="error", last_error=describe_without_values(exc))
                if report.last_error != self.last_error:  # once per problem, not per pass
                    log.error("spool_replay_error", error=report.last_error)
                self.last_error, self.last_error_wall = report.last_error, time.time()
            if report.outcome in ("unavailable", "error", "retrying", "spool_full", "waiting"):
                self._backing_off = True
                wait = max(backoff, report.retry_after or 0.0)
                delay = min(wait, self.interval)
                backoff = min(backoff * 2, self.interval)
            else:
                self._backing_off = False
                backoff = FIRST_BACKOFF
                delay = self.interval

    # -- one pass ---------------------------------------------------------------------------
    def replay(self, limit: int | None = None) -> ReplayReport:
        """Deliver up to ``limit`` batches now, in order per table; returns a report."""
        return self._replay(limit, None)

    def _replay(self, limit: int | None, stop: threading.Event | None) -> ReplayReport:
        started = time.monotonic()
        report = ReplayReport()
        if self.store.totals().batches == 0:
            report.outcome = "empty"
            return report
        if not self._ready():
            report.outcome = "waiting"
            return report
        with contextlib.ExitStack() as stack:
            try:
                held = stack.enter_context(self.store.replay_lock())
            except OSError as err:
                raise self.store.db.error(err, "replay lock") from err
            if held is False:
                report.outcome = "busy"
                return report
            if self._flush_acks(stop):
                self._pass(report, limit, stop, steal=held is True)
            else:
                report.outcome = "spool_full"
        report.seconds = round(time.monotonic() - started, 3)
        self.last_pass = report
        if report.batches or report.set_aside:
            log.info(
                "spool_replayed",
                outcome=report.outcome,
                batches=report.batches,
                rows=report.rows,
                set_aside=report.set_aside,
                seconds=report.seconds,
            )
        if report.outcome == "drained":
            self.store.compact()
        return report

    def _pass(
        self,
        report: ReplayReport,
        limit: int | None,
        stop: threading.Event | None,
        *,
        steal: bool,
    ) -> None:
        skip: list[str] = report.skipped_tables
        while limit is None or report.batches + report.set_aside < limit:
            if stop is not None and stop.is_set():
                report.outcome = "stopped"
                return
            batch = self.store.claim(
                lease_seconds=self.lease_seconds, skip_tables=skip, steal=steal
            )
            if batch is None:
                if skip or self.store.totals().batches:  # some must be tried again later
                    report.outcome = "retrying"
                return
            if not self._replay_one(batch, report, stop):
                return
            self._breathe()
        report.outcome = "partial"

    def _replay_one(
        self, batch: SpooledBatch, report: ReplayReport, stop: threading.Event | None
    ) -> bool:
        """Deliver one claimed batch; False when the pass should end."""
        try:
            self._deliver(batch)
        except ClientClosedError:
            self.store.release(batch, None)
            report.outcome = "stopped"
            return False
        except ClickHouseUnavailableError as err:
            self._failed(report, batch, err)
            if _not_the_batch(err) or not self._probe():
                self.store.release(batch, report.last_error, outage=True)  # not the batch
                report.outcome = "unavailable"
                if isinstance(err, CircuitOpenError):
                    report.retry_after = err.retry_after
                return False
            return self._batch_failed(batch, report)  # ClickHouse is up: it is the batch
        except Exception as err:
            self._failed(report, batch, err)
            kind = classify(err)
            if kind is ErrorKind.AUTH:  # the credentials are wrong, not the batch
                self.store.release(batch, report.last_error)
                report.outcome = "unavailable"
                return False
            if self._lost(batch.table, err):  # the schema is being applied again
                self.store.release(batch, report.last_error)
                report.outcome = "waiting"
                return False
            if isinstance(err, SpoolDecodeError) and err.newer:
                # Written by a newer release (a rolling deploy): leave it for that one.
                self.store.release(batch, report.last_error)
                report.skipped_tables.append(batch.table)
                return True
            # The server (or the driver) rejected the rows themselves: retrying cannot
            # help, and the table's queue must not block forever. Kept for inspection.
            self._set_aside(batch, report)
            return True
        report.batches += 1
        report.rows += batch.rows
        self.last_delivery_wall = time.time()
        self._metrics.incr("spool_batches_replayed")
        self._metrics.incr("spool_rows_replayed", batch.rows)
        try:
            if not self.store.ack(batch):
                log.warning("spool_lease_lost", table=batch.table, batch_id=batch.batch_id)
            return True
        except SpoolError as err:
            DELIVERED.add(self.store.path, batch)
            log.error(
                "spool_ack_failed",
                batch_id=batch.batch_id,
                error=str(err),
                hint="the batch is in ClickHouse; this process does not send it again and "
                "deletes it once the spool can be written",
            )
        if not self._flush_acks(stop):
            report.outcome = "spool_full"
            return False
        return True

    def _batch_failed(self, batch: SpooledBatch, report: ReplayReport) -> bool:
        """Count an attempt of a batch ClickHouse answered for; set it aside when spent."""
        attempts = batch.attempts + 1
        if attempts >= self.max_attempts:
            report.last_error = f"{attempts} attempts, last: {report.last_error}"
            self._set_aside(batch, report)
        else:
            wait = min(FIRST_BACKOFF * 2 ** (attempts - 1), BATCH_BACKOFF_MAX)
            self.store.retry_later(batch, report.last_error or "", wait)
            report.skipped_tables.append(batch.table)
        return True

    def _set_aside(self, batch: SpooledBatch, report: ReplayReport) -> None:
        self.store.set_aside(batch, report.last_error or "")
        report.set_aside += 1
        self._metrics.incr("spool_batches_set_aside")
        self._metrics.incr("spool_rows_set_aside", batch.rows)
        log.error(
            "spool_batch_set_aside",
            table=batch.table,
            batch_id=batch.batch_id,
            seq=batch.seq,
            rows=batch.rows,
            attempts=batch.attempts + 1,
            error=report.last_error,
            hint="inspect with `chresilient spool list`; retry, export or discard it",
        )

    def _flush_acks(self, stop: threading.Event | None) -> bool:
        """Delete the delivered batches; on a full disk keep retrying (holding the replay
        lock, so no other replayer takes them over) until it works or the replayer stops.
        A manual replay waits at most :data:`ACK_WAIT` s, then raises."""
        waited, wait = 0.0, FIRST_BACKOFF / 2
        path = self.store.path
        while waiting := DELIVERED.waiting(path):
            try:
                for batch in waiting:
                    self.store.forget(batch)
                    DELIVERED.done(path, batch)
                log.info("spool_ack_written", batches=len(waiting))
                continue
            except SpoolError:
                self.store.compact()  # a checkpoint may give the delete its room
                if stop is None and waited >= ACK_WAIT:
                    raise
            if stop is None:
                time.sleep(wait)
            elif stop.wait(wait):
                return False
            waited += wait
            wait = min(wait * 2, ACK_BACKOFF_MAX)
        return True

    def _failed(self, report: ReplayReport, batch: SpooledBatch, err: BaseException) -> None:
        report.last_error = describe_without_values(err)
        self.last_error = report.last_error
        self.last_error_wall = time.time()
        log.info(
            "spool_replay_failed",
            table=batch.table,
            batch_id=batch.batch_id,
            attempts=batch.attempts + 1,
            error=report.last_error,
        )

    def _breathe(self) -> None:
        """Room for live traffic: a pause while other calls hold connections, more if busy."""
        if self._in_use():
            self._stop.wait(self.pause)
        for _ in range(BUSY_WAITS_MAX):
            if not self._busy() or self._stop.wait(BUSY_WAIT):
                return


def _not_the_batch(err: ClickHouseUnavailableError) -> bool:
    """Failures that say nothing against the rows: the breaker is open, the server said it
    cannot take writes now (busy, read-only without ZooKeeper, too many parts), or it did
    not answer in time (a frozen server or ZooKeeper: a poison batch breaks the connection
    or is refused, it does not make the server silent)."""
    cause = err.last_error
    if isinstance(err, CircuitOpenError):
        return True
    if cause is not None and server_code(cause) in SERVER_STATE_CODES:
        return True
    while isinstance(cause, ClickHouseUnavailableError) and cause.last_error is not None:
        cause = cause.last_error  # e.g. ConnectFailedError around a socket timeout
    return isinstance(cause, (TimeoutError, socket.timeout, driver_errors.SocketTimeoutError))
