"""Config: defaults, env and URL parsing, validation naming the field, redaction."""

from __future__ import annotations

import inspect
import os
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chresilient import CircuitBreakerConfig, Config, ConfigError, ConnectionPoolConfig, RetryConfig
from chresilient.config import ENV_VARS
from chresilient.retry import RetryPolicy

PASSWORD = "p@ss:w/rd#1 \n"


def test_seed_defaults() -> None:
    cfg = Config()
    assert (cfg.host, cfg.port, cfg.user, cfg.password, cfg.database) == (
        "localhost",
        9000,
        "default",
        "",
        "default",
    )
    assert cfg.retry == RetryConfig(
        max_attempts=5,
        initial_delay=1.0,
        max_delay=30.0,
        exponential_base=2.0,
        jitter=True,
        timeout_per_attempt=15.0,
    )
    assert (
        cfg.pool.pool_size,
        cfg.pool.max_connections,
        cfg.pool.connection_timeout,
        cfg.pool.pool_recycle_time,
        cfg.pool.health_check_interval,
    ) == (5, 10, 30, 3600, 60)
    assert cfg.breaker == CircuitBreakerConfig(5, 30, 3)


def test_password_is_redacted_everywhere() -> None:
    cfg = Config(user="u", password=PASSWORD)
    for text in (repr(cfg), str(cfg), cfg.safe_url(), repr(cfg.replace(port=1))):
        assert PASSWORD not in text
        assert "p@ss" not in text
    assert "***" in cfg.safe_url()


def test_from_url_full() -> None:
    cfg = Config.from_url(
        "clickhouses://us%40er:p%40ss%3Aw%2Frd@h1:9440,[::1]:9441/analytics"
        "?verify=false&alt_hosts=h3:9442&load_balancing=round_robin"
    )
    assert cfg.user == "us@er"
    assert cfg.password == "p@ss:w/rd"
    assert cfg.secure is True and cfg.verify is False
    assert cfg.hosts == (("h1", 9440), ("::1", 9441), ("h3", 9442))
    assert cfg.database == "analytics"
    assert cfg.load_balancing == "round_robin"


