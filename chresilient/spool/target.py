"""Which ClickHouse a spooled batch is for, independent of how its hosts are spelled.

A batch is stored with the *target key* of the manager that spooled it: its database and
the canonical endpoints of all its hosts (``127.0.0.1:9000,loopback:9000/default``). A
manager replays a batch when the database is the same and the endpoint sets meet: so
``localhost`` and ``127.0.0.1``, a reordered host list, or a replica added to the list
all replay the same batches, while two applications with different servers that share a
spool directory never replay into each other's ClickHouse.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The longest wait for the resolver at construction; names that do not resolve in time
# still match by their spelling.
RESOLVE_TIMEOUT = 1.0
LOOPBACK = "loopback"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
LOOPBACK_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("127.0.0.1", "::1"))


@dataclass(frozen=True)
class Target:
    """A database behind a set of endpoints (``host:port``, canonical)."""

    endpoints: frozenset[str]
    database: str

    @property
    def key(self) -> str:
        """The stored form: sorted endpoints, then ``/database``."""
        return f"{','.join(sorted(self.endpoints))}/{self.database}"

    @classmethod
    def parse(cls, key: str) -> Target:
        """Read a stored key (also the single ``host:port/db`` of older releases)."""
        spelled, _, database = key.rpartition("/")
        points = frozenset(canonical(p) for p in spelled.split(",") if p)
        return cls(points, database)

    def matches(self, other: Target) -> bool:
        """Same database, and at least one server in common."""
        return self.database == other.database and bool(self.endpoints & other.endpoints)


def target_of(hosts: Sequence[tuple[str, int]], database: str) -> Target:
    """The target of a manager with these hosts: each host by its name and, where the
    resolver answers within :data:`RESOLVE_TIMEOUT`, by its addresses."""
    points: set[str] = set()
    for host, port in hosts:
        points.add(canonical(f"{_bracket(host)}:{port}"))
        points.update(canonical(f"{_bracket(a)}:{port}") for a in _addresses(host))
    return Target(frozenset(points), database)


def canonical(endpoint: str) -> str:
    """``host:port`` lowercased, IPv6 bracketed and compressed, loopback as ``loopback``."""
    host, _, port = endpoint.strip().lower().rpartition(":")
    host = host.strip("[]").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = LOOPBACK if host in LOOPBACK_NAMES else host
        return f"{name}:{port}"
    if address in LOOPBACK_ADDRESSES:  # not all of 127/8: 127.0.0.2 may be another server
        return f"{LOOPBACK}:{port}"
    return f"{_bracket(address.compressed)}:{port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _addresses(host: str) -> Iterable[str]:
    """The host's addresses, or none if the resolver is slow or fails (a daemon thread:
    ``getaddrinfo`` itself cannot be given a timeout)."""
    name = host.strip("[]")
    if name.lower() in LOOPBACK_NAMES:
        return ()
    try:
        ipaddress.ip_address(name)
        return ()
    except ValueError:
        pass
    found: list[str] = []

    def resolve() -> None:
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except OSError:
            return
        found.extend(str(info[4][0]) for info in infos)

    worker = threading.Thread(target=resolve, name="chresilient-resolve", daemon=True)
    worker.start()
    worker.join(RESOLVE_TIMEOUT)
    return list(found) if not worker.is_alive() else ()
