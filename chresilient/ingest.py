"""``insert`` and ``insert_batches``: deliver now, or spool what ClickHouse cannot take.

A batch gets a stable id before its first attempt; the same id is its
``insert_deduplication_token`` live and on replay, so on servers that have the setting
(22.x+, on tables that deduplicate) an insert whose outcome was unknown is not stored
twice. Only "ClickHouse is unavailable" sends a batch to the spool (transport errors,
retries or budget spent, breaker open); an error about the rows themselves (unknown
table, type mismatch) is raised, so bad data never loops in the spool.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Callable

import structlog
from clickhouse_driver import errors as driver_errors

from . import tracing
from .delivery import DeliveryGuarantees
from .errors import (
    ChResilientError,
    ClickHouseUnavailableError,
    InsertSourceError,
    InvalidBatchError,
    SpoolError,
    describe,
    describe_without_values,
)
from .metrics import Metrics
from .spool import Spool
from .statement import (
    DEDUP_SETTING,
    TableName,
    insert_query,
    quote_table,
)

# ``execute(query, rows, settings=...)``: the manager's call path, retry and breaker included.
Execute = Callable[..., Any]

log = structlog.get_logger("chresilient.spool")

DEFAULT_BATCH_SIZE = 10_000
# insert_batches() without a progress bar logs one line per this many batches.
LOG_EVERY_BATCHES = 100


@dataclass(frozen=True)
class InsertResult:
    """The outcome of ``insert``: delivered to ClickHouse now, or spooled for later.

    ``error`` says why a spooled batch was not delivered (never any row contents).
    ``delivery``: what the table can promise (``exactly_once`` for a replicated table,
    ``at_least_once``, ...; ``unknown`` until an insert into it succeeded, see
    :mod:`chresilient.delivery`).
    """

    rows: int
    delivered: bool
    spooled: bool
    batch_id: str
    error: str | None = None
    delivery: str = "unknown"


@dataclass
class InsertTotals:
    """The outcome of ``insert_batches``."""

    rows: int = 0
    rows_delivered: int = 0
    rows_spooled: int = 0
    batches: int = 0
    batches_delivered: int = 0
    batches_spooled: int = 0
    seconds: float = 0.0

    def add(self, result: InsertResult) -> None:
        self.rows += result.rows
        self.batches += 1
        if result.spooled:
            self.rows_spooled += result.rows
            self.batches_spooled += 1
        else:
            self.rows_delivered += result.rows
            self.batches_delivered += 1


# -- rows ----------------------------------------------------------------------------------
def shape_rows(
    rows: Iterable[Any], column_names: Sequence[str] | None, *, offset: int = 0
) -> tuple[list[Any], tuple[str, ...] | None]:
    """Check every row has one value per column; dict rows become tuples.

    Raises :class:`InvalidBatchError` naming the first bad row (by index, not content).
    """
    batch = rows if isinstance(rows, list) else list(rows)
    names = None if column_names is None else tuple(column_names)
    if names is not None and (
        isinstance(column_names, str) or not all(isinstance(n, str) and n for n in names)
    ):
        raise InvalidBatchError(f"column_names must be a sequence of names, got {column_names!r}")
    if not batch:
        return batch, names
    if isinstance(batch[0], Mapping):
        return _dict_rows(batch, names, offset)
    width = len(names) if names is not None else _width(batch[0], offset)
    plain = (tuple, list)  # the common rows: checked without an ABC lookup per row
    if all(type(row) in plain and len(row) == width for row in batch):
        return batch, names
    for i, row in enumerate(batch):
        if isinstance(row, (str, bytes, Mapping)) or _width(row, offset + i) != width:
            raise InvalidBatchError(_shape_message(row, offset + i, width, names))
    return batch, names


def _width(row: Any, index: int) -> int:
    try:
        return len(row)
    except TypeError:
        raise InvalidBatchError(
            f"row {index} is a {type(row).__name__}, not a sequence of values"
        ) from None


def _shape_message(row: Any, index: int, width: int, names: tuple[str, ...] | None) -> str:
    got = f"a {type(row).__name__}" if isinstance(row, (str, bytes, Mapping)) else len(row)
    where = f"{width} columns ({', '.join(names)})" if names else f"{width} values like row 0"
    return f"row {index} has {got} values, expected {where}; nothing was inserted or spooled"


def _dict_rows(
    batch: list[Any], names: tuple[str, ...] | None, offset: int
) -> tuple[list[Any], tuple[str, ...]]:
    keys = names if names is not None else tuple(batch[0])
    out = []
    for i, row in enumerate(batch):
        if not isinstance(row, Mapping) or len(row) != len(keys):
            raise InvalidBatchError(_shape_message(row, offset + i, len(keys), keys))
        try:
            out.append(tuple(row[k] for k in keys))
        except KeyError as err:
            raise InvalidBatchError(
                f"row {offset + i} has no column {err.args[0]!r}; nothing was inserted or spooled"
            ) from None
    return out, keys


# -- delivery -------------------------------------------------------------------------------
def deliver(
    execute: Execute,
    metrics: Metrics,
    table_sql: str,
    columns: Sequence[str] | None,
    rows: Sequence[Any],
    settings: Mapping[str, Any] | None,
    batch_id: str,
) -> None:
    """One INSERT through the call path, with the batch id as dedup token.

    The call path drops the token on servers without it (delivery is then at least once).
    """
    sets = dict(settings or {})
    sets[DEDUP_SETTING] = batch_id
    execute(insert_query(table_sql, columns), rows, settings=sets)
    metrics.incr("inserts_total")
    metrics.incr("rows_inserted", len(rows))


class Inserter:
    """``mgr.insert`` and ``mgr.insert_batches``: deliver through ``execute`` or spool."""

    def __init__(
        self,
        execute: Execute,
        metrics: Metrics,
        spool: Spool | None,
        lost: Callable[[str, BaseException], bool] = lambda table, error: False,
        guarantees: DeliveryGuarantees | None = None,
    ) -> None:
        self._execute = execute
        self._metrics = metrics
        self.spool = spool
        self.guarantees = guarantees
        self._lost = lost  # the error says the table is gone and will come back (schema)
        self._warned_not_running = False

    def insert(
        self,
        table: TableName,
        rows: Iterable[Any],
        column_names: Sequence[str] | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
        _offset: int = 0,
    ) -> InsertResult:
        table_sql = quote_table(table)
        # Rows first: a generator may make calls of its own, which are not the insert's.
        batch, names = shape_rows(rows, column_names, offset=_offset)
        with tracing.call(f"INSERT INTO {table_sql}", None):
            return self._insert(table_sql, batch, names, settings)

    def _insert(
        self,
        table_sql: str,
        batch: list[Any],
        names: tuple[str, ...] | None,
        settings: Mapping[str, Any] | None,
    ) -> InsertResult:
        batch_id = str((settings or {}).get(DEDUP_SETTING) or uuid.uuid4().hex)
        if not batch:
            return InsertResult(rows=0, delivered=True, spooled=False, batch_id=batch_id)
        try:
            deliver(self._execute, self._metrics, table_sql, names, batch, settings, batch_id)
        except ClickHouseUnavailableError as err:
            if self.spool is None:
                raise
            return self._to_spool(table_sql, names, batch, settings, batch_id, err)
        except driver_errors.ServerException as err:
            if self.spool is None or not self._lost(table_sql, err):
                raise
            return self._to_spool(table_sql, names, batch, settings, batch_id, err)
        if self.spool is not None:
            self.spool.replayer.nudge()
        delivery = "unknown" if self.guarantees is None else self.guarantees.learn(table_sql)
        return InsertResult(
            rows=len(batch), delivered=True, spooled=False, batch_id=batch_id, delivery=delivery
        )

    def _to_spool(
        self,
        table_sql: str,
        names: tuple[str, ...] | None,
        batch: list[Any],
        settings: Mapping[str, Any] | None,
        batch_id: str,
        err: Exception,
    ) -> InsertResult:
        assert self.spool is not None
        sets = {k: v for k, v in (settings or {}).items() if k != DEDUP_SETTING}
        cause = err.last_error if isinstance(err, ClickHouseUnavailableError) else None
        reason = describe_without_values(cause if cause is not None else err)
        try:
            put = self.spool.store.put(
                table_sql,
                names,
                batch,
                batch_id=batch_id,
                settings=sets or None,
                on_full=self.spool.wake,
            )
        except Exception as spool_err:
            log.error(
                "insert_not_spooled",
                table=table_sql,
                rows=len(batch),
                batch_id=batch_id,
                error=describe(spool_err),
                clickhouse_error=reason,
            )
            if isinstance(spool_err, SpoolError) and spool_err.clickhouse_error is None:
                spool_err.clickhouse_error = err
            if isinstance(spool_err, ChResilientError):
                raise spool_err from err
            # e.g. sqlite3.OperationalError ("database is locked", I/O error): callers
            # catch the driver's Error hierarchy, so name the problem in it.
            raise SpoolError(
                f"ClickHouse unavailable ({reason}) and the spool at "
                f"{self.spool.directory} could not store the batch: {describe(spool_err)}",
                clickhouse_error=err,
            ) from spool_err
        self.spool.replayer.spooled()
        tracing.spooled()
        if not self.spool.replayer.running and not self._warned_not_running:
            self._warned_not_running = True
            log.warning(
                "spool_replayer_not_running",
                hint="spooled batches are replayed once mgr.start() runs, or by spool.replay()",
            )
        metrics = self._metrics
        metrics.incr("spool_batches_written")
        metrics.incr("spool_rows_written", len(batch))
        if put.dropped_batches:
            metrics.incr("spool_dropped_batches", put.dropped_batches)
            metrics.incr("spool_dropped_rows", put.dropped_rows)
        log.warning(
            "insert_spooled",
            table=table_sql,
            rows=len(batch),
            batch_id=batch_id,
            bytes=put.bytes,
            error=reason,
        )
        return InsertResult(
            rows=len(batch),
            delivered=False,
            spooled=True,
            batch_id=batch_id,
            error=reason,
            delivery="unknown" if self.guarantees is None else self.guarantees.known(table_sql),
        )

    def insert_batches(
        self,
        table: TableName,
        rows_iterable: Iterable[Any],
        batch_size: int = DEFAULT_BATCH_SIZE,
        column_names: Sequence[str] | None = None,
        progress: bool | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
        token_prefix: str | None = None,
        log_every: int = LOG_EVERY_BATCHES,
    ) -> InsertTotals:
        """Stream ``rows_iterable`` in batches of ``batch_size``; memory stays bounded.

        ``progress=True`` shows a tqdm bar; ``None`` logs a line every ``log_every``
        batches; ``False`` is silent. ``token_prefix`` makes batch ids (dedup tokens)
        ``<prefix>-<n>``, so re-running the same job does not duplicate on servers that
        deduplicate.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if settings and DEDUP_SETTING in settings:
            raise ValueError(
                f"{DEDUP_SETTING} would be the same for every batch; use token_prefix instead"
            )
        totals = InsertTotals()
        started = time.monotonic()
        bar = _progress_bar(rows_iterable) if progress else None
        names = None if column_names is None else tuple(column_names)
        source = iter(rows_iterable)
        try:
            while True:
                chunk, source_error = _take(source, batch_size)
                if not chunk:
                    if source_error is not None:
                        raise _source_failed(totals, source_error) from source_error
                    break
                if names is None and isinstance(chunk[0], Mapping):
                    names = tuple(chunk[0])  # every later batch uses the same columns
                sets = dict(settings or {})
                if token_prefix is not None:
                    sets[DEDUP_SETTING] = f"{token_prefix}-{totals.batches}"
                try:
                    result = self.insert(table, chunk, names, settings=sets, _offset=totals.rows)
                except InvalidBatchError as err:
                    raise InvalidBatchError(
                        f"batch {totals.batches}: {err} (earlier batches: "
                        f"{totals.rows_delivered} rows delivered, {totals.rows_spooled} spooled)"
                    ) from None
                totals.add(result)
                del chunk
                if source_error is not None:  # the rows taken before it are handled
                    raise _source_failed(totals, source_error) from source_error
                if bar is not None:
                    bar.update(result.rows)
                    if totals.rows_spooled:
                        bar.set_postfix(spooled=totals.rows_spooled, refresh=False)
                elif progress is None and totals.batches % max(log_every, 1) == 0:
                    log.info("insert_batches_progress", table=str(table), **_summary(totals))
        finally:
            if bar is not None:
                bar.close()
        totals.seconds = round(time.monotonic() - started, 3)
        if progress is not False:
            log.info("insert_batches_done", table=str(table), **_summary(totals))
        return totals


