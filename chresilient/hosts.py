"""Per-host state and host selection.

:class:`HostState` is one ClickHouse host as the core sees it: its pool, its breaker, its
traffic and its replica delay. :class:`HostSelector` decides the order in which a call
tries hosts; it is pure (no I/O, no locks beyond a counter) and works on anything that
looks like a host (:class:`Selectable`), so tests drive it with stubs.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar

from . import fork
from .breaker import CircuitBreaker, CircuitState
from .config import Config
from .config_values import format_host
from .events import Event, Events
from .pool import HostPool
from .server import ServerInfo, is_lagging
from .state import ConnectionStatus
from .statement import DEDUP_SETTING, insert_delivery


class Selectable(Protocol):
    """What host selection needs to know about a host."""

    @property
    def lagging(self) -> bool: ...

    @property
    def down(self) -> bool: ...

    def is_open(self) -> bool:
        """The breaker refuses calls right now (read live)."""

    def load(self) -> int:
        """Calls in flight on the host."""


H = TypeVar("H", bound=Selectable)


@dataclass(frozen=True)
class HostSnapshot:
    """One host at one moment: what health(), metrics() and Prometheus report."""

    label: str
    breaker: dict[str, Any]
    pool: dict[str, int]
    pool_counters: dict[str, int]
    queries_total: int
    errors_total: int
    replica_delay: float | None
    lagging: bool
    server: ServerInfo | None
    insert_deduplication: bool

    def traffic(self) -> dict[str, Any]:
        """Per-host traffic, breaker state, pool gauges and replica delay."""
        return {
            "queries_total": self.queries_total,
            "errors_total": self.errors_total,
            "circuit_breaker_state": self.breaker["state"],
            "replica_delay": self.replica_delay,
            "lagging": self.lagging,
            **self.pool,
        }

    def server_section(self) -> dict[str, Any] | None:
        if self.server is None:
            return None
        return {
            "version": self.server.version_string,
            "revision": self.server.revision,
            "timezone": self.server.timezone,
            "insert_deduplication": self.insert_deduplication,
            "insert_delivery": insert_delivery(self.insert_deduplication),
        }


@dataclass(eq=False)
class HostState:
    """One ClickHouse host: its pool, its breaker, its traffic and its replica delay."""

    pool: HostPool
    breaker: CircuitBreaker
    # Seconds from system.replicas, read by the health monitor (0.0: no replicated
    # tables; None: not read yet, disabled, or unreadable). A lagging host goes last.
    replica_delay: float | None = None
    lagging: bool = False
    # A hint, kept by breaker transitions: the breaker is open (checked live before use).
    down: bool = False
    # Attempts sent to this host (each attempt of a retried call counts) and failed ones.
    queries_total: int = 0
    errors_total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        fork.register(self)

    @property
    def label(self) -> str:
        return self.pool.label

    def is_open(self) -> bool:
        return self.breaker.state is CircuitState.OPEN

    def load(self) -> int:
        return self.pool.checked_out()

    def count(self, failed: bool) -> None:
        with self._lock:
            self.queries_total += 1
            if failed:
                self.errors_total += 1

    def set_replica_delay(self, delay: float | None, limit: float | None) -> bool:
        """Record what the monitor read; returns True when ``lagging`` changed."""
        lagging = is_lagging(delay, limit)
        changed = lagging != self.lagging
        self.replica_delay, self.lagging = delay, lagging
        return changed

    def snapshot(self) -> HostSnapshot:
        """The one way a host is reported (health, metrics, Prometheus)."""
        return HostSnapshot(
            label=self.label,
            breaker=self.breaker.snapshot(),
            pool=self.pool.status(),
            pool_counters=self.pool.stats.as_dict(),
            queries_total=self.queries_total,
            errors_total=self.errors_total,
            replica_delay=self.replica_delay,
            lagging=self.lagging,
            server=self.pool.server_info,
            insert_deduplication=bool(self.pool.features.get(DEDUP_SETTING, False)),
        )

    def after_fork_in_child(self) -> None:
        """A new lock; the counters start from zero (they count this process). The pool
        repairs itself (it registered first)."""
        self._lock = threading.Lock()
        self.queries_total = self.errors_total = 0


def all_busy(hosts: Sequence[HostState]) -> bool:
    """Live traffic holds every steady connection (background work should wait)."""
    gauges = [h.pool.status() for h in hosts]
    return sum(g["checked_out"] for g in gauges) >= sum(g["size"] for g in gauges)


def all_support(hosts: Sequence[HostState], feature: str) -> bool:
    """Whether every host seen so far has ``feature`` (False until a host was seen)."""
    seen = [h.pool.features for h in hosts if h.pool.server_info is not None]
    return bool(seen) and all(f.get(feature, False) for f in seen)


def first_usable(hosts: Sequence[HostState]) -> HostState:
    """The first host whose breaker is not open (the primary if all are)."""
    for host in hosts:
        if not host.is_open():
            return host
    return hosts[0]


class HostSelector:
    """The order in which one call tries hosts (``load_balancing`` plus failover)."""

    def __init__(
        self,
        strategy: str = "in_order",
        *,
        shuffle: Callable[[list[Any]], list[Any]] | None = None,
    ) -> None:
        self.strategy = strategy
        self._turns = itertools.count()
        self._shuffle = shuffle or (lambda items: random.sample(items, len(items)))

    def order(self, hosts: Sequence[H], turn: int | None = None) -> Sequence[H]:
        """``hosts`` in strategy order; ``turn`` is the round-robin step."""
        if len(hosts) == 1:
            return hosts
        if self.strategy == "round_robin":
            start = (next(self._turns) if turn is None else turn) % len(hosts)
            return [*hosts[start:], *hosts[:start]]
        if self.strategy == "random":
            return self._shuffle(list(hosts))
        if self.strategy == "least_loaded":
            return sorted(hosts, key=lambda h: h.load())
        return hosts

    def failover_order(self, hosts: Sequence[H], tried: Sequence[H]) -> Sequence[H]:
        """Hosts ranked by how often this call tried them, then open breaker, then
        replica lag; the strategy orders each rank.

        So a retry goes to a replica that did not just fail (in_order would otherwise
        return to the failed primary while its breaker is still closed), a lagging replica
        serves only when the others failed in this call or lag too, and round robin
        spreads the load evenly over the hosts left instead of doubling it on the host
        after a dead one.
        """
        if len(hosts) == 1 or not (tried or any(h.lagging or h.down for h in hosts)):
            return self.order(hosts)  # the common case: no ranking on the hot path

        def rank(h: H) -> tuple[int, bool, bool]:
            tries = sum(t is h for t in tried)
            return tries, h.down and h.is_open(), h.lagging

        turn = next(self._turns)  # one round-robin step per call, shared by every rank
        ranked = sorted((rank(h), i) for i, h in enumerate(hosts))
        order: list[H] = []
        for _, same in itertools.groupby(ranked, key=lambda item: item[0]):
            order.extend(self.order([hosts[i] for _, i in same], turn))
        return order

    @staticmethod
    def untried_left(hosts: Sequence[H], tried: Sequence[H]) -> bool:
        """Whether a retry can go to a host this call has not tried (breaker not open)."""
        return any(all(t is not h for t in tried) and not h.is_open() for h in hosts)


def build_hosts(cfg: Config, status: ConnectionStatus, events: Events) -> list[HostState]:
    """One :class:`HostState` per configured host, each breaker reporting its openings to
    the connection status and publishing them as events."""
    hosts: list[HostState] = []

    def on_transition(name: str, old: CircuitState, new: CircuitState) -> None:
        for host in hosts:
            if host.label == name:  # re-read: notifications may arrive out of order
                host.down = host.is_open()
        if new is CircuitState.OPEN:
            status.breaker_opened(all_open=all(h.is_open() for h in hosts))
            events.fire(Event.BREAKER_OPENED, host=name)
        elif new is CircuitState.CLOSED:
            events.fire(Event.BREAKER_CLOSED, host=name)

    hosts.extend(
        HostState(
            pool=HostPool(cfg, address),
            breaker=CircuitBreaker(
                cfg.breaker, name=format_host(*address), on_transition=on_transition
            ),
        )
        for address in cfg.hosts
    )
    return hosts
