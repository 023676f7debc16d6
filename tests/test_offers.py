"""Offers over real libp2p GossipSub, several in-process nodes on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import time
from contextlib import asynccontextmanager

import pytest
import trio

from node.errors import WireError
from node.host import Host, HostConfig
from node.identity import Identity, load_or_create_account
from node.messages import Offer
from node.offers import TOPIC, Advertiser, OfferBook, OfferGossip, check_offer, parse_offer
from node.wire import encode

from .factories import MODEL, signed_offer


def make_offer(identity: Identity, seq: int, expires_at: float, **changes) -> Offer:
    return signed_offer(identity, seq, expires_at, **changes)


@asynccontextmanager
async def node(nursery, tmp_path, name, bootstrap=()):
    identity = Identity.load(tmp_path / name)
    host = Host(identity, HostConfig(bootstrap=tuple(bootstrap)))
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
    with pytest.raises(WireError, match="over 65536"):
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
                        forged = make_offer(b.identity, 99, time.time() + 30, peer_id=c.peer_id)
                        await b.pubsub.publish(TOPIC, encode(forged))
                        await b.pubsub.publish(TOPIC, encode(make_offer(b.identity, 1, time.time() + 30)))
                        await gossip_a.wait_for(lambda live: any(o.peer_id == b.peer_id for o in live))
                        assert gossip_a.book.offers[c.peer_id].seq < 99
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
                gossip_a.book.offers["someone"] = dataclasses.replace(forged, peer_id="someone")
                async with node(nursery, tmp_path, "late", a.addrs()) as (_, late):
                    # no gossip happened: the offers came with the sync at start-up
                    assert [o.peer_id for o in late.book.live(time.time())] == [worker_identity.peer_id]
                    assert late.book.offers[worker_identity.peer_id].seq == 1
                nursery.cancel_scope.cancel()