def test_from_url_defaults_port_and_database() -> None:
    cfg = Config.from_url("clickhouse://example")
    assert (cfg.host, cfg.port, cfg.database, cfg.user, cfg.secure) == (
        "example",
        9000,
        "default",
        "default",
        False,
    )


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("http://h:9000", "url"),
        ("clickhouse://h:notaport", "url"),
        ("clickhouse://h:70000", "url"),
        ("clickhouse://", "url"),
        ("clickhouse://h/db?bogus=1", "url parameter 'bogus'"),
        ("clickhouse://h/db?secure=maybe", "url parameter 'secure'"),
        ("clickhouse://h/db?load_balancing=nearest", "load_balancing"),
    ],
)
def test_from_url_rejects_bad_input(url: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_url(url)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_from_env_parts_and_sections() -> None:
    env = {
        "CLICKHOUSE_HOST": "db",
        "CLICKHOUSE_PORT": "9001",
        "CLICKHOUSE_USER": "app",
        "CLICKHOUSE_PASSWORD": PASSWORD,
        "CLICKHOUSE_DB": "events",
        "CLICKHOUSE_SECURE": "true",
        "CLICKHOUSE_ALT_HOSTS": "db2:9002, db3",
        "CLICKHOUSE_LOAD_BALANCING": "least_loaded",
        "CLICKHOUSE_RETRY_MAX_ATTEMPTS": "3",
        "CLICKHOUSE_RETRY_INITIAL_DELAY": "0.5",
        "CLICKHOUSE_RETRY_MAX_DELAY": "4",
        "CLICKHOUSE_RETRY_TIMEOUT_PER_ATTEMPT": "2",
        "CLICKHOUSE_POOL_SIZE": "2",
        "CLICKHOUSE_POOL_MAX_CONNECTIONS": "4",
        "CLICKHOUSE_POOL_TIMEOUT": "7",
        "CLICKHOUSE_POOL_RECYCLE": "600",
        "CLICKHOUSE_HEALTH_CHECK_INTERVAL": "5",
        "CLICKHOUSE_BREAKER_FAILURE_THRESHOLD": "2",
        "CLICKHOUSE_BREAKER_RECOVERY_TIMEOUT": "9",
        "CLICKHOUSE_BREAKER_HALF_OPEN_MAX_CALLS": "1",
        "CLICKHOUSE_SPOOL_DIR": "/tmp/spool",
        "CLICKHOUSE_SPOOL_MAX_BYTES": "1000",
    }
    cfg = Config.from_env(env)
    assert cfg.hosts == (("db", 9001), ("db2", 9002), ("db3", 9440))
    assert (cfg.user, cfg.password, cfg.database, cfg.secure) == ("app", PASSWORD, "events", True)
    assert cfg.load_balancing == "least_loaded"
    assert cfg.retry.max_attempts == 3 and cfg.retry.initial_delay == 0.5
    assert cfg.retry.max_delay == 4 and cfg.retry.timeout_per_attempt == 2
    assert cfg.pool == ConnectionPoolConfig(
        pool_size=2,
        max_connections=4,
        connection_timeout=7,
        pool_recycle_time=600,
        health_check_interval=5,
    )
    assert cfg.breaker == CircuitBreakerConfig(2, 9, 1)
    assert (cfg.spool_dir, cfg.spool_max_bytes) == ("/tmp/spool", 1000)
    assert set(env) <= set(ENV_VARS)


def test_url_wins_over_parts() -> None:
    cfg = Config.from_env(
        {
            "CLICKHOUSE_URL": "clickhouse://a:b@urlhost:1234/urldb",
            "CLICKHOUSE_HOST": "ignored",
            "CLICKHOUSE_PORT": "1",
            "CLICKHOUSE_USER": "ignored",
            "CLICKHOUSE_PASSWORD": "ignored",
            "CLICKHOUSE_DB": "ignored",
            "CLICKHOUSE_SECURE": "true",
        }
    )
    assert (cfg.host, cfg.port, cfg.user, cfg.password, cfg.database, cfg.secure) == (
        "urlhost",
        1234,
        "a",
        "b",
        "urldb",
        False,
    )


def test_an_empty_variable_counts_as_unset() -> None:
    """README: a variable set to the empty string takes its default; CLICKHOUSE_ALT_HOSTS
    adds hosts to the URL's."""
    empty = {var: "" for var in ENV_VARS if var != "CLICKHOUSE_PASSWORD"}
    assert Config.from_env(empty) == Config()
    cfg = Config.from_env({"CLICKHOUSE_PORT": "", "CLICKHOUSE_RETRY_MAX_ATTEMPTS": ""})
    assert (cfg.port, cfg.retry.max_attempts) == (9000, 5)
    env = {"CLICKHOUSE_URL": "clickhouse://u@a:1/db", "CLICKHOUSE_ALT_HOSTS": "b:2"}
    assert Config.from_env(env).hosts == (("a", 1), ("b", 2))


def test_documented_defaults() -> None:
    """Each default the README and docs state, literally (not compared with the classes'
    own defaults, which would pass whatever they are)."""
    from chresilient.cli import build_parser
    from chresilient.config import default_spool_dir
    from chresilient.health import wsgi

    cfg = Config()
    retry = cfg.retry
    assert (retry.total_timeout, retry.budget_ratio, retry.budget_burst) == (60.0, 0.2, 10.0)
    assert (retry.exponential_base, retry.jitter) == (2.0, True)
    assert cfg.pool.ping_after_idle == 30.0
    assert (cfg.health_probe_timeout, cfg.consistency_check_interval) == (2.0, 300.0)
    assert (cfg.spool_max_bytes, cfg.spool_block_timeout) == (536870912, 30.0)
    assert (cfg.spool_max_attempts, cfg.spool_replay_interval) == (10, 5.0)
    assert (cfg.spool_full_policy, cfg.spool_enabled) == ("raise", True)
    assert (cfg.load_balancing, cfg.max_replica_delay, cfg.secure) == ("in_order", 300.0, False)
    assert (cfg.schema_dir, cfg.schema_timeout, cfg.cluster) == (None, 30.0, None)
    assert wsgi.REPORT_MAX_AGE == 30.0 and wsgi.REFRESH_MAX_AGE == 1.0
    reconnect = inspect.signature(wsgi.health_wsgi_app).parameters["reconnect_timeout"]
    assert reconnect.default == 10.0
    home = os.path.expanduser("~")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("XDG_CACHE_HOME", raising=False)
        assert default_spool_dir() == os.path.join(home, ".cache", "chresilient", "spool")
        patch.setenv("XDG_CACHE_HOME", "/x/cache")
        assert default_spool_dir() == os.path.join("/x/cache", "chresilient", "spool")
    parser = build_parser()
    assert parser.parse_args(["check"]).timeout == 5.0
    assert parser.parse_args(["wait"]).timeout == 60.0


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CLICKHOUSE_PORT", "nine"),
        ("CLICKHOUSE_PORT", "0"),
        ("CLICKHOUSE_SECURE", "perhaps"),
        ("CLICKHOUSE_ALT_HOSTS", "h:x"),
        ("CLICKHOUSE_LOAD_BALANCING", "fastest"),
        ("CLICKHOUSE_RETRY_MAX_ATTEMPTS", "0"),
        ("CLICKHOUSE_RETRY_INITIAL_DELAY", "-1"),
        ("CLICKHOUSE_RETRY_TIMEOUT_PER_ATTEMPT", "nan"),
        ("CLICKHOUSE_POOL_SIZE", "2.5"),
        ("CLICKHOUSE_POOL_MAX_CONNECTIONS", "3"),
        ("CLICKHOUSE_POOL_TIMEOUT", "0"),
        ("CLICKHOUSE_BREAKER_FAILURE_THRESHOLD", "none"),
        ("CLICKHOUSE_SPOOL_MAX_BYTES", "-5"),
        ("CLICKHOUSE_URL", "mysql://x"),
    ],
)
def test_from_env_names_the_bad_variable(var: str, value: str) -> None:
    env = {var: value}
    if var == "CLICKHOUSE_POOL_MAX_CONNECTIONS":
        env["CLICKHOUSE_POOL_SIZE"] = "5"
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    assert info.value.field == var
    assert var in str(info.value)


