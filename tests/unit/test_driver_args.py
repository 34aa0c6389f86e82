"""clickhouse-driver's Client arguments as a Config, and errors that are the driver's
classes too. No server."""

from __future__ import annotations

import pickle

import pytest
from clickhouse_driver import errors as driver_errors

from chresilient import (
    CircuitOpenError,
    ClickHouseUnavailableError,
    Config,
    ConfigError,
    ConnectFailedError,
    RetryConfig,
)
from chresilient.driver_args import config_from_driver_args
from chresilient.errors import ErrorKind, classify, describe


def test_the_drivers_arguments_map_onto_config() -> None:
    cfg = config_from_driver_args(
        ("ch1", 9001, "analytics", "app", "s3cret"),
        {
            "compression": "lz4",
            "connect_timeout": 3,
            "send_receive_timeout": 7,
            "settings": {"max_threads": 2, "use_numpy": False},
            "alt_hosts": "ch2:9002,ch3",
            "round_robin": True,
            "tcp_keepalive": True,
            "client_name": "etl",
        },
    )
    assert (cfg.host, cfg.port, cfg.database, cfg.user, cfg.password) == (
        "ch1",
        9001,
        "analytics",
        "app",
        "s3cret",
    )
    assert cfg.alt_hosts == (("ch2", 9002), ("ch3", 9000))
    assert cfg.load_balancing == "round_robin"
    assert cfg.compression == "lz4" and cfg.client_name == "etl"
    assert cfg.pool.connect_timeout == 3 and cfg.retry.timeout_per_attempt == 7
    assert cfg.settings == {"max_threads": 2, "use_numpy": False}
    assert cfg.driver_options == {"tcp_keepalive": True}
    assert not cfg.spool_enabled  # the driver has no spool; Client(config=...) gives one


def test_defaults_follow_the_driver_and_the_base_config() -> None:
    cfg = config_from_driver_args(("h",), {})
    assert (cfg.port, cfg.database, cfg.user, cfg.password) == (9000, "default", "default", "")
    assert config_from_driver_args(("h",), {"secure": True}).port == 9440
    base = Config(retry=RetryConfig(max_attempts=2), settings={"a": 1}, spool_enabled=True)
    cfg = config_from_driver_args(("h",), {"settings": {"b": 2}}, base)
    assert cfg.retry.max_attempts == 2 and cfg.spool_enabled
    assert cfg.settings == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [(("h",), {"no_such_option": 1}), (("h",), {"host": "x"}), ((), {})],
)
def test_arguments_the_driver_would_refuse_are_a_type_error(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    with pytest.raises(TypeError, match=r"^Client\(\): "):
        config_from_driver_args(args, kwargs)


def test_driver_options_are_checked_by_name() -> None:
    with pytest.raises(ConfigError, match=r"driver_options.*bogus"):
        Config(driver_options={"bogus": 1})


def test_unavailable_is_also_the_drivers_transport_error() -> None:
    cause = driver_errors.NetworkError("Connection refused (h:1)")
    err = ClickHouseUnavailableError(
        "query failed after 3 attempt(s)",
        last_error=ConnectFailedError("could not connect", last_error=cause),
        attempts=3,
    )
    assert isinstance(err, driver_errors.NetworkError)
    assert isinstance(err, ClickHouseUnavailableError)
    assert type(err).__name__ == "ClickHouseUnavailableError"
    assert classify(err) is ErrorKind.TRANSPORT
    assert describe(err).startswith("ClickHouseUnavailableError: query failed")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and again.attempts == 3 and str(again) == str(err)
    timeout = ConnectFailedError("x", last_error=driver_errors.SocketTimeoutError("t"))
    assert isinstance(timeout, driver_errors.SocketTimeoutError)
    refused = CircuitOpenError("h:1", 1.0, last_error=cause)
    assert isinstance(refused, driver_errors.NetworkError)
    assert classify(refused) is ErrorKind.LOCAL  # still a refusal without network


def test_server_errors_are_not_mixed_in() -> None:
    err = ClickHouseUnavailableError("x", last_error=driver_errors.ServerException("m", 202))
    assert not isinstance(err, driver_errors.ServerException)
    assert classify(err) is ErrorKind.TRANSPORT
    plain = ClickHouseUnavailableError("x")
    assert type(plain) is ClickHouseUnavailableError


def test_none_timeouts_and_empty_alt_hosts_mean_the_defaults() -> None:
    cfg = config_from_driver_args(
        ("h",), {"connect_timeout": None, "send_receive_timeout": None, "alt_hosts": ""}
    )
    assert cfg.alt_hosts == ()
    assert cfg.pool.connect_timeout == 10.0
    assert cfg.retry.timeout_per_attempt == 300.0  # the driver's: a silent OPTIMIZE works
    assert (
        config_from_driver_args(("h",), {"send_receive_timeout": 7}).retry.timeout_per_attempt == 7
    )
    base = Config(retry=RetryConfig(timeout_per_attempt=4.0))
    assert config_from_driver_args(("h",), {}, base).retry.timeout_per_attempt == 4.0


def test_repr_hides_driver_options() -> None:
    cfg = config_from_driver_args(("h",), {"keypass": "tls-key-passphrase"})
    assert "tls-key-passphrase" not in repr(cfg) and "tls-key-passphrase" not in str(cfg)


def test_a_breaker_refusal_is_also_the_drivers_class_of_its_last_error() -> None:
    refused = CircuitOpenError("h:1", 2.0, driver_errors.NetworkError("refused"))  # by position
    assert isinstance(refused, driver_errors.NetworkError)
    assert refused.retry_after == 2.0 and isinstance(refused.last_error, driver_errors.NetworkError)


def test_a_querys_own_memory_limit_is_not_retried_but_the_servers_is() -> None:
    mine = driver_errors.ServerException(
        "DB::Exception: Memory limit (for query) exceeded: would use 9.31 GiB", 241
    )
    total = driver_errors.ServerException(
        "DB::Exception: Memory limit (total) exceeded: would use 9.31 GiB", 241
    )
    assert classify(mine) is ErrorKind.DETERMINISTIC
    assert classify(total) is ErrorKind.TRANSIENT
    already = driver_errors.ServerException("Query with id = q-1 is already running.", 216)
    assert classify(already) is ErrorKind.TRANSIENT
