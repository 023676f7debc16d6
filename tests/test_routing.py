"""The routing policy, as specified in node/routing.py."""

from __future__ import annotations

import dataclasses
import time

from node.messages import ModelInfo, Offer
from node.routing import Reputation, RouteQuery, eligible, exclusion, rank

from . import factories
from .factories import MODEL

NOW = 1_000_000.0


def offer(peer: str, **changes) -> Offer:
    return factories.offer(peer, **{"expires_at": NOW + 60, "models": [ModelInfo(MODEL, "m", 2048)], **changes})


def peers(ranked):
    return [o.peer_id for o in ranked]


def test_filters():
    rep = Reputation()
    q = RouteQuery(model=MODEL, max_price_per_1k=10, chain_id=1, escrow="0xE")
    cases = {
        "does not serve the model": offer("a", models=[ModelInfo("other", "x", 1)]),
        "offer expired": offer("c", expires_at=NOW),
        "over the price cap": offer("d", price_per_1k=11, chain_id=1, escrow="0xE"),
        "paid on another chain or escrow": offer("e", price_per_1k=5, chain_id=2, escrow="0xE"),
    }
    for reason, o in cases.items():
        assert exclusion(o, q, rep, NOW) == reason
    assert exclusion(offer("f", price_per_1k=5, chain_id=1, escrow="0xe"), q, rep, NOW) is None
    free_only = dataclasses.replace(q, free_only=True)
    assert "paid offer" in exclusion(offer("f", price_per_1k=5, chain_id=1, escrow="0xE"), free_only, rep, NOW)
    assert exclusion(offer("g"), free_only, rep, NOW) is None


def test_cheapest_wins_then_speed_latency_and_reliability():
    rep = Reputation()
    q = RouteQuery(model=MODEL)
    ranked = rank([offer("pricey", price_per_1k=50), offer("cheap", price_per_1k=1)], q, rep, NOW)
    assert peers(ranked) == ["cheap", "pricey"]
    by_speed = rank([offer("slow", tokens_per_s=10), offer("fast", tokens_per_s=200)], q, rep, NOW)
    assert peers(by_speed) == ["fast", "slow"]
    rep.latency("near", 2.0)
    rep.latency("far", 80.0)
    assert peers(rank([offer("far"), offer("near")], q, rep, NOW)) == ["near", "far"]
    rep.success("good")
    rep.success("good")
    rep.failure("flaky", NOW - 3600)  # long ago: not banned any more, but less reliable
    assert peers(rank([offer("flaky"), offer("good")], q, rep, NOW)) == ["good", "flaky"]


def test_full_workers_come_last_but_are_not_dropped():
    q = RouteQuery(model=MODEL)
    ranked = rank([offer("full-cheap", slots_free=0), offer("free-pricey", price_per_1k=9)], q, Reputation(), NOW)
    assert peers(ranked) == ["free-pricey", "full-cheap"]


def test_ties_break_deterministically():
    q = RouteQuery(model=MODEL)
    assert peers(rank([offer("b"), offer("c"), offer("a")], q, Reputation(), NOW)) == ["a", "b", "c"]


def test_failures_ban_with_backoff_and_success_clears():
    rep = Reputation(base_ban_s=5, max_ban_s=60)
    bans = [rep.failure("p", NOW) - NOW for _ in range(6)]
    assert bans == [5, 10, 20, 40, 60, 60]
    q = RouteQuery(model=MODEL)
    assert peers(rank([offer("p"), offer("q")], q, rep, NOW)) == ["q"]
    assert peers(rank([offer("p", expires_at=NOW + 600)], q, rep, NOW + 61)) == ["p"]
    rep.success("p")
    assert not rep.banned("p", NOW)


def test_a_pinned_peer_is_the_only_choice_even_if_banned():
    rep = Reputation()
    rep.failure("pinned", NOW)
    q = RouteQuery(model=MODEL, pinned_peer="pinned")
    assert peers(rank([offer("other", price_per_1k=0), offer("pinned")], q, rep, NOW)) == ["pinned"]


def test_ranking_a_thousand_offers_is_fast_enough_to_not_matter():
    """Not a benchmark (bench/market.py measures it); a guard against accidental quadratic work."""
    offers = [offer(f"p{i:04d}", price_per_1k=i % 17, tokens_per_s=50 + i % 90) for i in range(1000)]
    rep = Reputation()
    for i in range(0, 1000, 3):
        rep.latency(f"p{i:04d}", float(i % 50))
    start = time.perf_counter()
    ranked = rank(offers, RouteQuery(model=MODEL), rep, NOW)
    assert len(ranked) == 1000 and ranked[0].price_per_1k == 0
    assert time.perf_counter() - start < 1.0


def test_the_fast_filter_agrees_with_the_spec():
    import random

    rng = random.Random(1)
    rep = Reputation()
    rep.failure("p3", NOW)
    offers = [
        offer(
            f"p{i}",
            price_per_1k=rng.choice([0, 0, 5, 20]),
            chain_id=rng.choice([1, 2]),
            escrow=rng.choice(["0xE", "0xe", "0xF"]),
            slots_free=rng.choice([0, 1, 3]),
            expires_at=NOW + rng.choice([-1, 0, 30]),
            models=[ModelInfo(rng.choice([MODEL, "other"]), "m", 1)],
        )
        for i in range(300)
    ]
    for query in (
        RouteQuery(model=MODEL),
        RouteQuery(model=MODEL, max_price_per_1k=10, chain_id=1, escrow="0xE"),
        RouteQuery(model=MODEL, free_only=True),
        RouteQuery(model=MODEL, pinned_peer="p3"),
    ):
        spec = [o.peer_id for o in offers if exclusion(o, query, rep, NOW) is None]
        assert [o.peer_id for o in eligible(offers, query, rep, NOW)] == spec
