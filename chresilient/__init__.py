"""chresilient: a resilient ClickHouse connection layer for synchronous Python backends."""

from .breaker import CircuitBreaker, CircuitState
from .client import Client, ResilientClient, get_clickhouse_client, reset_clickhouse_client
from .config import (
    CircuitBreakerConfig,
    Config,
    ConnectionPoolConfig,
    RetryConfig,
)
from .config_values import AnalyticsTable
from .errors import (
    CircuitOpenError,
    ClickHouseUnavailableError,
    ClientClosedError,
    ClosedInFlightError,
    ConfigError,
    ConnectFailedError,
    ErrorKind,
    InsertSourceError,
    InvalidBatchError,
    PoolTimeoutError,
    SchemaError,
    SessionStateError,
    SpoolError,
    SpoolFullError,
    StartupError,
    StartupTimeoutError,
    classify,
)
from .health import health_wsgi_app
from .ingest import InsertResult, InsertTotals
from .manager import ClickHouseConnectionManager
from .spool import ReplayReport, Spool

__version__ = "0.1.0"

__all__ = [
    "AnalyticsTable",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitOpenError",
    "CircuitState",
    "ClickHouseConnectionManager",
    "ClickHouseUnavailableError",
    "Client",
    "ClientClosedError",
    "ClosedInFlightError",
    "Config",
    "ConfigError",
    "ConnectFailedError",
    "ConnectionPoolConfig",
    "ErrorKind",
    "InsertResult",
    "InsertSourceError",
    "InsertTotals",
    "InvalidBatchError",
    "PoolTimeoutError",
    "ReplayReport",
    "ResilientClient",
    "RetryConfig",
    "SchemaError",
    "SessionStateError",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "StartupError",
    "StartupTimeoutError",
    "classify",
    "get_clickhouse_client",
    "health_wsgi_app",
    "reset_clickhouse_client",
]
