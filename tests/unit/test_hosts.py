"""Host selection on stub hosts: order, failover, lagging and open breakers. No server."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from chresilient.hosts import HostSelector


@dataclass(eq=False)
class Stub:
    name: str
    lagging: bool = False
    down: bool = False
    open: bool = False
    in_flight: int = 0

    def is_open(self) -> bool:
        return self.open

    def load(self) -> int:
        return self.in_flight


def names(hosts: object) -> list[str]:
    return [h.name for h in hosts]  # type: ignore[attr-defined]


def test_in_order_failover_goes_to_untried_hosts_first() -> None:
    a, b, c = Stub("a"), Stub("b"), Stub("c")
    hosts, sel = [a, b, c], HostSelector("in_order")
    assert names(sel.failover_order(hosts, [])) == ["a", "b", "c"]
    assert names(sel.failover_order(hosts, [a])) == ["b", "c", "a"]
    assert names(sel.failover_order(hosts, [a, b])) == ["c", "a", "b"]
    assert names(sel.failover_order(hosts, [a, b, c])) == ["a", "b", "c"]
    assert names(sel.failover_order(hosts, [a, b, c, a])) == ["b", "c", "a"]
    assert sel.untried_left(hosts, [a, b])
    assert not sel.untried_left(hosts, [a, b, c])
    c.open = True
    assert not sel.untried_left(hosts, [a, b])  # c would refuse the call anyway


def test_lagging_replica_goes_last_unless_untried() -> None:
    a, b, c = Stub("a"), Stub("b", lagging=True), Stub("c")
    hosts, sel = [a, b, c], HostSelector("in_order")
    assert names(sel.failover_order(hosts, [])) == ["a", "c", "b"]
    assert names(sel.failover_order(hosts, [a])) == ["c", "b", "a"]  # untried beats lag-free
    a.lagging = c.lagging = True
    assert names(sel.failover_order(hosts, [])) == ["a", "b", "c"]  # all lag: strategy order


def test_a_host_with_an_open_breaker_goes_after_closed_ones() -> None:
    a, b = Stub("a", down=True, open=True), Stub("b")
    sel = HostSelector("in_order")
    assert names(sel.failover_order([a, b], [])) == ["b", "a"]
    a.open = False  # down is only a hint: the live breaker state decides
    assert names(sel.failover_order([a, b], [])) == ["a", "b"]


def test_round_robin_spreads_over_hosts_and_ranks() -> None:
    a, b, c = Stub("a"), Stub("b"), Stub("c")
    sel = HostSelector("round_robin")
    firsts = [sel.order([a, b, c])[0].name for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    # After a failure on a the retry goes to b or c, alternating between calls.
    retries = [sel.failover_order([a, b, c], [a])[0].name for _ in range(4)]
    assert set(retries) == {"b", "c"} and retries[0] != retries[1]


def test_least_loaded_and_random() -> None:
    a, b, c = Stub("a", in_flight=3), Stub("b", in_flight=0), Stub("c", in_flight=1)
    assert names(HostSelector("least_loaded").order([a, b, c])) == ["b", "c", "a"]
    reverse = HostSelector("random", shuffle=lambda items: items[::-1])
    assert names(reverse.order([a, b, c])) == ["c", "b", "a"]


@pytest.mark.parametrize("strategy", ["in_order", "round_robin", "random", "least_loaded"])
def test_one_host_is_always_that_host(strategy: str) -> None:
    only = Stub("only", lagging=True, down=True)
    assert names(HostSelector(strategy).failover_order([only], [only])) == ["only"]
