"""Capacity offers: workers advertise, everyone keeps a book of the live market.

A worker publishes a signed ``Offer`` on the GossipSub topic ``llmarket/offers/1``
every ``interval_s`` and soon after its free slots change (at most once a second).
GossipSub drops what one peer forwards past a rate limit per topic; the offers
topic's is ``GOSSIP_RATE_LIMIT``, far above the host's default. Each
offer expires ``ttl_s`` after it was made, so a worker that disappears falls out
of every book within a minute.

Every node validates offers before GossipSub delivers or forwards them
(a topic validator, ``check_offer``): the bytes decode as an ``Offer`` of at
most ``MAX_OFFER_BYTES``; every number is finite and in range and every list
and string within its cap (``OFFER_LIMITS``); the offer is signed by the peer
that published it, is not expired nor dated too far ahead, and a payee address
carries a valid binding to the peer. Invalid offers are dropped (and count
against the sender in GossipSub's scoring). The validator also files the offer
in the book, so each gossiped offer is checked once.

Between full offers (every ``FULL_OFFER_INTERVAL_S``) a worker publishes an
``OfferDelta`` when only its free slots, price or expiry changed, and as its
"still here": a book that holds the delta's base offer applies it (``amend``),
and keeps the signed base and the delta so that its sync answers carry both (the
base's own expiry has usually passed by then: the delta right after it is what
keeps it alive, ``_check_synced``). A
node that gets a delta without its base asks the peer that forwarded it for the
base (a sync request naming the peers wanted; ``OfferGossip._fetch_wanted``).
A book keeps the base of an offer that expired (at most ``max_offers`` of them):
a delta on it, late past the TTL on a busy network, brings the offer back
instead of waiting for the next full offer.

The ``OfferBook`` keeps the newest offer (highest ``seq``) per peer, within
caps: ``max_offers`` in all and ``max_per_model`` per model. When a model's
share is full, the book keeps a sample worth routing on rather than the first
comers: a new stranger takes the place of the stranger worst by
``node.market.routing.sample_key`` (price, speed, time to first token, as
routing weighs them) if it is better, or if it is among the cheapest or the
fastest eighth, which are kept whatever their other terms (``_displaced_by``).
A peer we value (one that has done jobs for us, ``valued``) is never displaced,
and displaces the stranger admitted last. When the total is full, strangers
are refused. New peers from gossip are rate-limited (a token bucket) and only
an admission spends a token, so a flood of fresh keys fills the book slowly,
and strangers a full book turns away at every refresh do not use up the budget
of a better newcomer.

Gossip only carries what is published after a node joins, so a joining node
also asks the peers it is connected to at start (its bootstrap peers; at most
``SYNC_PEERS``, at once) for the offers they hold (``/llmarket/offers/1.0.0``);
every offer in the answer is checked exactly like a gossiped one, so a peer
can withhold offers but not forge them. The answer is built once per change of
the book (at most once a second) and shared by every stream that asks; it goes
out as ``offers.batch/1`` frames of at most ``SYNC_PIECE_BYTES``, then the stream ends. Each peer may hold
``SYNC_STREAMS_PER_PEER`` sync streams at once and fetch ``SYNC_BYTES_PER_PEER``
per minute; beyond that its streams are reset.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable

import trio
from libp2p.peer.id import ID

from node.concurrency import TokenBucket
from node.errors import NodeError, WireError
from node.market.routing import (
    MAX_PLAUSIBLE_TOKENS_PER_S,
    ModelColumns,
    Reputation,
    RouteQuery,
    plausible,
    rank,
    sample_key,
)
from node.net.addresses import address_problem
from node.net.identity import Identity, verify_binding, verify_peer_signature
from node.net.network import Network
from node.protocol.messages import Offer, OfferDelta, OffersBatch, OffersRequest
from node.protocol.wire import MAX_FRAME, decode, encode, frame, receive_as, send

log = logging.getLogger(__name__)

TOPIC = "llmarket/offers/1"
SYNC_PROTOCOL = "/llmarket/offers/1.0.0"

#: An encoded offer; a real one is well under 2 KiB.
MAX_OFFER_BYTES = 8 * 1024
MAX_TTL_S = 600.0

#: Offers in one sync answer, and the most a joining node reads from one peer.
MAX_SYNC_OFFERS = 1000
#: Items (offers, and a delta after an offer) a joining node reads from one peer.
MAX_SYNC_BATCH_ITEMS = 2 * MAX_SYNC_OFFERS
#: One ``offers.batch/1`` frame of a sync answer.
SYNC_PIECE_BYTES = 64 * 1024
#: What a joining node reads from one peer (all frames together), and how long it waits.
MAX_SYNC_BYTES = MAX_SYNC_OFFERS * MAX_OFFER_BYTES
SYNC_DEADLINE_S = 20.0
#: What one peer may take from us: concurrent sync streams, and bytes of answers a minute.
SYNC_STREAMS_PER_PEER = 2
SYNC_STREAMS_TOTAL = 32
SYNC_BYTES_PER_PEER = 32 * 1024 * 1024
SYNC_WINDOW_S = 60.0
#: How many of the peers it is connected to when it starts (its bootstrap peers) a node asks for offers, at once.
#: Each answer holds up to a whole book; at scale a node is connected to dozens of peers, and asking each of them
#: in turn made a start take tens of seconds (bench/scale.py).
SYNC_PEERS = 3
#: How often a worker publishes its full offer; in between, deltas (``Advertiser``).
FULL_OFFER_INTERVAL_S = 300.0
#: A node that gets a delta without its base asks the forwarder for the base: at most this many peers held
#: waiting, this many in one request, gathered for this long, and once per peer in this long. A book that
#: refused a peer's full offer (full) does not ask for it until its next full offer is due.
MAX_WANTED = 1024
MAX_WANTED_PER_ASK = 256
WANT_GATHER_S = 0.5
WANT_BACKOFF_S = 30.0
#: How often the shared sync answer may be rebuilt while the book keeps changing.
SYNC_REBUILD_S = 1.0
#: Offers one peer may forward us a second (GossipSub's default for a topic, 10, broke propagation from about
#: 500 workers: a node's mesh peers each pass it a sixth of the market's offers). 10,000 workers refreshing
#: every 10 s, all through one peer; a flood past it is dropped, and each offer is checked before it counts.
GOSSIP_RATE_LIMIT = 1000.0

# Bounds of every field of an offer (inclusive). EIP-2294 bounds chain ids.
MAX_PRICE_PER_1K = 2**128 - 1
MAX_CHAIN_ID = 2**63 - 37
MAX_SLOTS = 1024
MAX_SEQ = 2**63 - 1
MAX_TOKENS_PER_S = 1e6  # validation's bound; routing believes far less (node/market/routing.py)
MAX_FIRST_TOKEN_MS = 3_600_000.0
MAX_CONTEXT_SIZE = 1 << 24
MAX_ADDRS = 32
MAX_MODELS = 8
#: Longest string (in characters) or bytes value per field.
FIELD_CHARS = {
    "peer_id": 64,
    "addr": 256,
    "payee": 42,
    "escrow": 42,
    "binding": 128,
    "signature": 128,
    "hardware": 1024,
    "version": 128,
    "cid": 128,
    "name": 256,
    "quantization": 32,
    "numerics": 64,
}
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def signing_bytes(offer: Offer) -> bytes:
    return encode(dataclasses.replace(offer, signature=b""))


def sign_offer(identity: Identity, offer: Offer) -> Offer:
    return dataclasses.replace(offer, signature=identity.sign(signing_bytes(offer)))


def _number_problem(name: str, value: float, low: float, high: float) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} is not a finite number"
    if not low <= value <= high:
        return f"{name} {value!r} is out of range [{low:g}, {high:g}]"
    return None


def _expiry_problem(expires_at: float, now: float) -> str | None:
    if expires_at <= now:
        return "expired"
    if expires_at > now + MAX_TTL_S:
        return "expiry too far ahead"
    return None


def _too_long(name: str, value: str | bytes, key: str | None = None) -> str | None:
    limit = FIELD_CHARS[key or name]
    if len(value) > limit:
        return f"{name} is longer than {limit}"
    return None


def field_problem(offer: Offer, now: float) -> str | None:
    """Why a field of ``offer`` is out of bounds, or None. Cheap: no signatures."""
    numbers = (
        ("expires_at", offer.expires_at, -math.inf, math.inf),
        ("price_per_1k", offer.price_per_1k, 0, MAX_PRICE_PER_1K),
        ("verify_price_per_1k", offer.verify_price_per_1k, 0, MAX_PRICE_PER_1K),
        ("chain_id", offer.chain_id, 0, MAX_CHAIN_ID),
        ("slots_total", offer.slots_total, 1, MAX_SLOTS),
        ("slots_free", offer.slots_free, 0, offer.slots_total),
        ("seq", offer.seq, 0, MAX_SEQ),
        ("tokens_per_s", offer.tokens_per_s, 0.0, MAX_TOKENS_PER_S),
        ("first_token_ms", offer.first_token_ms, 0.0, MAX_FIRST_TOKEN_MS),
    )
    for name, value, low, high in numbers:
        if problem := _number_problem(name, value, low, high):
            return problem
    if problem := _expiry_problem(offer.expires_at, now):
        return problem
    if len(offer.addrs) > MAX_ADDRS:
        return f"{len(offer.addrs)} addresses, more than {MAX_ADDRS}"
    if not 1 <= len(offer.models) <= MAX_MODELS:
        return f"{len(offer.models)} models, not 1 to {MAX_MODELS}"
    for addr in offer.addrs:
        if problem := _too_long("an address", addr, "addr") or address_problem(addr):
            return problem
    for model in offer.models:
        for name in ("cid", "name", "quantization"):
            if problem := _too_long(f"a model's {name}", getattr(model, name), name):
                return problem
        if problem := _number_problem("a model's context_size", model.context_size, 1, MAX_CONTEXT_SIZE):
            return problem
    for name in ("peer_id", "payee", "escrow", "binding", "signature", "hardware", "version", "numerics"):
        if problem := _too_long(name, getattr(offer, name)):
            return problem
    for name in ("payee", "escrow"):
        value = getattr(offer, name)
        if value and not _ADDRESS.fullmatch(value):
            return f"{name} is not an Ethereum address"
    return None


def check_offer(offer: Offer, publisher: str, now: float) -> str | None:
    """Why ``offer`` (as published by ``publisher``) is invalid, or None if it is valid.

    Cheap checks (bounds of every field) come before the signatures.
    """
    if offer.peer_id != publisher:
        return "published by another peer than it names"
    if problem := field_problem(offer, now):
        return problem
    if not verify_peer_signature(offer.peer_id, signing_bytes(offer), offer.signature):
        return "bad signature"
    if offer.payee and not verify_binding(offer.peer_id, offer.payee, offer.binding):
        return "payee not bound to the peer"
    return None


def sign_delta(identity: Identity, delta: OfferDelta) -> OfferDelta:
    return dataclasses.replace(delta, signature=identity.sign(encode(dataclasses.replace(delta, signature=b""))))


def check_delta(delta: OfferDelta, publisher: str, now: float) -> str | None:
    """Why ``delta`` (as published by ``publisher``) is invalid, or None. Its free slots are checked against
    its base offer's total when it is applied (``OfferBook.amend``)."""
    if delta.peer_id != publisher:
        return "published by another peer than it names"
    for name, value, low, high in (
        ("expires_at", delta.expires_at, -math.inf, math.inf),
        ("price_per_1k", delta.price_per_1k, 0, MAX_PRICE_PER_1K),
        ("slots_free", delta.slots_free, 0, MAX_SLOTS),
        ("base_seq", delta.base_seq, 0, MAX_SEQ),
        ("seq", delta.seq, delta.base_seq + 1, MAX_SEQ),
    ):
        if problem := _number_problem(name, value, low, high):
            return problem
    if problem := _expiry_problem(delta.expires_at, now):
        return problem
    if problem := _too_long("peer_id", delta.peer_id) or _too_long("signature", delta.signature):
        return problem
    unsigned = encode(dataclasses.replace(delta, signature=b""))
    if not verify_peer_signature(delta.peer_id, unsigned, delta.signature):
        return "bad signature"
    return None


