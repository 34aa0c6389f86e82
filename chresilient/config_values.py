"""Parsing and validating configuration values: hosts, ports, numbers, booleans, URLs.

Every function raises :class:`ConfigError` naming the field; none echoes a password.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote

from .errors import ConfigError

HostPort = tuple[str, int]
# ClickHouse's native protocol ports, plain and TLS (the driver's defaults too).
PORT, SECURE_PORT = 9000, 9440


# Keywords of clickhouse_driver's Connection that have no Config field of their own.
DRIVER_OPTIONS = (
    "certfile",
    "check_hostname",
    "ciphers",
    "client_revision",
    "compress_block_size",
    "disable_reconnect",
    "keyfile",
    "keypass",
    "server_hostname",
    "settings_is_important",
    "ssl_version",
    "sync_request_timeout",
    "tcp_keepalive",
)


def check(cond: bool, name: str, problem: str) -> None:
    if not cond:
        raise ConfigError(name, problem)


def positive(value: float, name: str, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    check(
        ok, name, f"must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}"
    )


def whole(value: int, name: str, minimum: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    check(ok, name, f"must be an integer >= {minimum}, got {value!r}")


def parse_host_port(text: str, name: str, default_port: int) -> HostPort:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``. An IPv6 address must be in
    brackets: ``::1:9001`` could be a host with a port or a longer address."""
    text = text.strip()
    check(bool(text), name, "empty host")
    if text.startswith("["):  # [::1]:9000
        host, sep, rest = text[1:].partition("]")
        check(bool(sep) and bool(host), name, f"malformed IPv6 host {text!r}")
        check(rest == "" or rest.startswith(":"), name, f"malformed host {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        check(":" not in text, name, f"write an IPv6 host in brackets: [{text}] or [addr]:port")
        host, port_text = text, None
    valid_host(host, name)
    check(port_text != "", name, f"empty port in {text!r}")
    port = default_port if port_text is None else parse_int(port_text, name)
    valid_port(port, name)
    return host, port


def valid_host(host: object, name: str) -> None:
    ok = isinstance(host, str) and bool(host)
    ok = ok and not any(c.isspace() or c in "/@?#,[]" for c in str(host))
    check(ok, name, f"bad host {host!r}")
    if ":" in str(host):  # only an IPv6 address has colons; host:port goes in two fields
        try:
            ipaddress.IPv6Address(str(host))
        except ValueError:
            raise ConfigError(
                name, f"bad host {host!r}: give the port separately (port, CLICKHOUSE_PORT)"
            ) from None


def valid_port(port: object, name: str) -> None:
    ok = isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
    check(ok, name, f"port must be an integer 1-65535, got {port!r}")


# Plain decimal text only: Python's int() and float() also take "1_0", "+5", "inf", "nan".
_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def parse_int(text: str, name: str) -> int:
    stripped = text.strip()
    check(_INT.fullmatch(stripped) is not None, name, f"expected an integer, got {text!r}")
    return int(stripped)


def parse_port(text: str, name: str) -> int:
    port = parse_int(text, name)
    valid_port(port, name)
    return port


def parse_float(text: str, name: str) -> float:
    stripped = text.strip()
    check(_FLOAT.fullmatch(stripped) is not None, name, f"expected a number, got {text!r}")
    value = float(stripped)
    check(math.isfinite(value), name, f"expected a finite number, got {text!r}")
    return value


def parse_bool(text: str, name: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"expected true/false, got {text!r}")


def parse_alt_hosts(value: Any, name: str, default_port: int = PORT) -> tuple[HostPort, ...]:
    if isinstance(value, str):
        items: list[Any] = [part for part in value.split(",") if part.strip()]
    else:
        try:
            items = list(value)
        except TypeError:
            raise ConfigError(name, f"expected host:port items, got {value!r}") from None
    hosts = []
    for item in items:
        if isinstance(item, str):
            hosts.append(parse_host_port(item, name, default_port))
        elif (
            isinstance(item, (tuple, list))
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], int)
        ):
            valid_host(item[0], name)
            valid_port(item[1], name)
            hosts.append((item[0], item[1]))
        else:
            raise ConfigError(name, f"expected 'host:port' or (host, port), got {item!r}")
    return tuple(hosts)