def _take(source: Iterator[Any], size: int) -> tuple[list[Any], Exception | None]:
    """Up to ``size`` rows, and the error the source raised while they were taken: the
    rows before the error are kept, so a failing source never loses what it gave."""
    rows: list[Any] = []
    try:
        rows.extend(itertools.islice(source, size))
    except Exception as exc:
        return rows, exc
    return rows, None


def _source_failed(totals: InsertTotals, error: Exception) -> InsertSourceError:
    log.warning("insert_batches_source_failed", next_row=totals.rows, **_summary(totals))
    return InsertSourceError(
        f"the rows source raised {type(error).__name__} after {totals.rows} rows "
        f"({totals.rows_delivered} delivered, {totals.rows_spooled} spooled); none were "
        f"dropped: resume from row {totals.rows}",
        totals=totals,
        next_row=totals.rows,
    )


def _summary(totals: InsertTotals) -> dict[str, Any]:
    return {
        "batches": totals.batches,
        "rows": totals.rows,
        "rows_spooled": totals.rows_spooled,
    }


def _progress_bar(rows: Iterable[Any]) -> Any:
    from tqdm import tqdm  # imported lazily: only ETL jobs asking for a bar pay for it

    total = len(rows) if isinstance(rows, Sized) else None
    return tqdm(total=total, unit="rows", unit_scale=True, desc="insert", leave=True)
