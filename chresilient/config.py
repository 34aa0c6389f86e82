"""Configuration: immutable dataclasses, env/URL parsing, validation and secret redaction.

Every bad value raises :class:`ConfigError` naming the field (or, from the environment,
the variable); nothing silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar
from urllib.parse import quote

from .config_values import (
    DRIVER_OPTIONS,
    PORT,
    SECURE_PORT,
    AnalyticsTable,
    HostPort,
    analytics_tables,
    check,
    format_host,
    parse_alt_hosts,
    parse_bool,
    parse_float,
    parse_int,
    parse_port,
    positive,
    url_fields,
    valid_host,
    valid_port,
    whole,
)
from .errors import ConfigError

LOAD_BALANCING = ("in_order", "round_robin", "random", "least_loaded")
SPOOL_FULL_POLICIES = ("raise", "block", "drop_oldest")
REDACTED = "***"

T = TypeVar("T")


@dataclass(frozen=True)
class RetryConfig:
    """How a failed call is retried: full-jitter exponential backoff within a deadline.

    ``max_attempts`` counts the first attempt. ``total_timeout`` bounds the whole call,
    retries and waits included. ``budget_ratio`` is the share of calls that may be
    retried over time (a token bucket of ``budget_burst`` tokens), so an outage cannot
    multiply the load on the server.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    max_delay: float = 30.0
    exponential_base: float = 2.0
    jitter: bool = True
    timeout_per_attempt: float = 15.0
    total_timeout: float | None = 60.0
    budget_ratio: float = 0.2
    budget_burst: float = 10.0

    def __post_init__(self) -> None:
        whole(self.max_attempts, "retry.max_attempts", 1)
        positive(self.initial_delay, "retry.initial_delay", allow_zero=True)
        positive(self.max_delay, "retry.max_delay", allow_zero=True)
        positive(self.exponential_base, "retry.exponential_base")
        check(self.exponential_base >= 1, "retry.exponential_base", "must be >= 1")
        check(isinstance(self.jitter, bool), "retry.jitter", "must be a boolean")
        positive(self.timeout_per_attempt, "retry.timeout_per_attempt")
        if self.total_timeout is not None:
            positive(self.total_timeout, "retry.total_timeout")
        positive(self.budget_ratio, "retry.budget_ratio", allow_zero=True)
        positive(self.budget_burst, "retry.budget_burst", allow_zero=True)


@dataclass(frozen=True)
class ConnectionPoolConfig:
    """Pool sizing and connection lifetime.

    ``max_connections`` is the hard cap (pool_size plus overflow). ``connection_timeout``
    is how long a caller waits for a free connection. ``ping_after_idle``: a connection
    idle longer than this is pinged before use; a fresher one only gets a socket peek.
    """

    pool_size: int = 5
    max_connections: int = 10
    connection_timeout: float = 30.0
    pool_recycle_time: float = 3600.0
    health_check_interval: float = 60.0
    ping_after_idle: float = 30.0
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        whole(self.pool_size, "pool.pool_size", 1)
        whole(self.max_connections, "pool.max_connections", 1)
        check(
            self.max_connections >= self.pool_size,
            "pool.max_connections",
            f"must be >= pool_size ({self.pool_size}), got {self.max_connections}",
        )
        positive(self.connection_timeout, "pool.connection_timeout")
        positive(self.pool_recycle_time, "pool.pool_recycle_time")
        positive(self.health_check_interval, "pool.health_check_interval")
        positive(self.ping_after_idle, "pool.ping_after_idle", allow_zero=True)
        positive(self.connect_timeout, "pool.connect_timeout")


@dataclass(frozen=True)
class CircuitBreakerConfig:
    """Breaker thresholds: open after ``failure_threshold`` consecutive countable
    failures, try again after ``recovery_timeout`` seconds with at most
    ``half_open_max_calls`` concurrent trial calls."""

    failure_threshold: int = 5
    recovery_timeout: float = 30.0
    half_open_max_calls: int = 3

    def __post_init__(self) -> None:
        whole(self.failure_threshold, "breaker.failure_threshold", 1)
        positive(self.recovery_timeout, "breaker.recovery_timeout")
        whole(self.half_open_max_calls, "breaker.half_open_max_calls", 1)


