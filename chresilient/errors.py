"""Exception types and the error classification that drives retry and the breaker.

Every chresilient exception subclasses ``clickhouse_driver.errors.Error`` so that code
written against the bare driver (``except clickhouse_driver.errors.Error``) keeps working.
"""

from __future__ import annotations

import enum
import socket
import ssl
from typing import Any

from clickhouse_driver import errors as driver_errors


class ChResilientError(driver_errors.Error):  # type: ignore[misc]
    """Base of chresilient's own errors; ``str()`` is the plain message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other constructor arguments than their args: rebuild from the
        # state, so the errors cross process boundaries (multiprocessing, pickle). A class
        # made by with_driver_class is rebuilt from its two importable bases.
        mixed_from = type(self).__dict__.get("mixed_from")
        if mixed_from is not None:
            return (_rebuild_mixed, (*mixed_from, self.args, dict(self.__dict__)))
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild_mixed(
    cls: type[Any], driver_class: type[Any], args: tuple[Any, ...], state: dict[str, Any]
) -> Any:
    return _rebuild(with_driver_class(cls, driver_class), args, state)


def _rebuild(cls: type[ChResilientError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = Exception.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConfigError(ChResilientError, ValueError):
    """A configuration value is invalid; ``field`` names the setting or variable."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"invalid configuration {field}: {problem}")


class ClickHouseUnavailableError(ChResilientError):
    """ClickHouse could not serve the call: retries exhausted, budget spent, or breaker open.

    ``last_error`` holds the last underlying error (if any), ``attempts`` how many
    attempts were made. When that error is one of the driver's transport errors
    (``NetworkError``, ``SocketTimeoutError``, ...), the instance is of that class too, so
    ``except clickhouse_driver.errors.NetworkError`` written for the bare driver still
    catches it (see :func:`with_driver_class`). A server's error (``ServerException``,
    e.g. 202 after the retries) is not mixed in: code that catches those expects the
    server's answer, and gets it at once for every error that is not retried.
    """

    # Where the constructor takes ``last_error`` when it is passed by position.
    last_error_position = 1

    def __new__(cls, *args: Any, **kwargs: Any) -> ClickHouseUnavailableError:
        last = kwargs.get("last_error")
        if last is None and len(args) > cls.last_error_position:
            last = args[cls.last_error_position]
        driver_class = _driver_class(last)
        if driver_class is not None and not issubclass(cls, driver_class):
            cls = with_driver_class(cls, driver_class)
        return super().__new__(cls, *args)  # type: ignore[no-any-return]

    def __init__(
        self,
        message: str,
        last_error: BaseException | None = None,
        attempts: int = 0,
    ) -> None:
        self.last_error = last_error
        self.attempts = attempts
        if last_error is not None:
            message = f"{message} (last error: {describe(last_error)})"
        super().__init__(message)


_MIXED: dict[tuple[type, type], type] = {}


def with_driver_class(cls: type[Any], driver_class: type[Any]) -> type[Any]:
    """``cls`` that is also ``driver_class`` (one class per pair, named like ``cls``)."""
    key = (cls, driver_class)
    mixed = _MIXED.get(key)
    if mixed is None:
        namespace = {"__module__": cls.__module__, "mixed_from": key}
        mixed = type(cls.__name__, (cls, driver_class), namespace)
        mixed.__qualname__ = cls.__qualname__
        mixed = _MIXED.setdefault(key, mixed)
    return mixed


def _root(error: BaseException | None) -> BaseException | None:
    while isinstance(error, ChResilientError) and getattr(error, "last_error", None) is not None:
        error = error.last_error
    return error


def _driver_class(error: BaseException | None) -> type[Any] | None:
    """The class of the driver's own transport error behind ``error``, if it is one."""
    root = _root(error)
    if isinstance(root, (driver_errors.ServerException, ChResilientError)):
        return None
    return type(root) if isinstance(root, driver_errors.Error) else None


