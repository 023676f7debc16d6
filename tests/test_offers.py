"""Offers over real libp2p GossipSub, several in-process nodes on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import time
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2

from node.errors import WireError
from node.market.offers import (
    GOSSIP_RATE_LIMIT,
    MAX_OFFER_BYTES,
    REFUSED_FULL,
    REFUSED_MODEL_FULL,
    REFUSED_NO_BASE,
    REFUSED_OLDER,
    REFUSED_RATE,
    REFUSED_SLOTS,
    SYNC_PIECE_BYTES,
    TOPIC,
    Advertiser,
    OfferBook,
    OfferGossip,
    _check_synced,
    check_delta,
    check_offer,
    parse_offer,
    sign_delta,
)
from node.market.routing import Reputation, RouteQuery
from node.net.host import HostConfig
from node.net.identity import Identity, load_or_create_account
from node.net.network import Network
from node.protocol.messages import ModelInfo, Offer, OfferDelta, OffersBatch
from node.protocol.wire import decode, encode

from . import factories
from .factories import MODEL, signed_offer

# a valid address of 224 characters (an address may be up to 256)
LONG_ADDR = "/dns4/" + ".".join(c * 60 for c in "xyz") + ".vvvvvvvvvvvvvv.example.org/tcp/4001"


def make_offer(identity: Identity, seq: int, expires_at: float, **changes) -> Offer:
    return signed_offer(identity, seq, expires_at, **changes)


@asynccontextmanager
async def node(nursery, tmp_path, name, bootstrap=()):
    identity = Identity.load(tmp_path / name)
    host = Network(identity, HostConfig(bootstrap=tuple(bootstrap)))
    await nursery.start(host.run)
    gossip = OfferGossip(host, OfferBook())
    await nursery.start(gossip.run)
    yield host, gossip


def test_offer_checks(tmp_path):
    account = load_or_create_account(tmp_path, insecure_dev_key=True, chain_id=31337)
    me = Identity.load(tmp_path / "me", account=account)
    other = Identity.load(tmp_path / "other")
    now = time.time()
    good = make_offer(me, 1, now + 60)
    assert check_offer(good, me.peer_id, now) is None
    assert parse_offer(encode(good), me.peer_id, now) == good
    assert check_offer(good, other.peer_id, now) == "published by another peer than it names"
    assert check_offer(dataclasses.replace(good, price_per_1k=5), me.peer_id, now) == "bad signature"
    assert check_offer(good, me.peer_id, now + 61) == "expired"
    assert check_offer(make_offer(me, 1, now + 10_000), me.peer_id, now) == "expiry too far ahead"
    stolen = make_offer(other, 1, now + 60, payee=me.payee, binding=me.binding)  # my address on their offer
    assert check_offer(stolen, other.peer_id, now) == "payee not bound to the peer"
    with pytest.raises(WireError, match="over 8192"):
        parse_offer(b"\0" * 70_000, me.peer_id, now)


def test_book_keeps_the_newest_and_drops_expired(tmp_path):
    me = Identity.load(tmp_path)
    book = OfferBook()
    assert book.add(make_offer(me, 2, 100.0))
    assert not book.add(make_offer(me, 1, 200.0))  # older seq loses
    assert book.live(99.0)[0].seq == 2
    assert book.live(100.0) == []


async def test_offers_propagate_to_every_node_and_expire(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with node(nursery, tmp_path, "a") as (a, gossip_a):
                boot = a.addrs()
                async with node(nursery, tmp_path, "b", boot) as (b, gossip_b):
                    async with node(nursery, tmp_path, "c", boot) as (c, gossip_c):
                        advertiser = Advertiser(
                            gossip_c, lambda seq, exp: make_offer(c.identity, seq, exp), interval_s=0.5, ttl_s=2.0
                        )
                        await nursery.start(advertiser.run)
                        for gossip in (gossip_a, gossip_b):
                            offers = await gossip.wait_for(lambda live: any(o.peer_id == c.peer_id for o in live))
                            (offer,) = [o for o in offers if o.peer_id == c.peer_id]
                            assert offer.models[0].cid == MODEL and offer.signature
                        # a forged offer (c's peer id, signed by b) is dropped; b's own, sent after it, arrives
                        forged = make_offer(b.identity, 2**62, time.time() + 30, peer_id=c.peer_id)  # would win
                        await b.pubsub.publish(TOPIC, encode(forged))
                        await b.pubsub.publish(TOPIC, encode(make_offer(b.identity, 1, time.time() + 30)))
                        await gossip_a.wait_for(lambda live: any(o.peer_id == b.peer_id for o in live))
                        assert gossip_a.book.offers[c.peer_id].seq < 2**62
                        # when c stops advertising, its offer expires everywhere
                        nursery.cancel_scope.cancel()
    assert [o for o in gossip_a.book.live(time.time() + 3) if o.peer_id == c.peer_id] == []


async def test_a_late_joiner_gets_the_market_at_once_and_forgeries_are_dropped(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with node(nursery, tmp_path, "a") as (a, gossip_a):
                worker_identity = Identity.load(tmp_path / "w")
                genuine = make_offer(worker_identity, 1, time.time() + 60)
                forged = make_offer(worker_identity, 2, time.time() + 60, price_per_1k=1)
                forged = dataclasses.replace(forged, price_per_1k=0)  # altered after signing
                gossip_a.book.add(genuine)
                gossip_a.book.add(dataclasses.replace(forged, peer_id="someone"))  # the book does not check
                async with node(nursery, tmp_path, "late", a.addrs()) as (_, late):
                    # no gossip happened: the offers came with the sync at start-up
                    assert [o.peer_id for o in late.book.live(time.time())] == [worker_identity.peer_id]
                    assert late.book.offers[worker_identity.peer_id].seq == 1
                nursery.cancel_scope.cancel()


# ------------------------------------------------ validation of every field (issue 9, item 6)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"expires_at": NAN}, "expires_at is not a finite number"),
        ({"expires_at": INF}, "expires_at is not a finite number"),
        ({"tokens_per_s": NAN}, "tokens_per_s is not a finite number"),
        ({"tokens_per_s": -1.0}, "tokens_per_s -1.0 is out of range"),
        ({"tokens_per_s": 1e9}, "tokens_per_s 1000000000.0 is out of range"),
        ({"first_token_ms": -INF}, "first_token_ms is not a finite number"),
        ({"first_token_ms": -3.0}, "first_token_ms -3.0 is out of range"),
        ({"slots_total": 2**63, "slots_free": 1}, "slots_total 9223372036854775808 is out of range"),
        ({"slots_total": 0, "slots_free": 0}, "slots_total 0 is out of range"),
        ({"slots_free": 5}, "slots_free 5 is out of range"),
        ({"slots_free": -1}, "slots_free -1 is out of range"),
        ({"price_per_1k": -1}, "price_per_1k -1 is out of range"),
        ({"chain_id": -1}, "chain_id -1 is out of range"),
        ({"seq": -1}, "seq -1 is out of range"),
        ({"addrs": ["/ip4/127.0.0.1/tcp/1"] * 3000}, "3000 addresses, more than 32"),
        ({"addrs": ["/ip4/" + "1" * 300]}, "an address is longer than 256"),
        ({"addrs": ["/ip4/0.0.0.0/tcp/4001"]}, "address '/ip4/0.0.0.0/tcp/4001' is a wildcard"),
        ({"addrs": ["/ip4/10.0.0.2/tcp/4001", "/ip6/::/tcp/4001"]}, "address '/ip6/::/tcp/4001' is a wildcard"),
        ({"addrs": ["/ip4/10.0.0.2/tcp/4001/garbage"]}, "address '/ip4/10.0.0.2/tcp/4001/garbage' is not a"),
        ({"addrs": ["/unix/tmp/x"]}, "address '/unix/tmp/x' does not start with /ip4"),
        ({"models": []}, "0 models, not 1 to 8"),
        ({"models": [ModelInfo(MODEL, "m", 2048)] * 9}, "9 models, not 1 to 8"),
        ({"models": [ModelInfo(MODEL, "m", 0)]}, "a model's context_size 0 is out of range"),
        ({"models": [ModelInfo(MODEL, "m", 2**40)]}, "a model's context_size 1099511627776 is out of range"),
        ({"models": [ModelInfo("b" * 200, "m", 2048)]}, "a model's cid is longer than 128"),
        ({"models": [ModelInfo(MODEL, "m" * 300, 2048)]}, "a model's name is longer than 256"),
        ({"hardware": "h" * 2000}, "hardware is longer than 1024"),
        ({"version": "v" * 200}, "version is longer than 128"),
        ({"numerics": "n" * 65}, "numerics is longer than 64"),
        ({"escrow": "not an address"}, "escrow is not an Ethereum address"),
    ],
)
def test_every_field_is_bounded(tmp_path, changes, reason):
    """An offer with NaN expiry (or any other field out of bounds) was accepted, and handed out on sync."""
    me = Identity.load(tmp_path)
    now = time.time()
    bad = make_offer(me, **{"seq": 1, "expires_at": now + 60, **changes})  # properly signed: only the field is wrong
    problem = check_offer(bad, me.peer_id, now)
    assert problem is not None and problem.startswith(reason)
    with pytest.raises(WireError) as refused:  # what the topic validator and the sync do
        parse_offer(encode(bad), me.peer_id, now)
    assert str(refused.value).endswith(problem) or f"over {MAX_OFFER_BYTES}" in str(refused.value)


def test_an_offer_over_the_size_cap_is_refused_before_it_is_decoded(tmp_path):
    me = Identity.load(tmp_path)
    now = time.time()
    big = make_offer(me, 1, now + 60, addrs=[LONG_ADDR] * 32, hardware="h" * 1000)
    assert len(encode(big)) > MAX_OFFER_BYTES  # every field within its own cap, the whole over the cap
    with pytest.raises(WireError, match=f"over {MAX_OFFER_BYTES}"):
        parse_offer(encode(big), me.peer_id, now)


def test_a_real_worker_offer_is_well_within_the_caps(tmp_path):
    me = Identity.load(tmp_path)
    now = time.time()
    offer = make_offer(me, 1, now + 60, addrs=["/ip4/192.168.1.20/tcp/4001", "/ip6/::1/tcp/4001"],
                       hardware="AMD EPYC 9654 96-Core Processor × 192 cores, 1536 GiB RAM, "
                       + ", ".join(["NVIDIA H200 (141 GiB)"] * 8))  # fmt: skip
    assert check_offer(offer, me.peer_id, now) is None and len(encode(offer)) < MAX_OFFER_BYTES // 4


# ------------------------------------------------------------ the book's caps (issue 9, item 6)


def book_offer(peer: str, *, seq: int = 1, expires_at: float = 1e12, models=(MODEL,)) -> factories.Offer:
    return factories.offer(peer, seq=seq, expires_at=expires_at, models=[ModelInfo(m, "m", 2048) for m in models])


def test_the_book_is_capped_per_model_and_in_total():
    book = OfferBook(max_offers=6, max_per_model=4)
    for i in range(4):
        assert book.admit(book_offer(f"a{i}")) is None
    assert book.admit(book_offer("a4")) == REFUSED_MODEL_FULL
    assert book.admit(book_offer("b0", models=("other",))) is None
    assert book.admit(book_offer("b1", models=("other",))) is None
    assert book.admit(book_offer("b2", models=("third",))) == REFUSED_FULL
    assert len(book) == 6
    # peers already in the book keep refreshing their offers
    assert book.admit(book_offer("a0", seq=2)) is None and book.offers["a0"].seq == 2
    assert book.admit(book_offer("a0", seq=2)) == REFUSED_OLDER
    # an update may not add a model that is full
    assert book.admit(book_offer("b0", seq=2, models=("other", MODEL))) == REFUSED_MODEL_FULL
    # expired offers make room
    assert book.admit(book_offer("a1", seq=2, expires_at=5.0)) is None
    book.clock = lambda: 10.0
    assert book.admit(book_offer("a5")) is None and "a1" not in book.offers


def test_a_full_book_keeps_peers_we_value_before_strangers():
    valued = {"friend"}
    book = OfferBook(max_offers=3, max_per_model=10, valued=valued.__contains__)
    for name in ("s0", "s1", "s2"):
        assert book.add(book_offer(name))
    assert book.admit(book_offer("stranger")) == REFUSED_FULL
    assert book.admit(book_offer("friend")) is None  # displaces the stranger admitted last
    assert set(book.offers) == {"s0", "s1", "friend"}
    valued.update({"s0", "s1"})
    assert book.admit(book_offer("friend2")) == REFUSED_FULL  # nobody left to displace: all are valued


def test_new_peers_from_gossip_are_rate_limited():
    now = [0.0]
    book = OfferBook(new_peers_per_s=2.0, new_peer_burst=3.0, clock=lambda: now[0], valued={"friend"}.__contains__)
    assert [book.admit(book_offer(f"p{i}"), rate_limited=True) for i in range(4)] == [None, None, None, REFUSED_RATE]
    assert book.admit(book_offer("friend"), rate_limited=True) is None  # peers we value are never held back
    assert book.admit(book_offer("p0", seq=2), rate_limited=True) is None  # nor are known peers' updates
    assert book.admit(book_offer("p4")) is None  # a sync answer is bounded by itself
    now[0] = 0.5
    assert book.admit(book_offer("p5"), rate_limited=True) is None
    assert book.admit(book_offer("p6"), rate_limited=True) == REFUSED_RATE


def test_the_sync_answer_is_built_once_shared_and_in_pieces():
    now = [100.0]
    book = OfferBook(max_per_model=1000, clock=lambda: now[0], valued={"p0999"}.__contains__)
    fat = [LONG_ADDR] * 8  # about 2 KB an offer
    for i in range(1000):
        book.add(dataclasses.replace(book_offer(f"p{i:04d}"), addrs=fat))
    frames = book.sync_frames(now[0])
    assert book.sync_frames(now[0]) is frames  # shared, not rebuilt
    assert all(len(f) <= SYNC_PIECE_BYTES for f in frames) and len(frames) > 20
    offers = [decode(data) for f in frames for data in decode(f[4:]).offers]
    assert len(offers) == 1000 and offers[0].peer_id == "p0999"  # peers we value first
    book.add(book_offer("p0001", seq=2))
    assert book.sync_frames(now[0] + 0.5) is frames  # a changing book is rebuilt at most once a second
    now[0] += 1.0
    rebuilt = book.sync_frames(now[0])
    assert rebuilt is not frames
    assert isinstance(decode(rebuilt[0][4:]), OffersBatch)


async def test_a_sync_answer_of_many_pieces_arrives_whole(tmp_path):
    from libp2p.crypto.ed25519 import create_new_key_pair

    from node.net.identity import peer_id_of

    now = time.time()
    offers = []
    for _ in range(250):
        key_pair = create_new_key_pair()
        identity = Identity(key_pair, peer_id_of(key_pair), None, b"")
        offers.append(make_offer(identity, 1, now + 60, addrs=[LONG_ADDR] * 2))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with node(nursery, tmp_path, "a") as (a, gossip_a):
                for offer in offers:
                    assert gossip_a.book.add(offer)
                assert len(gossip_a.book.sync_frames(time.time())) > 2
                async with node(nursery, tmp_path, "late", a.addrs()) as (_, late):
                    assert {o.peer_id for o in late.book.live(time.time())} == {o.peer_id for o in offers}
                nursery.cancel_scope.cancel()


def test_the_sync_budget_counts_streams_and_bytes_per_peer():
    from node.market.offers import SYNC_BYTES_PER_PEER, SYNC_STREAMS_PER_PEER, SYNC_STREAMS_TOTAL, SyncBudget

    budget = SyncBudget()
    for _ in range(SYNC_STREAMS_PER_PEER):
        assert budget.open("p", 0.0) is None
    assert "sync streams already" in budget.open("p", 0.0)
    budget.close("p")
    budget.charge("p", 0.0, SYNC_BYTES_PER_PEER)
    assert "in the last minute" in budget.open("p", 30.0)
    assert budget.open("p", 61.0) is None  # the minute has passed
    for i in range(SYNC_STREAMS_TOTAL - SYNC_STREAMS_PER_PEER):
        assert budget.open(f"q{i}", 61.0) is None
    assert "sync streams are being served" in budget.open("r", 61.0)


def test_a_restarted_worker_advertises_above_its_old_offers():
    """Books keep the highest seq per peer: a worker restarted a second later must not start below its last offer
    (it started at 1 again, and books refused its offers until the old one expired)."""

    class Clock:
        now = 1_800_000_000.0

        def clock(self):
            return self.now

    gossip = Clock()
    before = Advertiser(gossip, lambda seq, expires: None)
    before.seq += 1_000  # a thousand offers published, at most one a second (min_gap_s)…
    gossip.now += 1_000 * before.min_gap_s + 1.0  # …then a crash and a restart a second later
    assert Advertiser(gossip, lambda seq, expires: None).seq > before.seq


def test_a_full_model_keeps_the_best_the_cheapest_and_the_fastest_not_the_first():
    """Issue 21: with more workers on a model than its share of the book, a newcomer takes the place of the worst
    stranger when it is better (sample_key: price, speed, first token), or among the cheapest or fastest eighth."""
    book = OfferBook(max_per_model=16, new_peer_burst=3.0, new_peers_per_s=0.001, valued={"m0"}.__contains__)

    def worker(name, price=100, tps=50.0, ftt=500.0):
        return dataclasses.replace(book_offer(name), price_per_1k=price, tokens_per_s=tps, first_token_ms=ftt)

    for i in range(16):
        assert book.admit(worker(f"m{i}", price=100 + i)) is None
    assert book.admit(worker("worse", price=300)) == REFUSED_MODEL_FULL
    # refused strangers spend none of the new-peer budget (3 here): a better newcomer still gets in
    for i in range(10):
        assert book.admit(worker(f"worse{i}", price=300), rate_limited=True) == REFUSED_MODEL_FULL
    assert book.admit(worker("better", price=50), rate_limited=True) is None
    assert "m15" not in book.offers  # the worst went (the dearest of equals)
    # cheap but slow, and fast but dear: worse overall than what is held, but kept for their price or speed
    assert book.admit(worker("cheap", price=1, tps=1.0, ftt=60_000.0)) is None
    assert book.admit(worker("fast", price=10_000, tps=5_000.0)) is None
    # a claim past the plausible bounds counts as the worst, so it buys no place
    assert book.admit(worker("liar", price=100, tps=1e6, ftt=0.5)) == REFUSED_MODEL_FULL
    # strangers never displace a peer we value, however good they are
    for i in range(40):
        book.admit(worker(f"best{i}", price=1, tps=1000.0, ftt=50.0))
    assert "m0" in book.offers and len(book) == 16


def test_a_capped_book_routes_like_a_full_one():
    """1,000 workers on one model arrive in random order into a book capped at 256: the book's first choice is the
    full market's, and it holds the full market's best tenth."""
    import random

    from node.market.routing import Reputation, RouteQuery, rank

    rng = random.Random(21)
    workers = [
        dataclasses.replace(
            book_offer(f"w{i:04d}"),
            price_per_1k=rng.randint(10, 1000),
            tokens_per_s=rng.uniform(5, 120),
            first_token_ms=rng.uniform(50, 2000),
        )
        for i in range(1000)
    ]
    capped, full = OfferBook(), OfferBook(max_offers=10_000, max_per_model=10_000)
    for offer in workers:
        capped.add(offer)
        full.add(offer)
    assert len(capped) == 256 and len(full) == 1000
    query, reputation = RouteQuery(model=MODEL), Reputation()
    best = [o.peer_id for o in rank(full.live(0.0), query, reputation, 0.0)]
    assert rank(capped.live(0.0), query, reputation, 0.0, limit=1)[0].peer_id == best[0]
    assert set(best[:100]) <= set(capped.offers)


# ------------------------------------------------ GossipSub and connection settings (issue 21)


def test_the_hosts_gossip_and_connection_settings_reach_py_libp2p(tmp_path):
    config = HostConfig(gossip_degree=5, gossip_degree_low=3, gossip_degree_high=9, gossip_rate_limit=4.0,
                        min_connections=2, low_watermark=10, high_watermark=20, max_connections=50)  # fmt: skip
    host = Network(Identity.load(tmp_path / "h"), config)
    g = host.gossipsub
    assert (g.degree, g.degree_low, g.degree_high, g.max_messages_per_topic_per_second) == (5, 3, 9, 4.0)
    connections = host.libp2p.get_network().connection_config
    assert (connections.min_connections, connections.low_watermark, connections.high_watermark) == (2, 10, 20)
    assert connections.max_connections == 50 and connections.max_connections_per_peer == 1
    defaults = Network(Identity.load(tmp_path / "d")).libp2p.get_network().connection_config
    assert (defaults.low_watermark, defaults.high_watermark) == (16, 32)  # not py-libp2p's 100/200


def test_the_offers_topic_has_its_own_gossip_rate_limit(tmp_path):
    host = Network(Identity.load(tmp_path / "h"), HostConfig(gossip_rate_limit=3.0))
    host.set_topic_rate_limit(TOPIC, 50.0)  # what OfferGossip.run does, with GOSSIP_RATE_LIMIT
    sender = ID.from_base58(Identity.load(tmp_path / "p").peer_id)

    def accepted(topic: str, n: int) -> int:
        message = rpc_pb2.Message(topicIDs=[topic])
        return sum(host.gossipsub._check_spam_protection(sender, message) for _ in range(n))

    assert accepted("another/topic", 10) == 3  # the host's default: the rest are dropped
    assert accepted(TOPIC, 60) == 50


async def test_offer_gossip_sets_the_offers_topic_rate_limit(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with node(nursery, tmp_path, "a") as (a, _):
                assert a.gossipsub.topic_rate_limits[TOPIC] == GOSSIP_RATE_LIMIT > 100
                nursery.cancel_scope.cancel()


# ------------------------------------------------ offer deltas (issue 21)


def delta_of(identity: Identity, base: Offer, seq: int, **changes) -> OfferDelta:
    fields = {"slots_free": base.slots_free, "price_per_1k": base.price_per_1k, "expires_at": base.expires_at}
    fields.update(changes)
    return sign_delta(identity, OfferDelta(identity.peer_id, base.seq, seq, **fields))


def test_deltas_are_checked_like_offers(tmp_path):
    me, other = Identity.load(tmp_path / "me"), Identity.load(tmp_path / "other")
    now = time.time()
    base = make_offer(me, 5, now + 30)
    delta = delta_of(me, base, 6, slots_free=0, expires_at=now + 60)
    assert parse_offer(encode(delta), me.peer_id, now) == delta
    assert check_delta(delta, other.peer_id, now) == "published by another peer than it names"
    assert check_delta(dataclasses.replace(delta, price_per_1k=1), me.peer_id, now) == "bad signature"
    assert check_delta(delta_of(other, base, 6), other.peer_id, now) is None  # signed by its own peer: fine…
    assert "seq" in check_delta(delta_of(me, base, 5), me.peer_id, now)  # …but never at or below its base
    assert check_delta(delta, me.peer_id, now + 60) == "expired"
    assert check_delta(delta_of(me, base, 6, expires_at=now + 10_000), me.peer_id, now) == "expiry too far ahead"


def test_a_delta_amends_its_base_offer_and_travels_with_it_in_a_sync(tmp_path):
    me = Identity.load(tmp_path / "me")
    now = time.time()
    base = make_offer(me, 5, now + 30, slots_total=2, slots_free=2, price_per_1k=0)
    book = OfferBook()
    assert book.amend(delta_of(me, base, 6)) == REFUSED_NO_BASE  # nothing to amend yet
    assert book.add(base)
    later = delta_of(me, base, 7, slots_free=0, price_per_1k=3, expires_at=now + 90)
    assert book.amend(later) is None
    held = book.offers[me.peer_id]
    assert (held.seq, held.slots_free, held.price_per_1k, held.expires_at) == (7, 0, 3, now + 90)
    assert held.models == base.models and held.addrs == base.addrs
    assert book.amend(delta_of(me, base, 6)) == REFUSED_OLDER
    assert book.amend(delta_of(me, base, 8, slots_free=3)) == REFUSED_SLOTS  # more than the base's 2
    assert book.amend(delta_of(me, dataclasses.replace(base, seq=4), 9)) == REFUSED_NO_BASE
    # the offer lives on past its base's expiry, and routing sees the new price
    assert book.live(now + 60) == [held]
    assert book.best(RouteQuery(MODEL, max_price_per_1k=2), Reputation(), now) is None
    # a joining node gets the signed base and the delta, checks both and holds what we hold
    (piece,) = book.sync_frames(now)
    batch = decode(piece[4:])  # the frame's length prefix
    assert isinstance(batch, OffersBatch) and len(batch.offers) == 2
    joined = OfferBook()
    for item, data in _check_synced(batch.offers, now):
        (joined.amend(item, data=data) if isinstance(item, OfferDelta) else joined.add(item, data=data))
    assert joined.offers == book.offers
    # later, the base's own expiry has passed (a full offer goes out every 5 minutes) and the delta keeps it
    # alive: a joining node takes the pair, though it would drop the base alone (this emptied the books of
    # bench/scale.py's requesters once workers stopped sending a full offer for every newcomer)
    (piece,) = book.sync_frames(now + 60)
    later_joined = OfferBook()
    for item, data in _check_synced(decode(piece[4:]).offers, now + 60):
        (later_joined.amend(item, data=data) if isinstance(item, OfferDelta) else later_joined.add(item, data=data))
    assert later_joined.live(now + 60) == [held]
    assert _check_synced([encode(base)], now + 60) == []  # the expired base alone
    assert _check_synced([encode(base), encode(delta_of(me, base, 8, expires_at=now + 50))], now + 60) == []
    forged = dataclasses.replace(base, price_per_1k=7)  # kept alive by a good delta, but not what was signed
    assert [type(i) for i, _ in _check_synced([encode(forged), encode(later)], now + 60)] == [OfferDelta]
    # a new full offer replaces base and delta
    assert book.add(make_offer(me, 10, now + 30, slots_total=2, slots_free=1))
    assert len(decode(book.sync_frames(now + 2)[0][4:]).offers) == 1


def test_a_delta_late_past_the_ttl_brings_the_expired_offer_back(tmp_path):
    """On a busy network a worker's deltas can arrive after its offer expired here; the book keeps the expired
    base, so the next delta on it revives the offer instead of waiting minutes for a full one."""
    me = Identity.load(tmp_path / "me")
    now = time.time()
    base = make_offer(me, 5, now + 30, slots_total=4, slots_free=4)
    book = OfferBook(max_offers=2)
    assert book.add(base) and book.amend(delta_of(me, base, 6, expires_at=now + 40)) is None
    assert book.live(now + 41) == []  # expired: out of routing and of sync answers
    assert book.sync_frames(now + 41) == []
    assert book.amend(delta_of(me, base, 7, slots_free=2, expires_at=now + 45)) is None
    back = book.live(now + 42)
    assert [(o.seq, o.slots_free) for o in back] == [(7, 2)] and back[0].models == base.models
    assert len(decode(book.sync_frames(now + 42)[0][4:]).offers) == 2  # the base and the delta, as before
    # a delta on another base, or with more free slots than the base has, revives nothing
    assert book.live(now + 46) == []
    assert book.amend(delta_of(me, dataclasses.replace(base, seq=4), 8, expires_at=now + 60)) == REFUSED_NO_BASE
    assert book.amend(delta_of(me, base, 8, slots_free=5, expires_at=now + 60)) == REFUSED_SLOTS
    # the kept bases are bounded like the book
    for i in range(3):
        other = Identity.load(tmp_path / f"o{i}")
        assert book.add(make_offer(other, 1, now + 50 + i))
        book.live(now + 60 + i)
    assert len(book._dormant) <= book.max_offers


def test_the_advertiser_sends_deltas_between_full_offers(tmp_path):
    me = Identity.load(tmp_path / "me")
    state = {"free": 1, "addrs": []}

    class Gossip:
        now = 1_800_000_000.0
        host = type("H", (), {"identity": me})()
        sent: list = []

        def clock(self):
            return self.now

        async def publish(self, offer):
            self.sent.append(offer)

        async def publish_delta(self, delta):
            self.sent.append(delta)

    gossip = Gossip()
    advertiser = Advertiser(
        gossip,
        lambda seq, expires: make_offer(me, seq, expires, slots_free=state["free"], addrs=state["addrs"]),
        interval_s=10,
        ttl_s=30,
        min_gap_s=0,
        full_interval_s=300,
    )

    async def main():
        await advertiser.publish_next()  # first: full
        state["free"] = 0
        gossip.now += 10
        await advertiser.publish_next()  # slots changed: a delta
        state["addrs"] = ["/ip4/127.0.0.1/tcp/4001"]
        gossip.now += 10
        await advertiser.publish_next()  # an address changed: full
        gossip.now += 301
        await advertiser.publish_next()  # nothing changed, but a full offer is due
        gossip.now += 10
        await advertiser.publish_next()  # still here: a delta
        advertiser._full_due = True  # (what a newly subscribed neighbour sets)
        await advertiser.publish_next()  # full, for the newcomer

    trio.run(main)
    assert [type(m).__name__ for m in gossip.sent] == ["Offer", "OfferDelta", "Offer", "Offer", "OfferDelta", "Offer"]
    delta = gossip.sent[1]
    assert delta.base_seq == gossip.sent[0].seq and delta.slots_free == 0
    assert check_delta(delta, me.peer_id, delta.expires_at - 30) is None
    assert len(encode(delta)) < len(encode(gossip.sent[0])) - 200  # this bare offer's 455 bytes; a real one ~800


async def test_a_node_that_gets_a_delta_without_its_base_asks_the_forwarder_for_it(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with node(nursery, tmp_path, "w") as (w, gossip_w):
                async with node(nursery, tmp_path, "b", w.addrs()) as (b, gossip_b):
                    while b.peer_id not in {str(p) for p in w.pubsub.peer_topics.get(TOPIC, ())}:
                        await trio.sleep(0.05)  # polling: b's subscription reaches w
                    now = time.time()
                    base = make_offer(w.identity, 5, now + 30, slots_total=2, slots_free=2)
                    gossip_w.book.add(base)  # held by w only: b joined before it, and never saw it published
                    delta = delta_of(w.identity, base, 6, slots_free=1, expires_at=now + 40)
                    await gossip_w.publish_delta(delta)
                    live = await gossip_b.wait_for(lambda live: any(o.seq == 6 for o in live))
                    (held,) = [o for o in live if o.peer_id == w.peer_id]
                    assert (held.slots_free, held.expires_at, held.models) == (1, now + 40, base.models)
                    nursery.cancel_scope.cancel()