def parse_offer(data: bytes, publisher: str, now: float) -> Offer | OfferDelta:
    """Decode and check an offer or an offer delta. Raises ``WireError`` if either fails."""
    if len(data) > MAX_OFFER_BYTES:
        raise WireError(f"offer of {len(data)} bytes is over {MAX_OFFER_BYTES}")
    offer = decode(data, max_size=MAX_OFFER_BYTES)
    if isinstance(offer, Offer):
        reason = check_offer(offer, publisher, now)
    elif isinstance(offer, OfferDelta):
        reason = check_delta(offer, publisher, now)
    else:
        raise WireError(f"{offer.TYPE} on the offers topic")
    if reason is not None:
        raise WireError(f"{offer.TYPE} from {publisher[:12]}…: {reason}")
    return offer


def _check_synced(datas: list[bytes], now: float) -> list[tuple[Offer | OfferDelta, bytes]]:
    """The offers (and deltas) of a sync answer that check out under their own signatures (runs in a thread).

    A base offer comes with the delta that keeps it alive, and its own expiry has usually passed (a full offer
    goes out every ``FULL_OFFER_INTERVAL_S``, its deltas every few seconds): a base that is valid but for its
    expiry counts when the delta right after it amends it and is valid itself."""
    items: list[Offer | OfferDelta | None] = []
    for data in datas:
        try:
            items.append(decode(data, max_size=MAX_OFFER_BYTES) if len(data) <= MAX_OFFER_BYTES else None)
        except WireError:
            items.append(None)
    valid = []
    for i, (item, data) in enumerate(zip(items, datas, strict=True)):
        if isinstance(item, OfferDelta) and check_delta(item, item.peer_id, now) is None:
            valid.append((item, data))
        elif isinstance(item, Offer):
            after = items[i + 1] if i + 1 < len(items) else None
            kept_alive = (
                isinstance(after, OfferDelta) and after.peer_id == item.peer_id and after.base_seq == item.seq
                and check_delta(after, after.peer_id, now) is None
            )  # fmt: skip
            checked_at = min(now, item.expires_at - 1e-3) if kept_alive else now  # all but the base's expiry
            if check_offer(item, item.peer_id, checked_at) is None:
                valid.append((item, data))
    return valid


