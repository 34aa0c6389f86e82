"""Applying the schema: each file once, recorded on the server, checked again on recovery.

``apply()`` runs after the startup gate: under a file lock (so the workers of one
machine starting together apply each file once; the others wait, then find it applied)
it reads ``_chresilient_schema``, refuses a file whose checksum changed since it was
applied, skips the applied ones and runs the rest statement by statement. A refused
statement (syntax, types) raises :class:`SchemaError` at once, naming file and line;
ClickHouse being unavailable is retried until ``schema_timeout``. An applied file whose
tables are gone (a server restarted from an empty volume, a table dropped by hand) is
applied again. After each file the
columns of the tables it touched are recorded: they are what the analytics consistency
check expects, so drift (a column dropped by hand) shows without a hand-written list.

Statements should be idempotent (``IF NOT EXISTS``): servers on other machines may apply
a file at the same moment, and a process may die between a statement and the record. A
statement refused because what it makes exists already (a duplicate column or table, e.g.
``ALTER ... ADD COLUMN`` on servers without ``IF NOT EXISTS`` there) counts as applied.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ..config import Config
from ..config_values import AnalyticsTable
from ..errors import (
    ClickHouseUnavailableError,
    ErrorKind,
    SchemaError,
    StartupTimeoutError,
    classify,
    describe,
    server_code,
)
from ..executor import Executor
from ..retry import Deadline
from ..statement import Statement, quote_identifier
from .source import SchemaFile, SchemaStatement, load_schema, table_key

log = structlog.get_logger("chresilient.schema")

RECORD_TABLE = "_chresilient_schema"
RECORD_COLUMNS = "file, checksum, applied_at, applied_by, columns"
# Idempotent DDL may be sent again whatever happened to the first attempt.
DDL = Statement(is_write=True, deduplicated=True, what="schema statement")
# Between two attempts while ClickHouse is unavailable, and between two looks at the lock.
STEP = 0.25
# DUPLICATE_COLUMN, TABLE_ALREADY_EXISTS, DATABASE_ALREADY_EXISTS: what the statement
# would make is there already. 18.16 answers an ADD COLUMN of an existing column with
# ILLEGAL_COLUMN (44) "... column with this name already exists"; 44 means other things too,
# so for it the message decides.
ALREADY_THERE = frozenset({15, 57, 82})
ILLEGAL_COLUMN = 44


def already_there(err: BaseException) -> bool:
    code = server_code(err)
    if code == ILLEGAL_COLUMN:
        return "already exists" in str(getattr(err, "message", ""))
    return code in ALREADY_THERE


@dataclass(frozen=True)
class Applied:
    """What ``_chresilient_schema`` says about one file."""

    checksum: str
    applied_at: Any
    applied_by: str
    columns: list[Any]  # [[database, table, [[name, type], ...]], ...] after the file


class Schema:
    """The schema of one manager: ``mgr.schema`` (see the module docstring)."""

    def __init__(self, cfg: Config, executor: Executor) -> None:
        self._cfg = cfg
        self._executor = executor
        self.files: list[SchemaFile] = load_schema(cfg.schema_dir, cfg.schema_statements)
        # Rendered now, so a statement that is not DDL or a {cluster} without a cluster is
        # a ConfigError when the manager is built.
        self._statements = {f.name: f.statements(cfg.database, cfg.cluster) for f in self.files}
        self._tables = {f.name: f.tables(cfg.database, cfg.cluster) for f in self.files}
        self._owned = frozenset(t for tables in self._tables.values() for t in tables)
        self.record = f"{quote_identifier(cfg.database)}.{quote_identifier(RECORD_TABLE)}"
        key = "|".join(f"{h}:{p}" for h, p in cfg.hosts) + f"/{cfg.database}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        self._lock_path = os.path.join(tempfile.gettempdir(), f"chresilient-schema-{digest}.lock")
        self.expected: tuple[AnalyticsTable, ...] = ()
        self.last_report: dict[str, Any] | None = None

    @property
    def configured(self) -> bool:
        return bool(self.files)

    def owns(self, table: str) -> bool:
        """Whether the schema creates or alters ``table`` (as an INSERT names it)."""
        return table_key(table, self._cfg.database) in self._owned

    # -- applying -----------------------------------------------------------------------
    def apply(self, timeout: float | None = None) -> dict[str, Any]:
        """Apply every file not applied yet, within ``timeout`` (``schema_timeout``).

        Raises :class:`SchemaError` (a statement refused, an applied file changed) or
        :class:`StartupTimeoutError` (ClickHouse unavailable, or another process holding
        the lock, past the timeout).
        """
        seconds = self._cfg.schema_timeout if timeout is None else timeout
        deadline = Deadline(seconds)
        started = time.monotonic()
        applied: list[str] = []
        restored: list[str] = []
        recreated: set[tuple[str, str]] = set()  # later files that touch them run again
        with self._locked(deadline, seconds):
            records = self._records(deadline)
            present = self._present(deadline)
            wanted = {(t.database or "", t.name) for t in expected_tables(self.files, records)}
            for schema_file in self.files:
                done = records.get(schema_file.name)
                tables = self._tables[schema_file.name]
                if done is not None:
                    self._unchanged(schema_file, done)
                    gone = [
                        t for t in tables if (t in wanted and t not in present) or t in recreated
                    ]
                    if not gone:
                        continue
                    log.warning(
                        "schema_tables_missing",
                        file=schema_file.name,
                        tables=[".".join(t) for t in gone],
                    )
                    restored.append(schema_file.name)  # applied again, recorded already
                    recreated.update(tables)
                for statement in self._statements[schema_file.name]:
                    self._run(deadline, statement.sql, statement)
                if done is None:
                    records[schema_file.name] = self._record_applied(deadline, schema_file)
                    applied.append(schema_file.name)
                log.info("schema_file_applied", file=schema_file.name)
        self.expected = expected_tables(self.files, records)
        report = {
            "applied": applied,
            "restored": restored,
            "skipped": [f.name for f in self.files if f.name not in applied + restored],
            "seconds": round(time.monotonic() - started, 3),
        }
        self.last_report = report
        if applied or restored:
            log.info("schema_applied", **report)
        return report

    def status(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Each file: ``applied``, ``pending`` or ``changed`` (applied, edited since)."""
        deadline = Deadline(self._cfg.schema_timeout if timeout is None else timeout)
        records = self._records(deadline)
        out = []
        for schema_file in self.files:
            done = records.get(schema_file.name)
            state = "pending"
            if done is not None:
                state = "applied" if done.checksum == schema_file.checksum else "changed"
            out.append(
                {
                    "file": schema_file.name,
                    "checksum": schema_file.checksum,
                    "state": state,
                    "applied_at": None if done is None else str(done.applied_at),
                    "applied_by": None if done is None else done.applied_by,
                }
            )
        return out

    def diff(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Per table the schema made: columns missing, of another type, or not in it."""
        deadline = Deadline(self._cfg.schema_timeout if timeout is None else timeout)
        expected = expected_tables(self.files, self._records(deadline))
        out = []
        for table in expected:
            actual = dict(self._columns(deadline, table.database or "", table.name))
            want = dict(table.columns)
            out.append(
                {
                    "table": f"{table.database}.{table.name}",
                    "exists": bool(actual),
                    "missing": sorted(set(want) - set(actual)),
                    "extra": sorted(set(actual) - set(want)),
                    "changed": sorted(
                        f"{c}: {want[c]} -> {actual[c]}"
                        for c in set(want) & set(actual)
                        if want[c] != actual[c]
                    ),
                }
            )
        return out

    # -- steps ----------------------------------------------------------------------------
    def _unchanged(self, schema_file: SchemaFile, done: Applied) -> None:
        if done.checksum != schema_file.checksum:
            raise SchemaError(
                f"schema file {schema_file.name} changed after it was applied "
                f"(at {done.applied_at} by {done.applied_by}); applied files are never "
                "applied again: put the change in a new file",
                file=schema_file.name,
            )

    def _records(self, deadline: Deadline) -> dict[str, Applied]:
        ddl = (
            f"CREATE TABLE IF NOT EXISTS {self.record} (file String, checksum String, "
            "applied_at DateTime, applied_by String, columns String) "
            "ENGINE = MergeTree ORDER BY (file, applied_at)"
        )
        self._run(deadline, ddl, None)
        rows = self._run(
            deadline,
            f"SELECT file, argMin(checksum, applied_at), min(applied_at), "
            f"argMin(applied_by, applied_at), argMax(columns, applied_at) "
            f"FROM {self.record} GROUP BY file",
            None,
        )
        return {
            file: Applied(checksum, at, by, json.loads(columns or "[]"))
            for file, checksum, at, by, columns in rows
        }

    def _present(self, deadline: Deadline) -> set[tuple[str, str]]:
        """Which of the schema's tables exist now."""
        owned = self._owned
        if not owned:
            return set()
        rows = self._run(
            deadline,
            "SELECT database, name FROM system.tables WHERE database IN %(dbs)s",
            None,
            {"dbs": tuple(sorted({d for d, _ in owned}))},
        )
        return {(str(d), str(n)) for d, n in rows} & owned

    def _record_applied(self, deadline: Deadline, schema_file: SchemaFile) -> Applied:
        tables = self._tables[schema_file.name]
        columns = [[d, t, self._columns(deadline, d, t)] for d, t in tables]
        by = f"{socket.gethostname()}:{os.getpid()}"
        row = (schema_file.name, schema_file.checksum, int(time.time()), by, json.dumps(columns))
        self._run(deadline, f"INSERT INTO {self.record} ({RECORD_COLUMNS}) VALUES", None, [row])
        return Applied(schema_file.checksum, row[2], by, columns)

    def _columns(self, deadline: Deadline, database: str, table: str) -> list[list[str]]:
        """``[[name, type], ...]`` of a table as the server has it now ([]: no table)."""
        rows = self._run(
            deadline,
            "SELECT name, type FROM system.columns WHERE database = %(db)s AND table = %(table)s",
            None,
            {"db": database, "table": table},
        )
        return [[name, kind] for name, kind in rows]

    def _run(
        self,
        deadline: Deadline,
        sql: str,
        statement: SchemaStatement | None,
        params: Any = None,
    ) -> Any:
        """One statement through the call path, retried while ClickHouse is unavailable
        and time is left; a refused schema statement is a :class:`SchemaError`."""
        while True:
            try:
                return self._executor.call(
                    lambda conn: conn.client.execute(sql, params),
                    DDL,
                    within=max(deadline.remaining(), 0.001),
                )
            except ClickHouseUnavailableError as err:
                if deadline.remaining() <= STEP:
                    where = statement.where() if statement else "the schema record"
                    raise StartupTimeoutError(
                        f"schema not applied within {deadline.seconds or 0:g}s, at "
                        f"{where}: {describe(err)}",
                        last_error=err,
                    ) from err
                time.sleep(STEP)
            except Exception as err:
                if statement is not None and already_there(err):
                    # Applied before its file was recorded (a process died in between, or
                    # an older server without IF NOT EXISTS for this statement).
                    log.info("schema_statement_already_applied", at=statement.where())
                    return []
                if statement is None or classify(err) not in (
                    ErrorKind.DETERMINISTIC,
                    ErrorKind.AUTH,
                ):
                    raise
                raise SchemaError(
                    f"schema statement refused at {statement.where()}: {describe(err)}",
                    file=statement.file,
                    line=statement.line,
                    last_error=err,
                ) from err

    @contextlib.contextmanager
    def _locked(self, deadline: Deadline, seconds: float) -> Iterator[None]:
        """This machine's schema lock: one process applies, the others wait for it."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        log.info("schema_waiting_for_another_process", lock=self._lock_path)
                        waited = True
                    if deadline.remaining() <= 0:
                        raise StartupTimeoutError(
                            f"schema not applied within {seconds:.0f}s: another process "
                            f"holds {self._lock_path}"
                        ) from None
                    time.sleep(min(STEP, max(deadline.remaining(), 0.0)))
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def expected_tables(
    files: Sequence[SchemaFile], records: dict[str, Applied]
) -> tuple[AnalyticsTable, ...]:
    """The tables the applied files leave, with the columns recorded after the last file
    that touched each (a table a later file dropped or renamed away is not expected)."""
    latest: dict[tuple[str, str], list[list[str]]] = {}
    for schema_file in files:
        done = records.get(schema_file.name)
        for database, table, columns in done.columns if done is not None else ():
            if columns:
                latest[(database, table)] = columns
            else:
                latest.pop((database, table), None)
    return tuple(
        AnalyticsTable(table, tuple((c, t) for c, t in columns), database=database)
        for (database, table), columns in latest.items()
    )