def format_host(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets: the one label a host has everywhere."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


URL_PARAMS: dict[str, Callable[[str, str], Any]] = {
    "secure": parse_bool,
    "verify": parse_bool,
    "ca_certs": lambda v, n: v,
    "client_name": lambda v, n: v,
    "compression": lambda v, n: v if v not in ("true", "false", "1", "0") else parse_bool(v, n),
    "load_balancing": lambda v, n: v,
    "alt_hosts": parse_alt_hosts,
}


def url_fields(url: str) -> dict[str, Any]:
    check(isinstance(url, str), "url", "must be a string")
    scheme, sep, rest = url.partition("://")
    check(bool(sep), "url", "expected clickhouse://user:password@host:port/database")
    check(
        scheme in ("clickhouse", "clickhouses"),
        "url",
        f"scheme must be clickhouse:// or clickhouses://, got {scheme!r}",
    )
    # A password with a raw '/', '?' or '#' would be split off as path, query or fragment,
    # and the errors below would then quote pieces of it: refuse it without echoing.
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    check(
        "@" not in rest[cut:],
        "url",
        "'@' after the host part; percent-encode '/', '?', '#' and '@' in the user and "
        "password (urllib.parse.quote(password, safe='')), and '@' elsewhere as %40",
    )
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    fields: dict[str, Any] = {"secure": scheme == "clickhouses"}
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        user, has_pw, password = auth.partition(":")
        if user:
            fields["user"] = unquote(user)
        if has_pw:
            fields["password"] = unquote(password)
    hosts = [h for h in netloc.split(",")] if netloc else []
    check(bool(hosts) and all(h.strip() for h in hosts), "url", "missing host")
    database = unquote(path.strip("/"))
    if database:
        check("/" not in database, "url", f"bad database name {database!r}")
        fields["database"] = database
    alt_texts: list[str] = []
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        parser = URL_PARAMS.get(key)
        check(
            parser is not None,
            f"url parameter {key!r}",
            f"unknown; known: {', '.join(sorted(URL_PARAMS))}",
        )
        assert parser is not None
        if key == "alt_hosts":  # parsed below, once ?secure= is known
            alt_texts.append(value)
        else:
            fields[key] = parser(value, f"url parameter {key!r}")
    # A host without a port gets the native protocol's: 9440 with TLS (the scheme or
    # ?secure=true), else 9000.
    default_port = SECURE_PORT if fields["secure"] else PORT
    try:
        parsed = [parse_host_port(h, "url", default_port) for h in hosts]
    except ConfigError:
        # Never quote the host part of a URL: in 'clickhouse://user:secret' (no '@') the
        # password sits where the port goes.
        raise ConfigError(
            "url", "bad host or port (not shown: it may hold a password written without "
            "'@'); expected clickhouse://user:password@host:port/database, IPv6 hosts in "
            "brackets ([::1]:9000)"
        ) from None
    fields["host"], fields["port"] = parsed[0]
    alt = list(parsed[1:])
    for text in alt_texts:
        alt.extend(parse_alt_hosts(text, "url parameter 'alt_hosts'", default_port))
    if alt:
        fields["alt_hosts"] = tuple(alt)
    del fragment
    return fields


@dataclass(frozen=True)
class AnalyticsTable:
    """A table the analytics code expects, checked by ``ensure_analytics_consistency()``.

    ``columns`` are ``(name, type)`` pairs with types as ClickHouse reports them in
    ``system.columns`` (``UInt64``, ``DateTime('UTC')``); a mapping is accepted too.
    ``engine`` is the engine name (``system.tables.engine``, e.g. ``MergeTree``); None
    skips that check. ``database`` defaults to the connection's database.
    """

    name: str
    columns: tuple[tuple[str, str], ...] = ()
    engine: str | None = None
    database: str | None = None

    def __post_init__(self) -> None:
        where = f"analytics_tables[{self.name!r}]"
        check(isinstance(self.name, str) and bool(self.name), "analytics_tables", "empty name")
        raw: Any = self.columns
        items = list(raw.items()) if isinstance(raw, Mapping) else list(raw)
        columns: list[tuple[str, str]] = []
        for item in items:
            ok = isinstance(item, (tuple, list)) and len(item) == 2
            ok = ok and all(isinstance(part, str) and part.strip() for part in item)
            check(ok, f"{where}.columns", f"expected (name, type) pairs of strings, got {item!r}")
            columns.append((item[0], item[1]))
        object.__setattr__(self, "columns", tuple(columns))
        for name in ("engine", "database"):
            value = getattr(self, name)
            check(
                value is None or (isinstance(value, str) and bool(value.strip())),
                f"{where}.{name}",
                f"must be a non-empty string or None, got {value!r}",
            )


def analytics_tables(value: Any) -> tuple[AnalyticsTable, ...]:
    """Accept AnalyticsTable objects or mappings with the same keys."""
    if isinstance(value, (str, bytes, Mapping)):
        raise ConfigError("analytics_tables", "expected a sequence of AnalyticsTable")
    tables = []
    for item in value:
        if isinstance(item, Mapping):
            try:
                item = AnalyticsTable(**item)
            except TypeError as err:
                raise ConfigError("analytics_tables", str(err)) from None
        check(
            isinstance(item, AnalyticsTable),
            "analytics_tables",
            f"expected AnalyticsTable items, got {type(item).__name__}",
        )
        tables.append(item)
    return tuple(tables)
