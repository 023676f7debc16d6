"""The routing policy, as specified in node/market/routing.py."""

from __future__ import annotations

import dataclasses
import time

from node.market.routing import Reputation, RouteQuery, eligible, exclusion, rank
from node.protocol.messages import ModelInfo, Offer

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
    rep.ban("p5", NOW, 60)  # condemned (caught cheating): out like a failure's backoff
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


# ----------------------------------------------- claims, measurements (issue 9, item 6)


def test_absurd_speed_claims_count_as_absent():
    """A fake worker advertising 1e9 tokens/s (or NaN, inf, ≤ 0) must not win the speed term."""
    q = RouteQuery(model=MODEL)
    for claim in (1e9, 100_001.0, float("inf"), float("nan"), -1.0, 0.0):
        ranked = rank([offer("zfake", tokens_per_s=claim), offer("honest", tokens_per_s=100.0)], q, Reputation(), NOW)
        assert peers(ranked) == ["honest", "zfake"], claim  # as if it claimed nothing: a tie, broken on the id
    # a plausible claim still counts while nothing is measured
    assert peers(
        rank([offer("zfast", tokens_per_s=500.0), offer("slow", tokens_per_s=50.0)], q, Reputation(), NOW)
    ) == [
        "zfast",
        "slow",
    ]


def test_absurd_first_token_claims_count_as_absent():
    q = RouteQuery(model=MODEL)
    for claim in (0.0, -5.0, float("nan"), float("-inf"), 1e12):
        ranked = rank(
            [offer("zfake", first_token_ms=claim), offer("honest", first_token_ms=10.0)], q, Reputation(), NOW
        )
        assert peers(ranked) == ["honest", "zfake"], claim


def test_measured_speed_outweighs_claims():
    q = RouteQuery(model=MODEL)
    rep = Reputation()
    rep.observe("bragger", tokens_per_s=20.0, first_token_ms=None)  # claims 5,000, delivered 20
    rep.observe("steady", tokens_per_s=100.0, first_token_ms=None)
    ranked = rank([offer("bragger", tokens_per_s=5000.0), offer("steady", tokens_per_s=100.0)], q, rep, NOW)
    assert peers(ranked) == ["steady", "bragger"]
    # an unmeasured claim is believed only up to the fastest measured peer: no better than "steady" here
    ranked = rank([offer("znew", tokens_per_s=90_000.0), offer("steady", tokens_per_s=100.0)], q, rep, NOW)
    assert peers(ranked) == ["steady", "znew"]


def test_measured_first_token_outweighs_claims_and_ping():
    q = RouteQuery(model=MODEL)
    rep = Reputation()
    rep.observe("quick", tokens_per_s=None, first_token_ms=50.0)
    rep.observe("a-sluggish", tokens_per_s=None, first_token_ms=3000.0)
    rep.latency("a-sluggish", 1.0)  # a fast ping says nothing about how soon text comes
    ranked = rank([offer("a-sluggish", first_token_ms=1.0), offer("quick", first_token_ms=40.0)], q, rep, NOW)
    assert peers(ranked) == ["quick", "a-sluggish"]
    # a claim (plus the ping) is no better than the quickest measured peer
    ranked = rank([offer("zclaims", first_token_ms=0.5), offer("quick", first_token_ms=40.0)], q, rep, NOW)
    assert peers(ranked) == ["quick", "zclaims"]


def test_observe_smooths_and_ignores_non_measurements():
    rep = Reputation()
    rep.observe("p", tokens_per_s=100.0, first_token_ms=200.0)
    rep.observe("p", tokens_per_s=200.0, first_token_ms=None)
    rec = rep.peers["p"]
    assert rec.tokens_per_s == 0.7 * 100.0 + 0.3 * 200.0 and rec.first_token_ms == 200.0
    for bad in (None, float("nan"), float("inf"), -3.0, 0.0):
        rep.observe("p", tokens_per_s=bad, first_token_ms=bad)
    assert rep.peers["p"].tokens_per_s == 130.0 and rep.peers["p"].first_token_ms == 200.0
    rep.observe("q", tokens_per_s=1e12, first_token_ms=None)  # a measurement is clamped to the plausible bound
    assert rep.peers["q"].tokens_per_s == 100_000.0
    # observing is not a success: reliability and bans are success/failure's business
    assert rep.reliability("p") == 0.5 and not rep.valued("p")
    rep.success("p")
    assert rep.valued("p")


def test_the_fake_fast_worker_of_the_hostile_tests_is_not_first():
    """Issue 9: a free peer advertising tokens_per_s = 1e9 got every job first."""
    q = RouteQuery(model=MODEL)
    honest = [offer(f"w{i}", tokens_per_s=80.0 + i) for i in range(3)]
    fake = offer("a-fake", tokens_per_s=1e9, first_token_ms=0.001)
    ranked = peers(rank([fake, *honest], q, Reputation(), NOW))  # a requester with no history yet
    assert ranked[0] == "w2" and ranked.index("a-fake") > 0
    rep = Reputation()  # and with history, measured on its own jobs
    for o in honest:
        rep.success(o.peer_id)
        rep.observe(o.peer_id, tokens_per_s=o.tokens_per_s, first_token_ms=150.0)
    assert peers(rank([fake, *honest], q, rep, NOW))[-1] == "a-fake"


def test_exact_checkable_workers_rank_first():
    """The checking regime orders before price and free slots: the requester's own class of exact numerics,
    then any other exact class, then the noisy workers; ``exact_first=False`` gives today's order."""
    rep = Reputation()
    market = [
        offer("noisy-cheap", price_per_1k=1),
        offer("other-class", price_per_1k=5, numerics="b" * 16),
        offer("our-class-full", price_per_1k=9, numerics="a" * 16, slots_free=0),
        offer("our-class", price_per_1k=9, numerics="a" * 16),
    ]
    q = RouteQuery(model=MODEL, numerics="a" * 16)
    assert peers(rank(market, q, rep, NOW)) == ["our-class", "our-class-full", "other-class", "noisy-cheap"]
    # a requester with no class of its own: every exact claim before the noisy ones
    assert peers(rank(market, RouteQuery(model=MODEL), rep, NOW)) == [
        "other-class", "our-class", "our-class-full", "noisy-cheap"
    ]  # fmt: skip
    assert peers(rank(market, dataclasses.replace(q, exact_first=False), rep, NOW))[0] == "noisy-cheap"
    # the regime orders, it never filters: a market of noisy workers is served as before
    noisy = [o for o in market if not o.numerics]
    assert peers(rank(noisy, q, rep, NOW)) == ["noisy-cheap"]