class CircuitOpenError(ClickHouseUnavailableError):
    """The circuit breaker refused the call without touching the server."""

    last_error_position = 2

    def __init__(self, name: str, retry_after: float, last_error: BaseException | None = None):
        self.breaker_name = name
        self.retry_after = retry_after
        super().__init__(
            f"circuit breaker for {name} is open; next trial in {retry_after:.1f}s",
            last_error=last_error,
        )


class ConnectFailedError(ClickHouseUnavailableError):
    """No connection to a host could be made: nothing of the call reached the server, so
    even a write may be sent again (to another replica, or to the same one later)."""


class PoolTimeoutError(ClickHouseUnavailableError):
    """No pooled connection became free within the checkout timeout."""


class StartupTimeoutError(ClickHouseUnavailableError):
    """The startup gate gave up waiting for ClickHouse."""


class StartupError(ChResilientError):
    """The startup gate met an error that waiting cannot fix (credentials, database)."""

    def __init__(self, message: str, last_error: BaseException | None = None) -> None:
        self.last_error = last_error
        super().__init__(message)


class SchemaError(StartupError):
    """A schema statement was refused (syntax, types), or an applied schema file changed
    since; waiting cannot fix it. ``file`` and ``line`` say where (line None: the file)."""

    def __init__(
        self,
        message: str,
        *,
        file: str,
        line: int | None = None,
        last_error: BaseException | None = None,
    ) -> None:
        self.file = file
        self.line = line
        super().__init__(message, last_error)


class SpoolError(ChResilientError):
    """The local spool could not do what was asked (store, deliver, delete a batch).

    From ``insert()``: the batch was not accepted, the caller still holds the rows.
    ``cause`` names the problem (``disk full``, ``unwritable``, ``busy``, ``corrupt``,
    ``error``), ``path`` the spool file or directory, ``free_bytes`` what its file system
    had left; ``__cause__`` is the underlying error; ``clickhouse_error`` the one that
    sent the batch to the spool.
    """

    def __init__(
        self,
        message: str,
        clickhouse_error: BaseException | None = None,
        *,
        cause: str = "error",
        path: str | None = None,
        free_bytes: int | None = None,
    ) -> None:
        self.clickhouse_error = clickhouse_error
        self.cause = cause
        self.path = path
        self.free_bytes = free_bytes
        super().__init__(message)


class SpoolFullError(SpoolError):
    """The local insert spool reached its size limit; the batch was not accepted."""


class InsertSourceError(ChResilientError):
    """The iterable given to ``insert_batches`` raised; its error is ``__cause__``.

    Every row taken from it before the error was delivered or spooled (none dropped):
    ``totals`` (an ``InsertTotals``) says how, and ``next_row`` is the index of the first
    row not handled, where a re-run should resume (see docs/spool.md).
    """

    def __init__(self, message: str, totals: Any, next_row: int) -> None:
        self.totals = totals
        self.next_row = next_row
        super().__init__(message)


class InvalidBatchError(ChResilientError, ValueError):
    """Rows passed to ``insert`` do not fit their columns (wrong or ragged width).

    Raised before anything is sent or spooled, so a malformed batch never loops.
    """


class SessionStateError(ChResilientError, ValueError):
    """A statement that changes the session (``USE``, ``SET``) was refused before it was sent.

    A pooled connection serves one caller after another: session state left on it would
    reach the next caller (another database, a row limit). Pass settings per call or in
    ``Config.settings``, and the database in ``Config.database`` or in the table name.
    """


class ClientClosedError(ChResilientError):
    """The manager or client was used after ``close()``."""


class ClosedInFlightError(ClientClosedError, ClickHouseUnavailableError):
    """``close()`` interrupted this call: its socket was shut down mid-way.

    A :class:`ClientClosedError` (our own doing: the breaker does not count it) and a
    :class:`ClickHouseUnavailableError` (the server never answered), so an INSERT cut off
    this way is spooled like any other undelivered batch and a read's fallback applies.
    """


