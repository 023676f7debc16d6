"""Capacity offers: workers advertise, everyone keeps a book of the live market.

A worker publishes a signed ``Offer`` on the GossipSub topic ``llmarket/offers/1``
every ``interval_s`` and soon after its free slots change (at most once a second,
well inside GossipSub's default limit of 10 messages per second per topic). Each
offer expires ``ttl_s`` after it was made, so a worker that disappears falls out
of every book within a minute.

Every node validates offers before GossipSub delivers or forwards them
(a topic validator): the bytes decode as an ``Offer`` of at most 64 KiB, the
offer is signed by the peer that published it, it is not expired nor dated too
far ahead, and a payee address carries a valid binding to the peer. Invalid
offers are dropped (and count against the sender in GossipSub's scoring).

The ``OfferBook`` keeps the newest offer (highest ``seq``) per peer.

Gossip only carries what is published after a node joins, so a joining node
also asks its bootstrap peers for the offers they hold
(``/llmarket/offers/1.0.0``); every offer in the answer is checked exactly like
a gossiped one, so a peer can withhold offers but not forge them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import trio
from libp2p.peer.id import ID

from node.errors import NodeError, WireError
from node.host import Host
from node.identity import Identity, verify_binding, verify_peer_signature
from node.messages import Offer, OffersBatch, OffersRequest
from node.wire import decode, encode, receive_as, send

log = logging.getLogger("node.offers")

TOPIC = "llmarket/offers/1"
SYNC_PROTOCOL = "/llmarket/offers/1.0.0"
MAX_SYNC_OFFERS = 1000
MAX_OFFER_BYTES = 64 * 1024
MAX_TTL_S = 600.0


def signing_bytes(offer: Offer) -> bytes:
    return encode(dataclasses.replace(offer, signature=b""))


def sign_offer(identity: Identity, offer: Offer) -> Offer:
    return dataclasses.replace(offer, signature=identity.sign(signing_bytes(offer)))


def check_offer(offer: Offer, publisher: str, now: float) -> str | None:
    """Why ``offer`` (as published by ``publisher``) is invalid, or None if it is valid."""
    if offer.peer_id != publisher:
        return "published by another peer than it names"
    if not verify_peer_signature(offer.peer_id, signing_bytes(offer), offer.signature):
        return "bad signature"
    if offer.expires_at <= now:
        return "expired"
    if offer.expires_at > now + MAX_TTL_S:
        return "expiry too far ahead"
    if offer.payee and not verify_binding(offer.peer_id, offer.payee, offer.binding):
        return "payee not bound to the peer"
    if offer.slots_free < 0 or offer.slots_free > offer.slots_total or offer.price_per_1k < 0:
        return "nonsensical slots or price"
    return None


def parse_offer(data: bytes, publisher: str, now: float) -> Offer:
    """Decode and check an offer. Raises ``WireError`` if either fails."""
    if len(data) > MAX_OFFER_BYTES:
        raise WireError(f"offer of {len(data)} bytes is over {MAX_OFFER_BYTES}")
    offer = decode(data, max_size=MAX_OFFER_BYTES)
    if not isinstance(offer, Offer):
        raise WireError(f"{offer.TYPE} on the offers topic")
    reason = check_offer(offer, publisher, now)
    if reason is not None:
        raise WireError(f"offer from {publisher[:12]}…: {reason}")
    return offer


@dataclasses.dataclass
class OfferBook:
    """The newest live offer of each peer."""

    offers: dict[str, Offer] = dataclasses.field(default_factory=dict)

    def add(self, offer: Offer) -> bool:
        """Keep ``offer`` if it is newer than what we have; returns whether it was kept."""
        current = self.offers.get(offer.peer_id)
        if current is not None and current.seq >= offer.seq:
            return False
        self.offers[offer.peer_id] = offer
        return True

    def live(self, now: float) -> list[Offer]:
        """Offers not yet expired (expired ones are dropped)."""
        for peer in [p for p, o in self.offers.items() if o.expires_at <= now]:
            del self.offers[peer]
        return list(self.offers.values())


class OfferGossip:
    """Receive and validate offers into ``book``; publish our own."""

    def __init__(self, host: Host, book: OfferBook, *, clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.book = book
        self.clock = clock
        self.received = trio.Event()  # set (and replaced) whenever an offer is kept

    def _validate(self, forwarder: ID, msg) -> bool:
        try:
            parse_offer(msg.data, ID(msg.from_id).to_base58(), self.clock())
        except (WireError, ValueError) as err:
            log.debug("dropping an offer relayed by %s: %s", forwarder, err)
            return False
        return True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.host.pubsub.set_topic_validator(TOPIC, self._validate, is_async_validator=False)
        self.host.set_handler(SYNC_PROTOCOL, self._serve_sync)
        subscription = await self.host.pubsub.subscribe(TOPIC)
        for peer in self.host.connected_peers():
            await self.sync_from(peer)
        task_status.started(self)
        while True:
            msg = await subscription.get()
            try:
                offer = parse_offer(msg.data, ID(msg.from_id).to_base58(), self.clock())
            except (WireError, ValueError) as err:
                log.debug("dropping an offer: %s", err)
                continue
            if self.book.add(offer):
                self.received.set()
                self.received = trio.Event()

    async def _serve_sync(self, stream) -> None:
        with trio.fail_after(10):
            await receive_as(stream, OffersRequest)
        live = self.book.live(self.clock())[:MAX_SYNC_OFFERS]
        await send(stream, OffersBatch([encode(o) for o in live]))
        await stream.close()

    async def sync_from(self, peer_id: str) -> int:
        """Add the offers ``peer_id`` holds to our book; returns how many were kept. Never raises."""
        kept = 0
        try:
            stream = await self.host.open_stream(peer_id, SYNC_PROTOCOL)
            try:
                await send(stream, OffersRequest())
                with trio.fail_after(10):
                    batch = await receive_as(stream, OffersBatch, max_frame=MAX_SYNC_OFFERS * MAX_OFFER_BYTES)
            finally:
                await stream.close()
        except (NodeError, EOFError, ConnectionError, trio.TooSlowError) as err:
            log.debug("offer sync from %s… failed: %s", peer_id[:12], err)
            return 0
        now = self.clock()
        for data in batch.offers:
            try:
                offer = decode(data, max_size=MAX_OFFER_BYTES)
                if not isinstance(offer, Offer) or check_offer(offer, offer.peer_id, now) is not None:
                    continue  # a peer may relay only offers that check out under their own signatures
            except WireError:
                continue
            if self.book.add(offer):
                kept += 1
        if kept:
            self.received.set()
            self.received = trio.Event()
        return kept

    async def publish(self, offer: Offer) -> None:
        self.book.add(offer)  # our own offer is part of the market too
        await self.host.pubsub.publish(TOPIC, encode(offer))

    async def wait_for(self, predicate: Callable[[list[Offer]], bool]) -> list[Offer]:
        """Wait until the live offers satisfy ``predicate`` (the caller sets the deadline)."""
        while True:
            live = self.book.live(self.clock())
            if predicate(live):
                return live
            await self.received.wait()


class Advertiser:
    """Publish our offer every ``interval_s``, and within a second of ``changed()``.

    A peer that newly subscribes to the offers topic also triggers a publish, so a
    requester that just joined sees every worker within about a second instead
    of waiting for the next interval.
    """

    def __init__(
        self,
        gossip: OfferGossip,
        make_offer: Callable[[int, float], Offer],
        *,
        interval_s: float = 10.0,
        ttl_s: float = 60.0,
        min_gap_s: float = 1.0,
    ) -> None:
        self.gossip = gossip
        self.make_offer = make_offer  # (seq, expires_at) -> signed Offer
        self.interval_s, self.ttl_s, self.min_gap_s = interval_s, ttl_s, min_gap_s
        self.seq = 0
        self._changed = trio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_subscribers)
            task_status.started(self)
            await self._advertise()

    async def _watch_subscribers(self) -> None:
        known: set = set()
        while True:
            current = set(self.gossip.host.pubsub.peer_topics.get(TOPIC, ()))
            if current - known:
                self.changed()
            known = current
            await trio.sleep(0.25)  # polling interval: py-libp2p has no subscription callback

    async def _advertise(self) -> None:
        while True:
            self.seq += 1
            offer = self.make_offer(self.seq, self.gossip.clock() + self.ttl_s)
            try:
                await self.gossip.publish(offer)
            except Exception:  # a publish failure must not stop advertising
                log.exception("publishing our offer failed")
            await trio.sleep(self.min_gap_s)
            with trio.move_on_after(max(self.interval_s - self.min_gap_s, 0)):
                await self._changed.wait()
            self._changed = trio.Event()
