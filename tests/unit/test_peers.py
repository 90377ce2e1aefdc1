"""Cancel requests passed on to the other replicas: where to, and how often."""

from __future__ import annotations

from pgwarden.api.config import Peers
from pgwarden_proxy import peers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_allows_bursts_and_then_the_rate() -> None:
    clock = Clock()
    budget = peers.PassOnBudget(rate=10, burst=5, clock=clock)
    assert [budget.take() for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.35  # three more (3.5 tokens)
    assert [budget.take() for _ in range(4)] == [True] * 3 + [False]
    clock.now += 60  # never more than the burst
    assert sum(budget.take() for _ in range(20)) == 5


async def test_addresses_from_the_list_and_from_dns() -> None:
    fixed = Peers(addresses=["10.0.0.5:6432", "[::1]:5432"])
    assert await peers.addresses(fixed, 5432) == {("10.0.0.5", 6432), ("::1", 5432)}
    # a name resolves to every address it has, on listen.port unless `port` says otherwise
    assert ("127.0.0.1", 5433) in await peers.addresses(Peers(dns="localhost"), 5433)
    assert ("127.0.0.1", 7000) in await peers.addresses(Peers(dns="localhost", port=7000), 5433)


async def test_a_name_that_does_not_resolve_passes_on_to_no_one() -> None:
    assert await peers.addresses(Peers(dns="no-such-peers.invalid"), 5432) == set()