class ErrorKind(str, enum.Enum):
    """Why a call failed, which decides whether it is retried and counted."""

    TRANSPORT = "transport"  # the connection broke: refused, reset, EOF, timeout
    TRANSIENT = "transient"  # the server is overloaded or busy; it may succeed later
    DETERMINISTIC = "deterministic"  # the same call will fail the same way
    AUTH = "auth"  # credentials or access rights; never retried
    LOCAL = "local"  # our own side: pool exhausted, closed client


# ClickHouse server codes that are worth another attempt. Sources:
# clickhouse-java ServerException.discoverIsRetryable, clickhouse-kafka-connect Utils.
TRANSIENT_CODES = frozenset(
    {
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        203,  # NO_FREE_CONNECTION
        209,  # SOCKET_TIMEOUT (raised by a server towards a remote shard)
        210,  # NETWORK_ERROR (raised by a server towards a remote shard)
        216,  # QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING (its first attempt, cut off, still runs)
        225,  # NO_ZOOKEEPER (replicated tables while ZooKeeper is away)
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        244,  # UNEXPECTED_ZOOKEEPER_ERROR
        252,  # TOO_MANY_PARTS
        279,  # ALL_CONNECTION_TRIES_FAILED
        285,  # TOO_FEW_LIVE_REPLICAS
        319,  # UNKNOWN_STATUS_OF_INSERT
        425,  # SYSTEM_ERROR
        999,  # KEEPER_EXCEPTION
    }
)
def _query_limit(exc: BaseException) -> bool:
    """MEMORY_LIMIT_EXCEEDED for the query's own limit: the same query fails again."""
    return server_code(exc) == 241 and "(for query)" in str(getattr(exc, "message", ""))


# Transient codes about the server's state (busy, read-only without ZooKeeper, too many
# parts), never about the rows sent: a spooled batch failing with them is not poison.
SERVER_STATE_CODES = frozenset({202, 203, 225, 242, 244, 252, 285, 319, 999})
# Codes after which the next attempt should wait longer than the usual backoff step.
SLOW_DOWN_CODES = frozenset({252, 241})
AUTH_CODES = frozenset(
    {
        192,  # UNKNOWN_USER
        193,  # WRONG_PASSWORD
        194,  # REQUIRED_PASSWORD
        195,  # IP_ADDRESS_NOT_ALLOWED
        497,  # ACCESS_DENIED
        516,  # AUTHENTICATION_FAILED
    }
)
UNKNOWN_DATABASE = 81

_TRANSPORT_TYPES: tuple[type[BaseException], ...] = (
    driver_errors.NetworkError,
    driver_errors.SocketTimeoutError,
    driver_errors.UnexpectedPacketFromServerError,
    driver_errors.UnknownPacketFromServerError,
    EOFError,
    socket.timeout,
    ConnectionError,
    ssl.SSLError,
    OSError,
)


def classify(exc: BaseException) -> ErrorKind:
    """Sort an exception into an :class:`ErrorKind` (the design's error table)."""
    if isinstance(exc, (ClientClosedError, PoolTimeoutError, CircuitOpenError)):
        return ErrorKind.LOCAL  # before the server's codes: a refusal may carry one
    if isinstance(exc, driver_errors.ServerException):
        code = exc.code or 0
        if code in AUTH_CODES:
            return ErrorKind.AUTH
        if code in TRANSIENT_CODES and not _query_limit(exc):
            return ErrorKind.TRANSIENT
        return ErrorKind.DETERMINISTIC
    if isinstance(exc, ClickHouseUnavailableError):
        return ErrorKind.TRANSPORT
    if isinstance(exc, _TRANSPORT_TYPES):
        return ErrorKind.TRANSPORT
    return ErrorKind.DETERMINISTIC


# Transient codes the server raises before it writes anything: a write may be repeated.
# Only admission refusals: TOO_MANY_PARTS, TABLE_IS_READ_ONLY or NO_ZOOKEEPER can come
# from a materialized view's target after the source table took the rows.
REFUSED_BEFORE_WRITE_CODES = frozenset({202, 203})


