"""The market's policies at scale: the book's routing columns decide exactly as ``rank`` does (issue 21)."""

from __future__ import annotations

import random

from node.market.offers import LiveOffers, OfferBook, best_offer
from node.market.routing import ModelColumns, Reputation, RouteQuery, rank
from node.protocol.messages import ModelInfo, Offer

from . import factories
from .factories import MODEL

NOW = 1_000_000.0
OTHER = "bafy-other-model"


def random_offer(rng: random.Random, peer: str, seq: int = 1) -> Offer:
    models = rng.choice([[MODEL], [MODEL], [MODEL, OTHER], [OTHER]])
    return factories.offer(
        peer,
        seq=seq,
        models=[ModelInfo(cid, "m", 2048) for cid in models],
        price_per_1k=rng.choice([0, 0, 1, 2, 5, 5, 20, 2**60 + 1, 2**60 + 2, 2**64 - 1]),
        chain_id=rng.choice([1, 1, 2, 2**63 - 37]),
        escrow=rng.choice(["0xE", "0xe", "0xF", ""]),
        slots_free=rng.choice([0, 1, 3]),
        expires_at=NOW + rng.choice([-1, 0, 1, 30, 30, 30]),
        tokens_per_s=rng.choice([0.0, 10.0, 55.5, 55.5, 100.0, 3e5, float("nan")]),
        first_token_ms=rng.choice([0.5, 10.0, 40.0, 40.0, 250.0, 1e7, float("inf")]),
        numerics=rng.choice(["", "cpu", "avx2-f32", "cuda-f16"]),
    )


def random_reputation(rng: random.Random, peers: list[str]) -> Reputation:
    rep = Reputation()
    for peer in rng.sample(peers, len(peers) // 2):
        roll = rng.random()
        if roll < 0.2:
            rep.latency(peer, rng.choice([1.0, 5.0, 5.0, 80.0]))
        elif roll < 0.4:
            rep.success(peer)
            rep.observe(peer, tokens_per_s=rng.choice([20.0, 90.0, None]), first_token_ms=rng.choice([30.0, None]))
        elif roll < 0.55:
            rep.failure(peer, NOW - rng.choice([1, 3600]))  # banned now, or long ago
        elif roll < 0.6:
            rep.ban(peer, NOW - 1, rng.choice([0.5, 600]))  # condemned: over, or not yet
        else:
            rep.success(peer)
    return rep


def random_query(rng: random.Random, peers: list[str]) -> RouteQuery:
    return RouteQuery(
        model=rng.choice([MODEL, MODEL, OTHER, "nobody-serves-it"]),
        max_price_per_1k=rng.choice([None, None, 5, 0, 2**60 + 1, 2**200]),
        chain_id=rng.choice([1, 2, 2**63 - 37]),
        escrow=rng.choice(["0xE", "0xf", ""]),
        pinned_peer=rng.choice([None] * 8 + peers[:2]),
        free_only=rng.random() < 0.2,
        numerics=rng.choice(["", "avx2-f32", "cuda-f16"]),
        exact_first=rng.random() < 0.8,
    )


def reference(offers: list[Offer], query, rep, now, exclude) -> Offer | None:
    ranked = rank([o for o in offers if o.peer_id not in exclude], query, rep, now, limit=1)
    return ranked[0] if ranked else None


def test_the_books_columns_route_exactly_like_rank_on_random_books():
    rng = random.Random(21)
    decided = 0
    for book_size in [1, 2, 3, 5, 8, 40, 200] * 12:
        peers = [f"p{i:03d}" for i in range(book_size)]
        book = OfferBook(max_offers=10_000, max_per_model=10_000, clock=lambda: NOW - 10)
        for peer in peers:
            book.add(random_offer(rng, peer))
        for peer in rng.sample(peers, book_size // 3):  # refreshed (other models, prices, slots), or gone
            book.add(random_offer(rng, peer, seq=2))
        rep = random_reputation(rng, peers)
        for round_ in range(6):
            live = book.live(NOW - 10)  # what a requester holds; each decision sees the offers as of NOW
            assert isinstance(live, LiveOffers)
            query = random_query(rng, peers)
            exclude = set(rng.sample(peers, min(len(peers), rng.choice([0, 0, 1, 3]))))
            expected = reference(list(live), query, rep, NOW, exclude)
            assert best_offer(live, query, rep, NOW, exclude=exclude) == expected, (book_size, round_, query)
            decided += expected is not None
            # the reputation changes between decisions, as after a job: the columns follow
            peer = rng.choice(peers)
            change = rng.randrange(4)
            if change == 0:
                rep.success(peer)
            elif change == 1:
                rep.failure(peer, NOW)
            elif change == 2:
                rep.latency(peer, rng.choice([2.0, 50.0]))
            else:
                rep.observe(peer, tokens_per_s=rng.choice([5.0, 500.0]), first_token_ms=20.0)
    assert decided > 100  # most queries found a worker: the comparison was not between two Nones


def test_a_changed_book_is_routed_by_rank_and_still_agrees():
    book = OfferBook(clock=lambda: NOW)
    book.add(factories.offer("a", expires_at=NOW + 30, price_per_1k=0))
    live = book.live(NOW)
    book.add(factories.offer("b", expires_at=NOW + 30, price_per_1k=0))  # after the caller's snapshot
    query = RouteQuery(model=MODEL)
    assert best_offer(live, query, Reputation(), NOW).peer_id == "a"  # the snapshot's offers, not the book's
    assert best_offer(book.live(NOW), query, Reputation(), NOW).peer_id == "a"
    assert best_offer(book.live(NOW), query, Reputation(), NOW, exclude={"a"}).peer_id == "b"


def test_columns_keep_rows_dense_through_removals():
    rng = random.Random(3)
    columns = ModelColumns(capacity=2)
    held: dict[str, Offer] = {}
    for step in range(400):
        peer = f"p{rng.randrange(30)}"
        if peer in held and rng.random() < 0.4:
            columns.remove(peer)
            del held[peer]
        else:
            held[peer] = random_offer(rng, peer, seq=step)
            columns.put(held[peer])
        assert len(columns) == len(held) and sorted(columns.peers) == sorted(held)
        assert all(columns.offers[columns.row[p]] is o for p, o in held.items())
    n = len(columns)
    assert list(columns.expires[:n]) == [o.expires_at for o in columns.offers]


def test_expired_offers_leave_the_book_and_its_columns():
    book = OfferBook(clock=lambda: NOW)
    book.add(factories.offer("a", expires_at=NOW + 5))
    book.add(factories.offer("b", expires_at=NOW + 5))
    book.add(factories.offer("a", expires_at=NOW + 50, seq=2))  # refreshed: lives on
    assert [o.peer_id for o in book.live(NOW + 10)] == ["a"]
    assert book.best(RouteQuery(model=MODEL), Reputation(), NOW + 10).peer_id == "a"
    assert book.live(NOW + 50) == [] and book.best(RouteQuery(model=MODEL), Reputation(), NOW + 50) is None