def test_a_cap_caps_and_ports_follow_the_scheme() -> None:
    # Only the cap set: the first delay is the cap, not a refusal to start.
    cfg = Config.from_env({"CLICKHOUSE_RETRY_MAX_DELAY": "0.5"})
    assert cfg.retry.max_delay == 0.5 and cfg.retry.initial_delay == 1.0
    policy = RetryPolicy.from_config(cfg.retry)
    assert policy.backoff(1, rng=lambda: 1.0) == 0.5 and policy.backoff(4, rng=lambda: 1.0) == 0.5
    assert Config.from_url("clickhouses://h").port == 9440
    assert Config.from_url("clickhouse://h").port == 9000
    assert Config(secure=True).port == 9440 and Config().port == 9000
    assert Config.from_env({"CLICKHOUSE_SECURE": "true"}).port == 9440
    assert Config.from_url("clickhouse://u:p@[::1]:9001/db").hosts == (("::1", 9001),)
    assert Config.from_url("clickhouse://[::1]/db").hosts == (("::1", 9000),)
    # TLS from the query string, and alternates without a port, follow the same rule.
    assert Config.from_url("clickhouse://ch/db?secure=true").port == 9440
    assert Config.from_url("clickhouses://ch/db?secure=false").port == 9000
    assert Config.from_url("clickhouses://ch/db?alt_hosts=ch2").hosts[1] == ("ch2", 9440)
    assert Config(secure=True, alt_hosts="ch2").hosts[1] == ("ch2", 9440)
    env = {"CLICKHOUSE_URL": "clickhouses://ch/db", "CLICKHOUSE_ALT_HOSTS": "ch2, ch3:1"}
    assert Config.from_env(env).hosts == (("ch", 9440), ("ch2", 9440), ("ch3", 1))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("clickhouse://u:p@::1:9001/db", "brackets"),  # a host with a port, or an address?
        ("clickhouse://h:/db", "url"),  # an empty port is not the default port
        ("clickhouse://h:9_000/db", "url"),
        ("clickhouse://h:+9000/db", "url"),
    ],
)
def test_ambiguous_or_odd_hosts_are_refused(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        Config.from_url(url)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CLICKHOUSE_POOL_SIZE", "1_0"),
        ("CLICKHOUSE_POOL_SIZE", "+5"),
        ("CLICKHOUSE_PORT", "9_000"),
        ("CLICKHOUSE_PORT", "0"),
        ("CLICKHOUSE_RETRY_MAX_DELAY", "1_0"),
        ("CLICKHOUSE_RETRY_MAX_DELAY", "nan"),
        ("CLICKHOUSE_ALT_HOSTS", "h:"),
        ("CLICKHOUSE_ALT_HOSTS", "::1:9000"),
        ("CLICKHOUSE_HOST", "ch:9001"),  # the port goes in CLICKHOUSE_PORT
    ],
)
def test_numbers_are_plain_decimals(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({var: value})
    assert info.value.field == var


def test_bad_password_value_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"CLICKHOUSE_PASSWORD": PASSWORD, "CLICKHOUSE_PORT": "x"})
    assert PASSWORD.strip() not in str(info.value)


