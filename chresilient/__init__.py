"""chresilient: a resilient ClickHouse connection layer for synchronous Python backends."""

from .breaker import CircuitBreaker, CircuitState
from .client import ResilientClient, get_clickhouse_client, reset_clickhouse_client
from .config import CircuitBreakerConfig, Config, ConnectionPoolConfig, RetryConfig
from .errors import (
    CircuitOpenError,
    ClickHouseUnavailableError,
    ClientClosedError,
    ConfigError,
    ErrorKind,
    PoolTimeoutError,
    SpoolFullError,
    StartupError,
    StartupTimeoutError,
    classify,
)
from .manager import ClickHouseConnectionManager

__version__ = "0.1.0"

__all__ = [
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitOpenError",
    "CircuitState",
    "ClickHouseConnectionManager",
    "ClickHouseUnavailableError",
    "ClientClosedError",
    "Config",
    "ConfigError",
    "ConnectionPoolConfig",
    "ErrorKind",
    "PoolTimeoutError",
    "ResilientClient",
    "RetryConfig",
    "SpoolFullError",
    "StartupError",
    "StartupTimeoutError",
    "classify",
    "get_clickhouse_client",
    "reset_clickhouse_client",
]