def default_spool_dir() -> str:
    """The user's cache dir (XDG) plus ``chresilient/spool``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "chresilient", "spool")


@dataclass(frozen=True)
class Config:
    """Everything a :class:`ClickHouseConnectionManager` needs. Keyword fields, all optional.

    The password never appears in ``repr()``/``str()``; use :meth:`safe_url` to show where
    the client connects.
    """

    host: str = "localhost"
    port: int = 0  # 0: the native protocol's port, 9000 (9440 with secure=True)
    user: str = "default"
    password: str = field(default="", repr=False)
    database: str = "default"
    secure: bool = False
    verify: bool = True
    ca_certs: str | None = None
    alt_hosts: tuple[HostPort, ...] = ()
    load_balancing: str = "in_order"
    client_name: str = "chresilient"
    compression: bool | str = False
    settings: Mapping[str, Any] = field(default_factory=dict, repr=False)  # quota_key
    # More keywords for the driver's Connection (tcp_keepalive, certfile, ciphers, ...):
    # DRIVER_OPTIONS names them; ``chresilient.Client`` fills this from its keywords.
    driver_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # keypass
    retry: RetryConfig = field(default_factory=RetryConfig)
    pool: ConnectionPoolConfig = field(default_factory=ConnectionPoolConfig)
    breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    # Health: the monitor's probe timeout, the expected analytics tables, how often the
    # monitor checks them, and the table the write probe owns (None: no write probe).
    health_probe_timeout: float = 2.0
    analytics_tables: tuple[AnalyticsTable, ...] = ()
    consistency_check_interval: float = 300.0
    analytics_probe_table: str | None = "_chresilient_probe"
    spool_dir: str | None = None
    spool_max_bytes: int = 512 * 1024 * 1024
    spool_full_policy: str = "raise"
    # Spool: off switch (insert() then raises instead of spooling), how long the 'block'
    # policy waits for space, and how often the replayer polls when nobody wakes it.
    spool_enabled: bool = True
    spool_block_timeout: float = 30.0
    spool_replay_interval: float = 5.0
    # A spooled batch that fails this many replays while ClickHouse answers is set aside.
    spool_max_attempts: int = 10
    # Schema applied by start() after the gate: the .sql files of a directory (name order)
    # and/or statements in code; {database}, {cluster}, {on_cluster} placeholders.
    schema_dir: str | None = None
    schema_statements: tuple[str, ...] = ()
    schema_timeout: float = 30.0
    cluster: str | None = None
    # Several hosts: a replica whose system.replicas absolute_delay (seconds, read by the
    # health monitor) exceeds this is used only when every host lags. None: not read.
    max_replica_delay: float | None = 300.0
    # OpenTelemetry spans (chresilient.tracing) carry the query text as written (its
    # placeholders, never parameter values) only when this is on.
    trace_query_text: bool = False

    def __post_init__(self) -> None:
        for name in ("host", "user", "database", "client_name"):
            value = getattr(self, name)
            check(isinstance(value, str), name, f"must be a string, got {type(value).__name__}")
        check(isinstance(self.password, str), "password", "must be a string")
        valid_host(self.host, "host")
        if self.port == 0 and isinstance(self.secure, bool):
            object.__setattr__(self, "port", SECURE_PORT if self.secure else PORT)
        valid_port(self.port, "port")
        check(bool(self.database), "database", "must not be empty")
        check(isinstance(self.secure, bool), "secure", "must be a boolean")
        check(isinstance(self.verify, bool), "verify", "must be a boolean")
        alt_port = SECURE_PORT if self.secure is True else PORT
        object.__setattr__(
            self, "alt_hosts", parse_alt_hosts(self.alt_hosts, "alt_hosts", alt_port)
        )
        check(
            self.load_balancing in LOAD_BALANCING,
            "load_balancing",
            f"must be one of {', '.join(LOAD_BALANCING)}, got {self.load_balancing!r}",
        )
        check(isinstance(self.settings, Mapping), "settings", "must be a mapping")
        object.__setattr__(self, "settings", dict(self.settings))
        check(isinstance(self.driver_options, Mapping), "driver_options", "must be a mapping")
        unknown = sorted(set(self.driver_options) - set(DRIVER_OPTIONS))
        check(
            not unknown,
            "driver_options",
            f"unknown option(s) {', '.join(unknown)}; known: {', '.join(DRIVER_OPTIONS)}",
        )
        object.__setattr__(self, "driver_options", dict(self.driver_options))
        for name, kind in (
            ("retry", RetryConfig),
            ("pool", ConnectionPoolConfig),
            ("breaker", CircuitBreakerConfig),
        ):
            value = getattr(self, name)
            check(isinstance(value, kind), name, f"must be a {kind.__name__}")
        positive(self.health_probe_timeout, "health_probe_timeout")
        object.__setattr__(self, "analytics_tables", analytics_tables(self.analytics_tables))
        positive(self.consistency_check_interval, "consistency_check_interval")
        probe = self.analytics_probe_table
        check(
            probe is None or (isinstance(probe, str) and bool(probe.strip())),
            "analytics_probe_table",
            f"must be a table name or None, got {probe!r}",
        )
        whole(self.spool_max_bytes, "spool_max_bytes", 1)
        check(
            self.spool_full_policy in SPOOL_FULL_POLICIES,
            "spool_full_policy",
            f"must be one of {', '.join(SPOOL_FULL_POLICIES)}, got {self.spool_full_policy!r}",
        )
        check(isinstance(self.spool_enabled, bool), "spool_enabled", "must be a boolean")
        check(isinstance(self.trace_query_text, bool), "trace_query_text", "must be a boolean")
        check(
            self.spool_dir is None or (isinstance(self.spool_dir, str) and bool(self.spool_dir)),
            "spool_dir",
            f"must be a non-empty path or None, got {self.spool_dir!r}",
        )
        positive(self.spool_block_timeout, "spool_block_timeout", allow_zero=True)
        positive(self.spool_replay_interval, "spool_replay_interval")
        # One failure cannot tell a bad batch from the moment an outage ends.
        whole(self.spool_max_attempts, "spool_max_attempts", 2)
        if self.max_replica_delay is not None:
            positive(self.max_replica_delay, "max_replica_delay")
        for name in ("schema_dir", "cluster"):
            value = getattr(self, name)
            check(
                value is None or (isinstance(value, str) and bool(value.strip())),
                name,
                f"must be a non-empty string or None, got {value!r}",
            )
        statements = self.schema_statements
        check(
            not isinstance(statements, str)
            and all(isinstance(s, str) and s.strip() for s in statements),
            "schema_statements",
            "must be a sequence of non-empty SQL strings",
        )
        object.__setattr__(self, "schema_statements", tuple(statements))
        positive(self.schema_timeout, "schema_timeout")

    # -- derived values -------------------------------------------------------------
    @property
    def hosts(self) -> tuple[HostPort, ...]:
        """The primary host followed by the alternates, without duplicates."""
        seen: dict[HostPort, None] = {(self.host, self.port): None}
        for hp in self.alt_hosts:
            seen.setdefault(hp, None)
        return tuple(seen)

    @property
    def resolved_spool_dir(self) -> str:
        return self.spool_dir or default_spool_dir()

    def safe_url(self) -> str:
        """The connection URL with the password replaced by ``***``."""
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + REDACTED
        netloc = ",".join(format_host(h, p) for h, p in self.hosts)
        scheme = "clickhouses" if self.secure else "clickhouse"
        return f"{scheme}://{auth}@{netloc}/{quote(self.database, safe='')}"

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return f"Config({self.safe_url()})"

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Config:
        """Parse ``clickhouse://user:pw@host:port[,host2:port2]/db?secure=false``."""
        return cls(**{**url_fields(url), **overrides})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build from ``CLICKHOUSE_*`` variables; ``CLICKHOUSE_URL`` wins over the parts."""
        env = os.environ if environ is None else environ
        try:
            return _config_from_env(cls, env)
        except ConfigError as err:
            var = _ENV_FOR_FIELD.get(err.field)
            if var is None or err.field.startswith("CLICKHOUSE_"):
                raise
            raise ConfigError(var, err.problem) from None


# Field name (as used by validation) -> the environment variable that sets it.
_ENV_FOR_FIELD = {
    "host": "CLICKHOUSE_HOST",
    "port": "CLICKHOUSE_PORT",
    "user": "CLICKHOUSE_USER",
    "password": "CLICKHOUSE_PASSWORD",
    "database": "CLICKHOUSE_DB",
    "secure": "CLICKHOUSE_SECURE",
    "alt_hosts": "CLICKHOUSE_ALT_HOSTS",
    "load_balancing": "CLICKHOUSE_LOAD_BALANCING",
    "retry.max_attempts": "CLICKHOUSE_RETRY_MAX_ATTEMPTS",
    "retry.initial_delay": "CLICKHOUSE_RETRY_INITIAL_DELAY",
    "retry.max_delay": "CLICKHOUSE_RETRY_MAX_DELAY",
    "retry.timeout_per_attempt": "CLICKHOUSE_RETRY_TIMEOUT_PER_ATTEMPT",
    "pool.pool_size": "CLICKHOUSE_POOL_SIZE",
    "pool.max_connections": "CLICKHOUSE_POOL_MAX_CONNECTIONS",
    "pool.connection_timeout": "CLICKHOUSE_POOL_TIMEOUT",
    "pool.pool_recycle_time": "CLICKHOUSE_POOL_RECYCLE",
    "pool.health_check_interval": "CLICKHOUSE_HEALTH_CHECK_INTERVAL",
    "breaker.failure_threshold": "CLICKHOUSE_BREAKER_FAILURE_THRESHOLD",
    "breaker.recovery_timeout": "CLICKHOUSE_BREAKER_RECOVERY_TIMEOUT",
    "breaker.half_open_max_calls": "CLICKHOUSE_BREAKER_HALF_OPEN_MAX_CALLS",
    "spool_dir": "CLICKHOUSE_SPOOL_DIR",
    "spool_max_bytes": "CLICKHOUSE_SPOOL_MAX_BYTES",
    "spool_full_policy": "CLICKHOUSE_SPOOL_FULL_POLICY",
    "spool_enabled": "CLICKHOUSE_SPOOL_ENABLED",
    "spool_block_timeout": "CLICKHOUSE_SPOOL_BLOCK_TIMEOUT",
    "spool_max_attempts": "CLICKHOUSE_SPOOL_MAX_ATTEMPTS",
    "max_replica_delay": "CLICKHOUSE_MAX_REPLICA_DELAY",
    "schema_dir": "CLICKHOUSE_SCHEMA_DIR",
    "schema_timeout": "CLICKHOUSE_SCHEMA_TIMEOUT",
    "cluster": "CLICKHOUSE_CLUSTER",
    "trace_query_text": "CLICKHOUSE_TRACE_QUERY_TEXT",
}

ENV_VARS = ("CLICKHOUSE_URL", *_ENV_FOR_FIELD.values())


def _env_value(env: Mapping[str, str], var: str, parse: Callable[[str, str], T]) -> T | None:
    raw = env.get(var)
    if raw is None or raw == "":
        return None
    return parse(raw, var)


def _config_from_env(cls: type[Config], env: Mapping[str, str]) -> Config:
    text: Callable[[str, str], str] = lambda v, n: v  # noqa: E731
    top: dict[str, Any] = {}
    url = env.get("CLICKHOUSE_URL")
    if url:
        try:
            top.update(url_fields(url))
        except ConfigError as err:
            raise ConfigError("CLICKHOUSE_URL", err.problem) from None
    else:
        parts: dict[str, Callable[[str, str], Any]] = {
            "host": text,
            "port": parse_port,
            "user": text,
            "password": text,
            "database": text,
            "secure": parse_bool,
        }
        for name, parse in parts.items():
            var = _ENV_FOR_FIELD[name]
            if name == "password":  # an empty password is a legal value
                if var in env:
                    top[name] = env[var]
                continue
            value = _env_value(env, var, parse)
            if value is not None:
                top[name] = value
    # Kept as text: Config parses it once it knows whether TLS sets the default port.
    alt = _env_value(
        env, "CLICKHOUSE_ALT_HOSTS", lambda v, n: tuple(p for p in v.split(",") if p.strip())
    )
    if alt:
        top["alt_hosts"] = tuple(top.get("alt_hosts", ())) + alt
    for name, parse in (
        ("load_balancing", text),
        ("spool_dir", text),
        ("spool_max_bytes", parse_int),
        ("spool_full_policy", text),
        ("spool_enabled", parse_bool),
        ("spool_block_timeout", parse_float),
        ("spool_max_attempts", parse_int),
        ("max_replica_delay", parse_float),
        ("schema_dir", text),
        ("schema_timeout", parse_float),
        ("cluster", text),
        ("trace_query_text", parse_bool),
    ):
        value = _env_value(env, _ENV_FOR_FIELD[name], parse)
        if value is not None:
            top[name] = value
    sections: dict[str, dict[str, Any]] = {"retry": {}, "pool": {}, "breaker": {}}
    for fname, var in _ENV_FOR_FIELD.items():
        section, dot, attr = fname.partition(".")
        if not dot:
            continue
        kind = {f.name: f.type for f in dataclasses.fields(_SECTIONS[section])}[attr]
        parse_num: Callable[[str, str], Any] = parse_int if kind in ("int", int) else parse_float
        value = _env_value(env, var, parse_num)
        if value is not None:
            sections[section][attr] = value
    return cls(
        **top,
        retry=RetryConfig(**sections["retry"]),
        pool=ConnectionPoolConfig(**sections["pool"]),
        breaker=CircuitBreakerConfig(**sections["breaker"]),
    )


_SECTIONS: dict[str, type] = {
    "retry": RetryConfig,
    "pool": ConnectionPoolConfig,
    "breaker": CircuitBreakerConfig,
}