UNAVAILABLE_KINDS = frozenset({ErrorKind.TRANSPORT, ErrorKind.TRANSIENT})


def counts_for_breaker(kind: ErrorKind) -> bool:
    """Only failures that say something about the server's health trip the breaker."""
    return kind in UNAVAILABLE_KINDS


# Replicated tables refusing writes while ZooKeeper is away (NO_ZOOKEEPER,
# TABLE_IS_READ_ONLY, UNEXPECTED_ZOOKEEPER_ERROR, KEEPER_EXCEPTION): retried and spooled
# like any transient error, but the server itself is fine and keeps serving reads.
COORDINATION_CODES = frozenset({225, 242, 244, 999})


def trips_breaker(exc: BaseException) -> bool:
    """Whether ``exc`` counts against its host: a failure about the server's health, not
    a refusal of one kind of call (writes without ZooKeeper)."""
    return counts_for_breaker(classify(exc)) and server_code(exc) not in COORDINATION_CODES


def server_code(exc: BaseException) -> int | None:
    """The ClickHouse error code of ``exc``, if it carries one."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def describe(exc: BaseException) -> str:
    """A one-line description of ``exc``: type, code, first line of the message."""
    code = server_code(exc)
    if isinstance(exc, ChResilientError):
        code = None  # its own message; a driver class mixed in adds no code
    elif isinstance(exc, driver_errors.ServerException):
        text = str(exc.message or "").strip().splitlines()
        first = text[0] if text else ""
        if first.startswith("DB::Exception: "):
            first = first[len("DB::Exception: ") :]
        return f"{type(exc).__name__} {code}: {first}"
    if isinstance(exc, driver_errors.Error) and code is not None:
        text = str(exc.message or "").strip().splitlines()
        return f"{type(exc).__name__} {code}: {text[0] if text else ''}".rstrip(": ")
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# Server errors whose message names tables, columns or limits, never a value of a row.
MESSAGE_WITHOUT_VALUES = frozenset({10, 16, 47, 60, 62, 81, 241, 252})
CODE_NAMES = {
    value: name for name, value in vars(driver_errors.ErrorCodes).items() if isinstance(value, int)
}


def describe_without_values(exc: BaseException) -> str:
    """:func:`describe` for an error about rows that were sent (a spooled batch): the
    server's or the driver's text may quote a value it could not take, so only errors
    about the connection, the server's load or names keep their message; the others say
    type, code and the code's name."""
    if isinstance(exc, ClickHouseUnavailableError):
        inner = exc.last_error
        if inner is None or classify(inner) in UNAVAILABLE_KINDS:
            return describe(exc)
        return f"{type(exc).__name__}: {describe_without_values(inner)}"
    code = server_code(exc)
    if (
        isinstance(exc, ChResilientError)
        or classify(exc) in (*UNAVAILABLE_KINDS, ErrorKind.AUTH)
        or code in MESSAGE_WITHOUT_VALUES
    ):
        return describe(exc)
    parts = [type(exc).__name__, *([str(code), CODE_NAMES.get(code, "")] if code else [])]
    return " ".join(p for p in parts if p) + " (message withheld: it may quote row values)"


def refusal_advice(exc: BaseException, *, user: str, database: str, host: str) -> str | None:
    """For an error that waiting cannot fix (credentials, unknown database), the message
    that names the fix; None for any other error. The startup gate raises it and the
    dependency report recommends it, so both say the same."""
    code = server_code(exc)
    if code in AUTH_CODES:
        return (
            f"authentication failed for user {user!r} at {host}: {describe(exc)}; check "
            "CLICKHOUSE_USER and CLICKHOUSE_PASSWORD, and that the user may connect from "
            "this address"
        )
    if code == UNKNOWN_DATABASE:
        return (
            f"database {database!r} does not exist at {host}: {describe(exc)}; check "
            "CLICKHOUSE_DB, or create it"
        )
    return None