# ----------------------------------------------------------------- the book

REFUSED_OLDER = "not newer than the offer we hold"
REFUSED_RATE = "new peers are arriving too fast"
REFUSED_FULL = "the offer book is full"
REFUSED_MODEL_FULL = "the offer book is full for a model"
REFUSED_NO_BASE = "the delta's base offer is not the one held"
REFUSED_SLOTS = "more free slots than the base offer has"


def _amended(base: Offer, delta: OfferDelta) -> Offer:
    """``base`` with ``delta``'s free slots, price, expiry and seq."""
    return dataclasses.replace(
        base, seq=delta.seq, slots_free=delta.slots_free, price_per_1k=delta.price_per_1k, expires_at=delta.expires_at
    )


def _never_valued(peer_id: str) -> bool:
    return False


def _speed(offer: Offer) -> float:
    return plausible(offer.tokens_per_s, MAX_PLAUSIBLE_TOKENS_PER_S) or 0.0


class LiveOffers(list):
    """``OfferBook.live``'s answer: a list of offers that remembers the book and its version, so that
    ``best_offer`` can decide over the book's columns while the book has not changed since."""

    def __init__(self, offers, book: OfferBook) -> None:
        super().__init__(offers)
        self.book = book
        self.version = book.version


def best_offer(
    offers: list[Offer], query: RouteQuery, reputation: Reputation, now: float, *, exclude: set[str] | None = None
) -> Offer | None:
    """``rank(offers minus exclude, query, reputation, now, limit=1)``'s choice, or None.

    When ``offers`` is a book's ``live`` answer and the book has not changed since, the
    decision is made over the book's per-model columns (``ModelColumns.best``: the same
    decision, without a Python loop over the offers); otherwise by ``rank``.
    """
    exclude = exclude or set()
    if isinstance(offers, LiveOffers) and offers.version == offers.book.version and query.pinned_peer is None:
        return offers.book.best(query, reputation, now, exclude=exclude)
    ranked = rank([o for o in offers if o.peer_id not in exclude], query, reputation, now, limit=1)
    return ranked[0] if ranked else None