def test_keyword_validation_names_field() -> None:
    with pytest.raises(ConfigError, match=r"pool\.max_connections"):
        ConnectionPoolConfig(pool_size=5, max_connections=2)
    with pytest.raises(ConfigError, match=r"retry\.max_delay"):
        RetryConfig(max_delay=-1)
    with pytest.raises(ConfigError, match="port"):
        Config(port=70000)
    with pytest.raises(ConfigError, match="host"):
        Config(host="bad host")
    with pytest.raises(ConfigError, match="alt_hosts"):
        Config(alt_hosts=("h:1", 5))  # type: ignore[arg-type]


_env_text = st.text(alphabet=string.printable + "äé€", max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(ENV_VARS), _env_text, max_size=6))
def test_any_environment_builds_config_or_names_the_variable(env: dict[str, str]) -> None:
    secret = "Secr€t-QJXZ"
    env = {**env, "CLICKHOUSE_PASSWORD": secret}
    try:
        cfg = Config.from_env(env)
    except ConfigError as err:
        assert err.field in ENV_VARS, err.field
        assert secret not in str(err)
    else:
        assert cfg.password == secret
        assert secret not in repr(cfg) and secret not in str(cfg) and secret not in cfg.safe_url()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_url_builds_config_or_raises_config_error(tail: str) -> None:
    secret = "QJXZsecret"
    for url in (tail, "clickhouse://" + tail, f"clickhouse://u:{secret}@" + tail):
        try:
            cfg = Config.from_url(url)
        except ConfigError as err:
            assert secret not in str(err)  # a bad URL is named without its password
        else:
            assert secret not in repr(cfg) and secret not in cfg.safe_url()


# Letters that appear in no fixed part of an error message or of the URL around them, so
# any of them in an error message means a piece of the password was echoed.
_MARKERS = "QJXZ"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_MARKERS + "/?#@:&<>% \n", min_size=1, max_size=16))
def test_an_unencoded_password_is_never_echoed(password: str) -> None:
    """Users paste passwords into URLs without percent-encoding them: '/', '?' or '#' then
    splits the URL elsewhere, and no error message may quote the pieces."""
    password = "Q" + password  # at least one marker
    url = f"clickhouse://user:{password}@127.0.0.1:9000/db?client_name=app"
    for parse in (
        lambda: Config.from_url(url),
        lambda: Config.from_env({"CLICKHOUSE_URL": url}),
    ):
        try:
            cfg = parse()
        except ConfigError as err:
            text = str(err) + repr(err)
        else:
            text = repr(cfg) + str(cfg) + cfg.safe_url()
        assert not set(_MARKERS) & set(text), text


@pytest.mark.parametrize("url", ["clickhouse://default:Sup3rSecret",
                                 "clickhouse://default:Sup3rSecret/db",
                                 "clickhouse://Sup3rSecret@h:Sup3rSecret"])
def test_url_errors_never_quote_the_host_part(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_url(url)
    assert "Sup3rSecret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        Config.from_env({"CLICKHOUSE_URL": url})
    assert info.value.field == "CLICKHOUSE_URL" and "Sup3rSecret" not in str(info.value)
