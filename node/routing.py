"""Choosing a worker for a job: a pure policy, no I/O.

``rank`` filters the live offers down to those that can take the job and
orders them best first; the requester tries them in that order (failover
walks down the list). ``Reputation`` is the requester's local memory of how
each peer behaved.

Filters (an offer is out if any fails):
  serves the model (by CID); has a free slot; is not expired; its price is at
  most the cap; a paid offer is on the requester's chain and escrow (and paid
  offers are refused outright while ``free_only``); the peer is not banned;
  with a pinned peer, it is that peer.

Score (lower is better), each term scaled to 0..1 across the candidates:
  0.4 × price  +  0.2 × measured latency  +  0.2 × slowness (1 / advertised tokens/s)
  +  0.2 × unreliability (1 − smoothed success rate).
Price matters most because it is what a requester set a cap on; the other
three stand for "how soon is my answer done". Peers never measured get the
median latency of those that were. Ties break on the peer id, so the choice
is deterministic.

Failing peers are banned with exponential backoff: 5 s after the first
consecutive failure, doubling up to 10 minutes; a success clears it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from node.messages import Offer

WEIGHT_PRICE = 0.4
WEIGHT_LATENCY = 0.2
WEIGHT_SPEED = 0.2
WEIGHT_RELIABILITY = 0.2


@dataclass(frozen=True)
class RouteQuery:
    """What the requester needs."""

    model: str  # CID
    max_price_per_1k: int | None = None  # None: any price
    chain_id: int = 0
    escrow: str = ""
    pinned_peer: str | None = None
    free_only: bool = False


@dataclass
class PeerRecord:
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    banned_until: float = 0.0
    latency_ms: float | None = None  # smoothed round-trip time


@dataclass
class Reputation:
    """Local success/failure history per peer, with backoff bans."""

    base_ban_s: float = 5.0
    max_ban_s: float = 600.0
    peers: dict[str, PeerRecord] = field(default_factory=dict)

    def record(self, peer: str) -> PeerRecord:
        return self.peers.setdefault(peer, PeerRecord())

    def success(self, peer: str) -> None:
        rec = self.record(peer)
        rec.successes += 1
        rec.consecutive_failures = 0
        rec.banned_until = 0.0

    def failure(self, peer: str, now: float) -> float:
        """Record a failure; returns the time the peer is banned until."""
        rec = self.record(peer)
        rec.failures += 1
        rec.consecutive_failures += 1
        rec.banned_until = now + min(self.max_ban_s, self.base_ban_s * 2 ** (rec.consecutive_failures - 1))
        return rec.banned_until

    def latency(self, peer: str, rtt_ms: float) -> None:
        rec = self.record(peer)
        rec.latency_ms = rtt_ms if rec.latency_ms is None else 0.7 * rec.latency_ms + 0.3 * rtt_ms

    def banned(self, peer: str, now: float) -> bool:
        rec = self.peers.get(peer)
        return rec is not None and rec.banned_until > now

    def reliability(self, peer: str) -> float:
        """Smoothed success rate, (s + 1) / (s + f + 2): 0.5 for a peer never tried."""
        rec = self.peers.get(peer)
        if rec is None:
            return 0.5
        return (rec.successes + 1) / (rec.successes + rec.failures + 2)


def exclusion(offer: Offer, query: RouteQuery, reputation: Reputation, now: float) -> str | None:
    """Why ``offer`` cannot take the job, or None if it can."""
    if query.pinned_peer is not None and offer.peer_id != query.pinned_peer:
        return "not the pinned peer"
    if not any(m.cid == query.model for m in offer.models):
        return "does not serve the model"
    if offer.expires_at <= now:
        return "offer expired"
    if offer.slots_free <= 0:
        return "no free slot"
    if query.max_price_per_1k is not None and offer.price_per_1k > query.max_price_per_1k:
        return "over the price cap"
    if offer.price_per_1k > 0:
        if query.free_only:
            return "paid offer (paid jobs are not supported yet)"
        if offer.chain_id != query.chain_id or offer.escrow.lower() != query.escrow.lower():
            return "paid on another chain or escrow"
    if query.pinned_peer is None and reputation.banned(offer.peer_id, now):
        return "banned after recent failures"
    return None


def _scaled(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    span = high - low
    return [0.0] * len(values) if span == 0 else [(v - low) / span for v in values]


def rank(offers: Iterable[Offer], query: RouteQuery, reputation: Reputation, now: float) -> list[Offer]:
    """The offers that can take the job, best first."""
    candidates = [o for o in offers if exclusion(o, query, reputation, now) is None]
    if len(candidates) <= 1:
        return candidates
    measured = [r.latency_ms for o in candidates if (r := reputation.peers.get(o.peer_id)) and r.latency_ms is not None]
    default_latency = statistics.median(measured) if measured else 0.0
    latencies = []
    for o in candidates:
        rec = reputation.peers.get(o.peer_id)
        latencies.append(rec.latency_ms if rec and rec.latency_ms is not None else default_latency)
    price = _scaled([float(o.price_per_1k) for o in candidates])
    latency = _scaled(latencies)
    slowness = _scaled([1.0 / max(o.tokens_per_s, 1e-3) for o in candidates])
    unreliability = _scaled([1.0 - reputation.reliability(o.peer_id) for o in candidates])
    scored = [
        (
            WEIGHT_PRICE * price[i]
            + WEIGHT_LATENCY * latency[i]
            + WEIGHT_SPEED * slowness[i]
            + WEIGHT_RELIABILITY * unreliability[i],
            o.peer_id,
            o,
        )
        for i, o in enumerate(candidates)
    ]
    scored.sort(key=lambda t: (t[0], t[1]))
    return [o for _, _, o in scored]