@dataclasses.dataclass
class OfferBook:
    """The newest live offer of each peer, within caps (see the module docstring).

    ``offers`` maps peer id to offer; change it only through ``add``. Each model's
    offers are also kept as columns (``ModelColumns``) for routing (``best``).
    """

    max_offers: int = 1024
    max_per_model: int = 256
    new_peers_per_s: float = 10.0
    new_peer_burst: float = 100.0
    valued: Callable[[str], bool] = _never_valued  # peers whose offers we keep before strangers'
    clock: Callable[[], float] = time.time
    offers: dict[str, Offer] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._data: dict[str, bytes] = {}  # the encoded offer, as sync answers carry it
        self._admitted: dict[str, int] = {}  # peer → admission order (higher is later)
        self._per_model: Counter[str] = Counter()
        self._keys: dict[str, float] = {}  # peer → sample_key of its offer (lower is better)
        self._arrivals = TokenBucket(self.new_peers_per_s, self.new_peer_burst)
        self._admissions = 0
        self.version = 0  # changes whenever the set of offers changes
        self._answer: tuple[int, float, float, list[bytes]] | None = None  # version, built, min expiry, frames
        self._columns: dict[str, ModelColumns] = {}  # model CID → its offers' routing columns
        self._deltas: dict[str, tuple[Offer, bytes]] = {}  # peer → (its signed full offer, the delta applied)
        self._expiries: list[tuple[float, str]] = []  # a heap of (expires_at, peer); stale entries are skipped
        self._dormant: dict[str, tuple[Offer, bytes]] = {}  # peer → (expired base, its encoding), oldest first

    def __len__(self) -> int:
        return len(self.offers)

    def add(self, offer: Offer, *, data: bytes | None = None, rate_limited: bool = False) -> bool:
        """Keep ``offer`` if it is newer than what we have and fits; returns whether it was kept."""
        return self.admit(offer, data=data, rate_limited=rate_limited) is None

    def admit(self, offer: Offer, *, data: bytes | None = None, rate_limited: bool = False) -> str | None:
        """Like ``add``, but returns why the offer was refused (``REFUSED_*``), or None if kept.

        The book does not check offers (``check_offer`` does); ``data`` is the offer's
        encoding if the caller has it. ``rate_limited`` applies the new-peer rate limit
        (gossip does; a sync answer is bounded by itself).
        """
        peer = offer.peer_id
        current = self.offers.get(peer)
        if current is not None:
            if current.seq >= offer.seq:
                return REFUSED_OLDER
            added = {m.cid for m in offer.models} - {m.cid for m in current.models}
            if any(self._per_model[cid] >= self.max_per_model for cid in added):
                return REFUSED_MODEL_FULL
            self._store(offer, data, self._admitted[peer])
            return None
        valued = self.valued(peer)
        cids = {m.cid for m in offer.models}
        if len(self.offers) >= self.max_offers or any(self._per_model[c] >= self.max_per_model for c in cids):
            self._drop_expired(self.clock())
        if valued:
            while True:
                full_models = {c for c in cids if self._per_model[c] >= self.max_per_model}
                if len(self.offers) < self.max_offers and not full_models:
                    break
                victim = self._victim(full_models)
                if victim is None:
                    return REFUSED_MODEL_FULL if full_models else REFUSED_FULL
                self._remove(victim)
        else:
            evicted: set[str] = set()
            for cid in sorted(cids):
                held = self._per_model[cid] - sum(1 for p in evicted if cid in self._cids(p))
                if held < self.max_per_model:
                    continue
                victim = self._displaced_by(offer, cid, evicted)
                if victim is None:
                    return REFUSED_MODEL_FULL
                evicted.add(victim)
            if len(self.offers) - len(evicted) >= self.max_offers:
                return REFUSED_FULL
            # only an offer that gets in spends the new-peer budget: strangers a full book turns away come back
            # with every refresh, and must not starve a better newcomer of its place
            if rate_limited and not self._arrivals.take(self.clock()):
                return REFUSED_RATE
            for victim in evicted:
                self._remove(victim)
        self._admissions += 1
        self._store(offer, data, self._admissions)
        return None

    def amend(self, delta: OfferDelta, *, data: bytes | None = None) -> str | None:
        """Apply a checked ``delta`` to the offer it amends; returns why not (``REFUSED_*``), or None if applied.

        The offer held becomes the base offer with the delta's free slots, price, expiry
        and seq. The book keeps the signed base and the delta, and a sync answer carries
        both, so every node can check what it is given.
        """
        peer = delta.peer_id
        current = self.offers.get(peer)
        if current is None:
            return self._revive(delta, data)
        base = self._deltas[peer][0] if peer in self._deltas else current
        if base.seq != delta.base_seq:
            return REFUSED_NO_BASE
        if delta.seq <= current.seq:
            return REFUSED_OLDER
        if delta.slots_free > base.slots_total:
            return REFUSED_SLOTS
        self._store(_amended(base, delta), self._data[peer], self._admitted[peer])
        self._deltas[peer] = (base, data if data is not None else encode(delta))
        return None

    def _revive(self, delta: OfferDelta, data: bytes | None) -> str | None:
        """Apply ``delta`` to the base of an offer that expired here (``_dormant``), which it may bring back:
        a worker whose deltas were late past the TTL is still the same worker, and its delta is signed."""
        dormant = self._dormant.get(delta.peer_id)
        if dormant is None or dormant[0].seq != delta.base_seq:
            return REFUSED_NO_BASE
        base, base_data = dormant
        if delta.slots_free > base.slots_total:
            return REFUSED_SLOTS
        refused = self.admit(_amended(base, delta), data=base_data)
        if refused is None:  # (storing it cleared the dormant base)
            self._deltas[delta.peer_id] = (base, data if data is not None else encode(delta))
        return refused

    def live(self, now: float) -> LiveOffers:
        """Offers not yet expired (expired ones are dropped)."""
        self._drop_expired(now)
        return LiveOffers(self.offers.values(), self)

    def best(
        self, query: RouteQuery, reputation: Reputation, now: float, *, exclude: set[str] | None = None
    ) -> Offer | None:
        """The offer routing chooses first for ``query`` among those held and not in ``exclude``, or None:
        ``rank``'s choice, decided over the model's columns (node/market/routing.py, ``ModelColumns``)."""
        exclude = exclude or set()
        if query.pinned_peer is not None:
            offer = self.offers.get(query.pinned_peer)
            ranked = rank([offer] if offer is not None and offer.peer_id not in exclude else [], query, reputation, now)
            return ranked[0] if ranked else None
        columns = self._columns.get(query.model)
        return None if columns is None else columns.best(query, reputation, now, exclude)

    def sync_frames(self, now: float) -> list[bytes]:
        """The sync answer: framed ``offers.batch/1`` pieces, built once and shared until the book changes.

        Rebuilt when the book has changed or an offer in it has expired, at most
        every ``SYNC_REBUILD_S``. Peers we value come first, then the longest known.
        """
        if self._answer is not None:
            version, built, min_expiry, frames = self._answer
            if (version == self.version and now < min_expiry) or now - built < SYNC_REBUILD_S:
                return frames
        self._drop_expired(now)
        order = sorted(self.offers, key=lambda p: (not self.valued(p), self._admitted[p]))[:MAX_SYNC_OFFERS]
        frames = self._frames(order)
        min_expiry = min((self.offers[p].expires_at for p in order), default=math.inf)
        self._answer = (self.version, now, min_expiry, frames)
        return frames

    def frames_for(self, peers: list[str], now: float) -> list[bytes]:
        """An answer with only ``peers``' offers (and deltas) among those held: what a node that got a delta
        without its base asks for (``OfferGossip``)."""
        self._drop_expired(now)
        return self._frames([p for p in dict.fromkeys(peers[:MAX_WANTED_PER_ASK]) if p in self.offers])

    def _frames(self, order: list[str]) -> list[bytes]:
        frames: list[bytes] = []
        piece: list[bytes] = []
        size = 0
        for peer in order:
            datas = [self._data[peer], self._deltas[peer][1]] if peer in self._deltas else [self._data[peer]]
            length = sum(map(len, datas)) + 8 * len(datas)
            if piece and size + length > SYNC_PIECE_BYTES - 64:  # 64: the frame's own overhead
                frames.append(frame(OffersBatch(piece)))
                piece, size = [], 0
            piece.extend(datas)  # a delta right after its base
            size += length
        if piece:
            frames.append(frame(OffersBatch(piece)))
        return frames

    # -- internals

    def _store(self, offer: Offer, data: bytes | None, admitted: int) -> None:
        peer = offer.peer_id
        self._dormant.pop(peer, None)
        self._deltas.pop(peer, None)  # a new full offer, or a delta that ``amend`` notes again
        cids = {m.cid for m in offer.models}
        if peer in self.offers:
            old = {m.cid for m in self.offers[peer].models}
            self._per_model.subtract(old)
            for cid in old - cids:
                self._uncolumn(cid, peer)
        for cid in cids:
            columns = self._columns.get(cid)
            if columns is None:
                columns = self._columns[cid] = ModelColumns()
            columns.put(offer)
        self.offers[peer] = offer
        heapq.heappush(self._expiries, (offer.expires_at, peer))
        if len(self._expiries) > 4 * len(self.offers) + 64:  # refreshed offers left stale entries: rebuild
            self._expiries = [(o.expires_at, p) for p, o in self.offers.items()]
            heapq.heapify(self._expiries)
        self._data[peer] = data if data is not None else encode(offer)
        self._admitted[peer] = admitted
        self._keys[peer] = sample_key(offer)
        self._per_model.update(cids)
        self.version += 1

    def _remove(self, peer: str) -> None:
        offer = self.offers.pop(peer)
        del self._data[peer], self._admitted[peer], self._keys[peer]
        self._deltas.pop(peer, None)
        cids = {m.cid for m in offer.models}
        self._per_model.subtract(cids)
        for cid in cids:
            self._uncolumn(cid, peer)
        self.version += 1

    def _uncolumn(self, cid: str, peer: str) -> None:
        columns = self._columns[cid]
        columns.remove(peer)
        if not len(columns):
            del self._columns[cid]

    def _drop_expired(self, now: float) -> None:
        expiries = self._expiries
        while expiries and not expiries[0][0] > now:
            _, peer = heapq.heappop(expiries)
            offer = self.offers.get(peer)
            if offer is not None and not offer.expires_at > now:  # not refreshed since
                base = self._deltas[peer][0] if peer in self._deltas else offer
                self._dormant.pop(peer, None)  # (re-inserted: the dict stays oldest first)
                self._dormant[peer] = (base, self._data[peer])
                self._remove(peer)
        while len(self._dormant) > self.max_offers:
            del self._dormant[next(iter(self._dormant))]

    def _cids(self, peer: str) -> set[str]:
        return {m.cid for m in self.offers[peer].models}

    def _displaced_by(self, offer: Offer, cid: str, evicted: set[str]) -> str | None:
        """The stranger holding a place for ``cid`` that ``offer`` (a stranger too) should take, or None.

        The book keeps a sample of the model's workers that is useful to route on:
        the best by ``sample_key`` (the routing score's weights on price, speed and
        time to first token), and besides them the cheapest and the fastest eighth
        whatever their other terms, so that a requester with a tight price cap or in a
        hurry still finds workers. ``offer`` gets in if it would be among those kept,
        in place of the stranger that is worst by ``sample_key`` and not kept for its
        price or speed. Peers we value are never displaced; ties keep the incumbent.
        """
        rivals = [
            p for p, o in self.offers.items()
            if p not in evicted and not self.valued(p) and any(m.cid == cid for m in o.models)
        ]  # fmt: skip
        if not rivals:
            return None
        k = max(1, self.max_per_model // 8)
        offers = self.offers
        cheapest = heapq.nsmallest(k, rivals, key=lambda p: (offers[p].price_per_1k, self._keys[p]))
        fastest = heapq.nsmallest(k, rivals, key=lambda p: (-_speed(offers[p]), self._keys[p]))
        protected = set(cheapest) | set(fastest)
        candidates = [p for p in rivals if p not in protected]
        if not candidates:
            return None
        victim = max(candidates, key=lambda p: (self._keys[p], self._admitted[p]))
        key = sample_key(offer)
        if key < self._keys[victim]:
            return victim
        if (offer.price_per_1k, key) < (offers[cheapest[-1]].price_per_1k, self._keys[cheapest[-1]]):
            return victim  # among the cheapest: it displaces the worst overall, not a cheap one
        if (-_speed(offer), key) < (-_speed(offers[fastest[-1]]), self._keys[fastest[-1]]):
            return victim
        return None

    def _victim(self, full_models: set[str]) -> str | None:
        """The stranger admitted last among those that hold a place we need; None if there is none."""
        best, best_order = None, -1
        for peer, offer in self.offers.items():
            if full_models and not full_models & {m.cid for m in offer.models}:
                continue
            if self._admitted[peer] > best_order and not self.valued(peer):
                best, best_order = peer, self._admitted[peer]
        return best


# ------------------------------------------------------------- sync budget


class SyncBudget:
    """What each peer may take from our sync answers: streams at once, and bytes a minute."""

    def __init__(self) -> None:
        self.active: Counter[str] = Counter()
        self.sent: dict[str, deque[tuple[float, int]]] = {}

    def open(self, peer: str, now: float) -> str | None:
        """Start serving ``peer``; returns why it may not be served now, or None."""
        if sum(self.active.values()) >= SYNC_STREAMS_TOTAL:
            return f"{SYNC_STREAMS_TOTAL} sync streams are being served"
        if self.active[peer] >= SYNC_STREAMS_PER_PEER:
            return f"it holds {SYNC_STREAMS_PER_PEER} sync streams already"
        if self._recent(peer, now) >= SYNC_BYTES_PER_PEER:
            return f"it fetched {SYNC_BYTES_PER_PEER >> 20} MiB of offers in the last minute"
        self.active[peer] += 1
        return None

    def charge(self, peer: str, now: float, size: int) -> None:
        self.sent.setdefault(peer, deque()).append((now, size))

    def close(self, peer: str) -> None:
        self.active[peer] -= 1
        if self.active[peer] <= 0:
            del self.active[peer]

    def _recent(self, peer: str, now: float) -> int:
        if len(self.sent) > 4 * SYNC_STREAMS_TOTAL:  # forget peers whose window has passed
            for p in [p for p, d in self.sent.items() if not d or d[-1][0] <= now - SYNC_WINDOW_S]:
                del self.sent[p]
        sent = self.sent.get(peer)
        if not sent:
            return 0
        while sent and sent[0][0] <= now - SYNC_WINDOW_S:
            sent.popleft()
        return sum(size for _, size in sent)


class OfferGossip:
    """Receive and validate offers into ``book``; publish our own."""

    def __init__(self, host: Network, book: OfferBook, *, clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.book = book
        self.clock = clock
        self.received = trio.Event()  # set (and replaced) whenever an offer is kept
        self.sync_budget = SyncBudget()
        self._wanted: dict[str, str] = {}  # a peer whose delta came without its base → who forwarded it
        self._not_before: dict[str, float] = {}  # a peer → when we may ask for its offer again
        self._want = trio.Event()

    def _note_wanted(self, peer: str, forwarder: str) -> None:
        """Ask ``forwarder`` soon for ``peer``'s offer, unless we asked for it within ``WANT_BACKOFF_S`` (or
        turned it away lately)."""
        now = self.clock()
        if len(self._not_before) > 4 * MAX_WANTED:  # forget what is past
            self._not_before = {p: t for p, t in self._not_before.items() if t > now}
        if self._not_before.get(peer, -math.inf) > now or len(self._wanted) >= MAX_WANTED:
            return
        self._wanted[peer] = forwarder
        self._want.set()

    async def _fetch_wanted(self) -> None:
        """Ask the forwarders of deltas we could not apply for their bases, a batch at a time."""
        while True:
            await self._want.wait()
            await trio.sleep(WANT_GATHER_S)  # a few more arrive: one stream per forwarder for all of them
            self._want = trio.Event()
            wanted, self._wanted = self._wanted, {}
            now = self.clock()
            by_forwarder: dict[str, list[str]] = {}
            for peer, forwarder in wanted.items():
                self._not_before[peer] = now + WANT_BACKOFF_S
                by_forwarder.setdefault(forwarder, []).append(peer)
            async with trio.open_nursery() as nursery:
                for forwarder, peers in list(by_forwarder.items())[:SYNC_PEERS]:
                    nursery.start_soon(self.sync_from, forwarder, peers[:MAX_WANTED_PER_ASK])

    def _kept(self) -> None:
        self.received.set()
        self.received = trio.Event()

    def _validate(self, forwarder: ID, msg) -> bool:
        """The topic validator: drop invalid offers, and file valid ones in the book."""
        try:
            publisher = ID(msg.from_id).to_base58()
            offer = parse_offer(msg.data, publisher, self.clock())
        except (WireError, ValueError) as err:
            log.debug("dropping an offer relayed by %s…: %s", str(forwarder)[:12], err)
            return False
        if isinstance(offer, OfferDelta):
            refused = self.book.amend(offer, data=msg.data)
        else:
            refused = self.book.admit(offer, data=msg.data, rate_limited=True)
        if refused is None:
            self._kept()
        elif refused == REFUSED_NO_BASE:
            self._note_wanted(publisher, str(forwarder))
        elif refused in (REFUSED_FULL, REFUSED_MODEL_FULL):
            self._not_before[publisher] = self.clock() + FULL_OFFER_INTERVAL_S  # a pull would be turned away too
        elif refused != REFUSED_OLDER:
            log.debug("not keeping the offer of %s…: %s", publisher[:12], refused)
        return True  # valid offers are forwarded whether or not our book keeps them

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_topic_rate_limit(TOPIC, GOSSIP_RATE_LIMIT)
        self.host.pubsub.set_topic_validator(TOPIC, self._validate, is_async_validator=False)
        self.host.set_handler(SYNC_PROTOCOL, self._serve_sync)
        subscription = await self.host.pubsub.subscribe(TOPIC)
        self.host.greet_lan_peers(self.sync_from)  # peers found on the LAN later: ask them too
        async with trio.open_nursery() as nursery:  # a few peers at once, not every peer one after the other
            for peer in self.host.connected_peers()[:SYNC_PEERS]:
                nursery.start_soon(self.sync_from, peer)
        task_status.started(self)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fetch_wanted)
            while True:
                await subscription.get()  # the validator has filed it already

    async def _serve_sync(self, stream) -> None:
        peer = stream.peer_id
        refused = self.sync_budget.open(peer, self.clock())
        if refused is not None:
            log.debug("refusing an offer sync to %s…: %s", peer[:12], refused)
            await stream.reset()
            return
        try:
            with trio.fail_after(10):
                request = await receive_as(stream, OffersRequest)
            if request.peers:
                frames = self.book.frames_for(request.peers, self.clock())
            else:
                frames = self.book.sync_frames(self.clock())
            self.sync_budget.charge(peer, self.clock(), sum(map(len, frames)))
            for piece in frames:
                await stream.write(piece)
            await stream.close()
        finally:
            self.sync_budget.close(peer)

    async def sync_from(self, peer_id: str, peers: list[str] | None = None) -> int:
        """Add the offers ``peer_id`` holds (only ``peers``' if given) to our book; returns how many were kept.
        Never raises."""
        datas: list[bytes] = []
        try:
            with trio.fail_after(SYNC_DEADLINE_S):
                stream = await self.host.open_stream(peer_id, SYNC_PROTOCOL)
                try:
                    await send(stream, OffersRequest(peers=list(peers or [])))
                    size = 0
                    while len(datas) < MAX_SYNC_BATCH_ITEMS and size < MAX_SYNC_BYTES:
                        try:
                            batch = await receive_as(stream, OffersBatch, max_frame=MAX_FRAME)
                        except EOFError:
                            break  # the answer is complete
                        datas.extend(batch.offers)
                        size += sum(map(len, batch.offers))
                finally:
                    await stream.close()
        except (NodeError, EOFError, ConnectionError, trio.TooSlowError) as err:
            log.debug("offer sync from %s… failed: %s", peer_id[:12], err)
            if not datas:
                return 0
        checked = await trio.to_thread.run_sync(_check_synced, datas[:MAX_SYNC_BATCH_ITEMS], self.clock())
        kept = sum(
            (self.book.amend(offer, data=data) if isinstance(offer, OfferDelta) else self.book.admit(offer, data=data))
            is None
            for offer, data in checked
        )
        if kept:
            self._kept()
        return kept

    async def publish(self, offer: Offer) -> None:
        problem = check_offer(offer, self.host.peer_id, self.clock())
        if problem is not None:  # every other node would drop it
            log.error("our own offer is invalid (%s); other nodes will drop it", problem)
        self.book.add(offer)  # our own offer is part of the market too
        await self.host.pubsub.publish(TOPIC, encode(offer))

    async def publish_delta(self, delta: OfferDelta) -> None:
        data = encode(delta)
        self.book.amend(delta, data=data)
        await self.host.pubsub.publish(TOPIC, data)

    async def wait_for(self, predicate: Callable[[list[Offer]], bool]) -> list[Offer]:
        """Wait until the live offers satisfy ``predicate`` (the caller sets the deadline)."""
        while True:
            live = self.book.live(self.clock())
            if predicate(live):
                return live
            await self.received.wait()


class Advertiser:
    """Publish our offer every ``interval_s``, and within a second of ``changed()``.

    A full offer goes out every ``full_interval_s``; in between, when only the free
    slots, the price or the expiry changed, an ``OfferDelta`` does (about a third of
    the bytes), which also keeps the offer alive in every book. Anything else that
    changes (models, addresses, …) goes out as a full offer at once.

    The first peers to subscribe to the offers topic beside us trigger a full offer
    too: our first one may have gone out before anyone listened. A node that joins
    later gets our offer from its sync (base and delta) and, for a delta that comes
    before its base, the base fetch. ``full_for_every_newcomer`` sends a full offer
    to the whole network whenever any new neighbour subscribes, as before: in
    bench/scale.py at 15 nodes it doubled GossipSub's bytes and held up changes
    (docs/benchmarks.md).
    """

    def __init__(
        self,
        gossip: OfferGossip,
        make_offer: Callable[[int, float], Offer],
        *,
        interval_s: float = 10.0,
        ttl_s: float = 60.0,
        min_gap_s: float = 1.0,
        full_interval_s: float = FULL_OFFER_INTERVAL_S,
        full_for_every_newcomer: bool = False,
    ) -> None:
        self.gossip = gossip
        self.full_for_every_newcomer = full_for_every_newcomer
        self.make_offer = make_offer  # (seq, expires_at) -> signed Offer
        self.interval_s, self.ttl_s, self.min_gap_s = interval_s, ttl_s, min_gap_s
        self.full_interval_s = full_interval_s
        self._base: Offer | None = None  # the last full offer published
        self._base_at = -math.inf
        self._full_due = False
        # Offers of a restarted worker must beat the ones it published before (books keep the highest seq):
        # start from the clock in milliseconds, which runs far ahead of one offer every second or more.
        self.seq = int(gossip.clock() * 1000)
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
            if current - known and (self.full_for_every_newcomer or not known):
                self._full_due = True  # a new neighbour may not hold our full offer
                self.changed()
            known = current
            await trio.sleep(0.25)  # polling interval: py-libp2p has no subscription callback

    def _delta(self, offer: Offer) -> OfferDelta | None:
        """``offer`` as a signed delta on the last full offer, or None if a full offer is due."""
        base, identity = self._base, getattr(self.gossip.host, "identity", None)
        if base is None or identity is None or self._full_due:
            return None
        if self.gossip.clock() - self._base_at >= self.full_interval_s:
            return None
        same = dataclasses.replace(
            offer, seq=base.seq, slots_free=base.slots_free, price_per_1k=base.price_per_1k,
            expires_at=base.expires_at, signature=base.signature,
        )  # fmt: skip
        if same != base:  # more than slots, price and expiry changed
            return None
        delta = OfferDelta(offer.peer_id, base.seq, offer.seq, offer.slots_free, offer.price_per_1k, offer.expires_at)
        return sign_delta(identity, delta)

    async def publish_next(self) -> None:
        """Publish our offer now: as a delta on the last full offer if that is enough, else in full."""
        self.seq += 1
        offer = self.make_offer(self.seq, self.gossip.clock() + self.ttl_s)
        delta = self._delta(offer)
        if delta is not None:
            await self.gossip.publish_delta(delta)
        else:
            self._base, self._base_at, self._full_due = offer, self.gossip.clock(), False
            await self.gossip.publish(offer)

    async def _advertise(self) -> None:
        while True:
            try:
                await self.publish_next()
            except Exception:  # a publish failure must not stop advertising
                log.exception("publishing our offer failed")
            await trio.sleep(self.min_gap_s)
            with trio.move_on_after(max(self.interval_s - self.min_gap_s, 0)):
                await self._changed.wait()
            self._changed = trio.Event()
