"""Choosing a worker for a job: a pure policy, no I/O.

``rank`` filters the live offers down to those that can take the job and
orders them best first; the requester tries them in that order (failover
walks down the list). ``Reputation`` is the requester's local memory of how
each peer behaved.

Filters (an offer is out if any fails):
  serves the model (by CID); is not expired; its price is at most the cap; a
  paid offer is on the requester's chain and escrow (and paid offers are
  refused outright while ``free_only``); the peer is not banned; with a pinned
  peer, it is that peer.

The checking regime orders first (with ``RouteQuery.exact_first``, the default):
an offer whose ``numerics`` is the requester's own class (``RouteQuery.numerics``:
the requester can check its answers exactly here) comes before one that claims
some other class of exact numerics (a verifier of that class checks it exactly),
which comes before a noisy one (no claim: only the loose tolerances apply, so
small cheats hide in honest noise; docs/verification.md). A claim costs a cheater
nothing to make but binds it: its receipts carry it, and a verifier of the class
then allows no difference at all. Spot checks order their verifiers the same way,
with the worker's claimed class as ``numerics`` (node/verify/spot.py).

Free slots order next, they do not filter: every offer with a free slot comes before
every offer without one. An offer can be a second old (workers re-advertise at
most once a second), so a worker that just finished a job still shows as full;
if a "full" worker is tried and really is busy, it says so and the next one is
tried, at the cost of one round trip.

Then the score (lower is better), each term scaled to 0..1 across the candidates:
  0.4 × price  +  0.2 × time to first token  +  0.2 × slowness (1 / tokens/s)
  +  0.2 × unreliability (1 − smoothed success rate).
Price matters most because it is what a requester set a cap on; the other
three stand for "how soon is my answer done". Ties break on the peer id, so the
choice is deterministic.

Speed and time to first token come from our own jobs where we have them
(``Reputation.observe``, smoothed); an offer's claims are only a stand-in, and
they are believed only so far:
  - a claim out of the plausible range (tokens/s not in (0, 100k], first token
    not in [1 ms, 10 min]; NaN and infinities included) counts as absent;
  - a claimed speed is capped at the fastest speed we measured among the
    candidates, and a claimed time to first token (plus the ping round trip)
    is floored at the quickest we measured, so a claim never beats a measurement;
  - an absent value gets the median of the candidates that have one.
A peer's time to first token is its measured one, else its ping round trip
(``Reputation.latency``; the median of measured peers if never pinged) plus its
claim.

Failing peers are banned with exponential backoff: 5 s after the first
consecutive failure, doubling up to 10 minutes; a success clears it.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from node.inference.numerics import claims_exact
from node.protocol.messages import Offer

WEIGHT_PRICE = 0.4
WEIGHT_LATENCY = 0.2
WEIGHT_SPEED = 0.2
WEIGHT_RELIABILITY = 0.2

#: Claims outside these count as absent (and measurements are clamped to the upper bounds).
MAX_PLAUSIBLE_TOKENS_PER_S = 100_000.0
MIN_PLAUSIBLE_FIRST_TOKEN_MS = 1.0  # no model answers within a millisecond of a request
MAX_PLAUSIBLE_FIRST_TOKEN_MS = 600_000.0
#: Weight of a new measurement in the smoothed averages.
SMOOTHING = 0.3


@dataclass(frozen=True)
class RouteQuery:
    """What the requester needs."""

    model: str  # CID
    max_price_per_1k: int | None = None  # None: any price
    chain_id: int = 0
    escrow: str = ""
    pinned_peer: str | None = None
    free_only: bool = False
    numerics: str = ""  # the requester's own class of exact numerics (its verifier's), "" if it has none
    exact_first: bool = True  # exact-checkable offers before noisy ones (``regime``)


@dataclass
class PeerRecord:
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    banned_until: float = 0.0  # a failure's backoff: a success ends it
    condemned_until: float = 0.0  # a ban for cheating (``Reputation.ban``): only time ends it
    latency_ms: float | None = None  # smoothed round-trip time
    tokens_per_s: float | None = None  # smoothed, measured on our own jobs
    first_token_ms: float | None = None  # smoothed, measured on our own jobs (request sent → first text)


def plausible(value: float | None, high: float, low: float = 0.0) -> float | None:
    """``value`` if it is a finite number in (0, high] and at least ``low``, else None (absent)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and 0 < value <= high and value >= low else None


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


@dataclass
class Reputation:
    """Local success/failure history per peer, with backoff bans.

    ``version`` counts changes, and ``changed_since`` names the peers changed after a
    version, so that a book's routing columns (``ModelColumns``) refresh only those.
    Every change goes through ``record``.
    """

    base_ban_s: float = 5.0
    max_ban_s: float = 600.0
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    version: int = field(default=0, init=False, compare=False)
    _touched: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def record(self, peer: str) -> PeerRecord:
        """``peer``'s record, to change (it counts as changed)."""
        self.version += 1
        self._touched.pop(peer, None)  # re-inserted last: the dict stays in order of last change
        self._touched[peer] = self.version
        return self.peers.setdefault(peer, PeerRecord())

    def changed_since(self, version: int) -> list[str]:
        """The peers whose records changed after ``version``, the last changed first."""
        changed = []
        for peer, at in reversed(self._touched.items()):
            if at <= version:
                break
            changed.append(peer)
        return changed

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

    def ban(self, peer: str, now: float, seconds: float) -> None:
        """Exclude ``peer`` for ``seconds`` (a worker caught cheating, or a node that framed one). Unlike a
        failure's backoff, neither a later success nor a later failure shortens it."""
        rec = self.record(peer)
        rec.failures += 1
        rec.condemned_until = max(rec.condemned_until, now + seconds)

    def latency(self, peer: str, rtt_ms: float) -> None:
        rec = self.record(peer)
        rec.latency_ms = rtt_ms if rec.latency_ms is None else 0.7 * rec.latency_ms + 0.3 * rtt_ms

    def observe(self, peer_id: str, *, tokens_per_s: float | None, first_token_ms: float | None) -> None:
        """Record what one of our jobs on ``peer_id`` measured; None (or a value that is no measurement) skips it.

        ``tokens_per_s``: generated tokens over the time from first to last text;
        ``first_token_ms``: from sending the request to the first text. Values
        above the plausible bounds are clamped to them; zero, negative and
        non-finite values are ignored.
        """
        rec = self.record(peer_id)
        for name, value, high in (
            ("tokens_per_s", tokens_per_s, MAX_PLAUSIBLE_TOKENS_PER_S),
            ("first_token_ms", first_token_ms, MAX_PLAUSIBLE_FIRST_TOKEN_MS),
        ):
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value) or value <= 0:
                continue
            setattr(rec, name, _smooth(getattr(rec, name), min(float(value), high)))

    def valued(self, peer: str) -> bool:
        """Whether ``peer`` has done a job for us (its offers are kept before strangers', node.market.offers)."""
        rec = self.peers.get(peer)
        return rec is not None and rec.successes > 0

    def banned(self, peer: str, now: float) -> bool:
        rec = self.peers.get(peer)
        return rec is not None and max(rec.banned_until, rec.condemned_until) > now

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
    if query.max_price_per_1k is not None and offer.price_per_1k > query.max_price_per_1k:
        return "over the price cap"
    if offer.price_per_1k > 0:
        if query.free_only:
            return "paid offer (pass --max-price to pay)"
        if offer.chain_id != query.chain_id or offer.escrow.lower() != query.escrow.lower():
            return "paid on another chain or escrow"
    if query.pinned_peer is None and reputation.banned(offer.peer_id, now):
        return "banned after recent failures"
    return None


REGIME_HERE, REGIME_EXACT, REGIME_NOISY = 0, 1, 2


def regime(offer: Offer, query: RouteQuery) -> int:
    """How exactly ``offer``'s answers can be checked: ``REGIME_HERE`` (in the requester's own class of exact
    numerics), ``REGIME_EXACT`` (in another class: by a verifier of that class) or ``REGIME_NOISY`` (no claim)."""
    if not claims_exact(offer.numerics):  # "" or "cpu"
        return REGIME_NOISY
    return REGIME_HERE if offer.numerics == query.numerics else REGIME_EXACT


def sample_key(offer: Offer) -> float:
    """How much a capped offer book wants to keep ``offer`` among its model's offers: lower is better.

    The routing score's weights on the offer's own claims (price 0.4, time to first
    token 0.2, slowness 0.2; a book knows no reputation), on a log scale instead of
    ``rank``'s min-max scaling, so that a key does not change with the other offers
    held: halving the price gains 0.4 × ln 2 whatever the prices are. A claim that is
    absent or implausible counts as the worst plausible one, so lying does not buy a place.
    """
    tokens_per_s = plausible(offer.tokens_per_s, MAX_PLAUSIBLE_TOKENS_PER_S) or 0.01
    first_token_ms = (
        plausible(offer.first_token_ms, MAX_PLAUSIBLE_FIRST_TOKEN_MS, MIN_PLAUSIBLE_FIRST_TOKEN_MS)
        or MAX_PLAUSIBLE_FIRST_TOKEN_MS
    )
    return (
        WEIGHT_PRICE * math.log1p(offer.price_per_1k)
        + WEIGHT_LATENCY * math.log(first_token_ms)
        - WEIGHT_SPEED * math.log(tokens_per_s)
    )


def _scaled(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    span = high - low
    return [0.0] * len(values) if span == 0 else [(v - low) / span for v in values]


def eligible(offers: Iterable[Offer], query: RouteQuery, reputation: Reputation, now: float) -> list[Offer]:
    """The offers whose ``exclusion`` is None, in one tight loop (``rank`` runs it over the whole market)."""
    pinned, cap, model = query.pinned_peer, query.max_price_per_1k, query.model
    free_only, chain_id, escrow = query.free_only, query.chain_id, query.escrow.lower()
    banned = (
        set()
        if pinned is not None
        else {p for p, r in reputation.peers.items() if max(r.banned_until, r.condemned_until) > now}
    )
    out = []
    for o in offers:
        if o.expires_at <= now:
            continue
        if pinned is not None and o.peer_id != pinned:
            continue
        price = o.price_per_1k
        if cap is not None and price > cap:
            continue
        if price > 0 and (free_only or o.chain_id != chain_id or o.escrow.lower() != escrow):
            continue
        for m in o.models:
            if m.cid == model:
                break
        else:
            continue
        if o.peer_id in banned:
            continue
        out.append(o)
    return out


def rank(
    offers: Iterable[Offer], query: RouteQuery, reputation: Reputation, now: float, *, limit: int | None = None
) -> list[Offer]:
    """The offers that can take the job, best first (only the best ``limit`` of them, if given)."""
    candidates = eligible(offers, query, reputation, now)
    if len(candidates) <= 1:
        return candidates
    peers = reputation.peers
    records = [peers.get(o.peer_id) for o in candidates]
    latency = _scaled(_first_token_estimates(candidates, records))
    price = _scaled([float(o.price_per_1k) for o in candidates])
    slowness = _scaled([1.0 / s for s in _speed_estimates(candidates, records)])
    unreliability = _scaled(
        [1.0 - ((r.successes + 1) / (r.successes + r.failures + 2) if r is not None else 0.5) for r in records]
    )
    exact_first = query.exact_first
    keyed = [
        (
            regime(o, query) if exact_first else REGIME_NOISY,
            o.slots_free <= 0,
            WEIGHT_PRICE * p + WEIGHT_LATENCY * lat + WEIGHT_SPEED * slow + WEIGHT_RELIABILITY * unrel,
            o.peer_id,
            i,
        )
        for i, (o, p, lat, slow, unrel) in enumerate(
            zip(candidates, price, latency, slowness, unreliability, strict=True)
        )
    ]
    best = heapq.nsmallest(limit, keyed) if limit is not None and limit < len(keyed) else sorted(keyed)
    return [candidates[i] for *_, i in best]


def _fill_absent(values: list[float | None]) -> list[float]:
    """Absent values become the median of the present ones (all equal if none is present)."""
    present = [v for v in values if v is not None]
    default = statistics.median(present) if present else 1.0
    return [default if v is None else v for v in values]


def _speed_estimates(candidates: list[Offer], records: list[PeerRecord | None]) -> list[float]:
    """Tokens/s per candidate: measured, else the plausible claim capped at the fastest measured."""
    measured = [r.tokens_per_s if r is not None else None for r in records]
    known = [m for m in measured if m is not None]
    cap = max(known) if known else MAX_PLAUSIBLE_TOKENS_PER_S
    estimates: list[float | None] = []
    for offer, m in zip(candidates, measured, strict=True):
        if m is not None:
            estimates.append(m)
        else:
            claim = plausible(offer.tokens_per_s, MAX_PLAUSIBLE_TOKENS_PER_S)
            estimates.append(None if claim is None else min(claim, cap))
    return _fill_absent(estimates)


def _first_token_estimates(candidates: list[Offer], records: list[PeerRecord | None]) -> list[float]:
    """Milliseconds to the first token per candidate: measured, else round trip + plausible claim."""
    rtts = [r.latency_ms if r is not None else None for r in records]
    known_rtts = [x for x in rtts if x is not None]
    default_rtt = statistics.median(known_rtts) if known_rtts else 0.0
    measured = [r.first_token_ms if r is not None else None for r in records]
    known = [m for m in measured if m is not None]
    floor = min(known) if known else 0.0
    estimates: list[float | None] = []
    for offer, m, rtt in zip(candidates, measured, rtts, strict=True):
        if m is not None:
            estimates.append(m)
            continue
        claim = plausible(offer.first_token_ms, MAX_PLAUSIBLE_FIRST_TOKEN_MS, MIN_PLAUSIBLE_FIRST_TOKEN_MS)
        if claim is None:
            estimates.append(None)
        else:
            estimates.append(max((default_rtt if rtt is None else rtt) + claim, floor))
    return _fill_absent(estimates)


# ------------------------------------------------------------------ the fast path: one model's offers as columns

#: Prices up to this convert to floats exactly; a cap compares exactly against them as floats.
_EXACT_FLOAT_INT = 2**53
_INT64_MAX = 2**63 - 1


class ModelColumns:
    """One model's offers as numpy columns, so that a routing decision is a few array operations.

    The offer book keeps one per model (node/market/offers.py) and ``put``s and
    ``remove``s offers as they come and go; ``best`` then makes ``rank(...,
    limit=1)``'s decision over them without a Python loop over the offers: the same
    filters (``exclusion``), the same estimates and the same order, number for number
    (tests/test_scale_policy.py compares them on random books). What it needs of the
    requester's ``Reputation`` it copies into columns too, and refreshes only the peers
    changed since the last decision (``Reputation.changed_since``).

    Rows are dense: a removed row is filled with the last one. Strings that filters
    compare (escrow, numerics) are kept as small integer codes.
    """

    _OFFER_COLUMNS = (
        ("expires", np.float64, 0.0),
        ("price", np.float64, 0.0),  # float(price_per_1k), as ``rank`` scales it
        ("big", np.bool_, False),  # price_per_1k is past what a float holds exactly
        ("paid", np.bool_, False),
        ("chain", np.int64, -1),  # -1: a chain id past int64 (matches no query's)
        ("escrow", np.int64, -1),  # code of the lowercased escrow
        ("full", np.bool_, False),  # no free slot
        ("claim_tps", np.float64, math.nan),  # plausible claims; NaN: absent
        ("claim_ftt", np.float64, math.nan),
        ("exact", np.bool_, False),  # claims a class of exact numerics
        ("numerics", np.int64, -1),  # code of that class
    )
    _REPUTATION_COLUMNS = (
        ("rtt", np.float64, math.nan),  # NaN: no record, or never pinged
        ("m_tps", np.float64, math.nan),  # measured on our jobs; NaN: never
        ("m_ftt", np.float64, math.nan),
        ("successes", np.float64, 0.0),
        ("failures", np.float64, 0.0),
        ("ban", np.float64, 0.0),  # banned until (backoff or cheating, whichever is later)
    )

    def __init__(self, capacity: int = 16) -> None:
        self.n = 0
        self.peers: list[str] = []
        self.offers: list[Offer] = []
        self.row: dict[str, int] = {}
        self._codes: dict[str, int] = {}
        self._next_code = 0
        self._capacity = 0
        self._grow(capacity)
        self._reputation: Reputation | None = None  # whose records the reputation columns hold
        self._reputation_version = 0
        self._unfilled: set[str] = set()  # peers put since, whose reputation columns are not filled yet

    def __len__(self) -> int:
        return self.n

    def _grow(self, capacity: int) -> None:
        for name, dtype, empty in self._OFFER_COLUMNS + self._REPUTATION_COLUMNS:
            column = np.full(capacity, empty, dtype=dtype)
            if self._capacity:
                column[: self.n] = getattr(self, name)[: self.n]
            setattr(self, name, column)
        self._capacity = capacity

    def _code(self, text: str) -> int:
        if len(self._codes) > 4 * self.n + 64:  # forget strings no offer uses any more
            used = {o.escrow.lower() for o in self.offers} | {o.numerics for o in self.offers}
            self._codes = {t: c for t, c in self._codes.items() if t in used}
        code = self._codes.get(text)
        if code is None:
            code = self._codes[text] = self._next_code
            self._next_code += 1
        return code

    def put(self, offer: Offer) -> None:
        """Add ``offer``, or replace the offer of its peer."""
        peer = offer.peer_id
        r = self.row.get(peer)
        if r is None:
            if self.n == self._capacity:
                self._grow(2 * self._capacity)
            r = self.n
            self.n += 1
            self.peers.append(peer)
            self.offers.append(offer)
            self.row[peer] = r
            for name, _, empty in self._REPUTATION_COLUMNS:
                getattr(self, name)[r] = empty
            self._unfilled.add(peer)
        else:
            self.offers[r] = offer
        price = offer.price_per_1k
        self.expires[r] = offer.expires_at
        self.price[r] = float(price)
        self.big[r] = price > _EXACT_FLOAT_INT
        self.paid[r] = price > 0
        self.chain[r] = offer.chain_id if 0 <= offer.chain_id <= _INT64_MAX else -1
        self.escrow[r] = self._code(offer.escrow.lower())
        self.full[r] = offer.slots_free <= 0
        tps = plausible(offer.tokens_per_s, MAX_PLAUSIBLE_TOKENS_PER_S)
        ftt = plausible(offer.first_token_ms, MAX_PLAUSIBLE_FIRST_TOKEN_MS, MIN_PLAUSIBLE_FIRST_TOKEN_MS)
        self.claim_tps[r] = math.nan if tps is None else tps
        self.claim_ftt[r] = math.nan if ftt is None else ftt
        self.exact[r] = claims_exact(offer.numerics)
        self.numerics[r] = self._code(offer.numerics)

    def remove(self, peer: str) -> None:
        r = self.row.pop(peer, None)
        if r is None:
            return
        self._unfilled.discard(peer)
        last = self.n - 1
        if r != last:  # the last row fills the hole
            for name, _, _ in self._OFFER_COLUMNS + self._REPUTATION_COLUMNS:
                column = getattr(self, name)
                column[r] = column[last]
            self.peers[r], self.offers[r] = self.peers[last], self.offers[last]
            self.row[self.peers[r]] = r
        self.peers.pop()
        self.offers.pop()
        self.n = last

    def _fill(self, r: int, record: PeerRecord | None) -> None:
        if record is None:
            for name, _, empty in self._REPUTATION_COLUMNS:
                getattr(self, name)[r] = empty
            return
        self.rtt[r] = math.nan if record.latency_ms is None else record.latency_ms
        self.m_tps[r] = math.nan if record.tokens_per_s is None else record.tokens_per_s
        self.m_ftt[r] = math.nan if record.first_token_ms is None else record.first_token_ms
        self.successes[r] = record.successes
        self.failures[r] = record.failures
        self.ban[r] = max(record.banned_until, record.condemned_until)

    def _sync(self, reputation: Reputation) -> None:
        """Bring the reputation columns up to ``reputation``'s records."""
        peers = reputation.peers
        if reputation is not self._reputation:
            for r, peer in enumerate(self.peers):
                self._fill(r, peers.get(peer))
            self._reputation = reputation
        else:
            for peer in self._unfilled.union(reputation.changed_since(self._reputation_version)):
                r = self.row.get(peer)
                if r is not None:
                    self._fill(r, peers.get(peer))
        self._unfilled.clear()
        self._reputation_version = reputation.version

    def _eligible(self, query: RouteQuery, now: float, exclude: Iterable[str]) -> np.ndarray:
        """Rows that pass ``exclusion`` and are not in ``exclude``, for a query with no pinned peer."""
        n = self.n
        ok = self.expires[:n] > now
        cap = query.max_price_per_1k
        if cap is not None and cap < _EXACT_FLOAT_INT:  # both exact as floats
            ok &= self.price[:n] <= float(cap)
        elif cap is not None:  # every price a float holds exactly is under the cap; compare the others exactly
            for r in np.flatnonzero(self.big[:n]):
                ok[r] &= self.offers[r].price_per_1k <= cap
        paid = self.paid[:n]
        if query.free_only:
            ok &= ~paid
        else:
            chain = query.chain_id if 0 <= query.chain_id <= _INT64_MAX else -2
            escrow = self._codes.get(query.escrow.lower(), -2)
            ok &= ~(paid & ((self.chain[:n] != chain) | (self.escrow[:n] != escrow)))
        ok &= ~(self.ban[:n] > now)
        for peer in exclude:
            r = self.row.get(peer)
            if r is not None:
                ok[r] = False
        return np.flatnonzero(ok)

    def best(self, query: RouteQuery, reputation: Reputation, now: float, exclude: Iterable[str] = ()) -> Offer | None:
        """What ``rank(offers, query, reputation, now, limit=1)`` would choose among this model's offers not in
        ``exclude`` (None if nothing can take the job). ``query.model`` must be this model's and
        ``query.pinned_peer`` None (a pinned query looks at one offer: ``rank`` it)."""
        self._sync(reputation)
        rows = self._eligible(query, now, exclude)
        if rows.size <= 1:
            return self.offers[rows[0]] if rows.size else None
        n = self.n

        def pick(column: np.ndarray) -> np.ndarray:  # the candidates' values (a view when every row is one)
            return column[:n] if rows.size == n else column.take(rows)

        # speed: measured, else the claim capped at the fastest measured; absent: the median
        measured = pick(self.m_tps)
        known = ~np.isnan(measured)
        cap = measured[known].max() if known.any() else MAX_PLAUSIBLE_TOKENS_PER_S
        speed = _filled(np.where(known, measured, np.minimum(pick(self.claim_tps), cap)))
        # first token: measured, else round trip (median of the pinged if never pinged) + claim, floored at
        # the quickest measured; absent: the median
        rtt = pick(self.rtt)
        pinged = ~np.isnan(rtt)
        default_rtt = _median(rtt[pinged]) if pinged.any() else 0.0
        measured = pick(self.m_ftt)
        known = ~np.isnan(measured)
        floor = measured[known].min() if known.any() else 0.0
        claimed = np.maximum(np.where(pinged, rtt, default_rtt) + pick(self.claim_ftt), floor)
        first_token = _filled(np.where(known, measured, claimed))
        successes = pick(self.successes)
        unreliability = 1.0 - (successes + 1.0) / (successes + pick(self.failures) + 2.0)
        score = (
            WEIGHT_PRICE * _scaled_array(pick(self.price))
            + WEIGHT_LATENCY * _scaled_array(first_token)
            + WEIGHT_SPEED * _scaled_array(1.0 / speed)
            + WEIGHT_RELIABILITY * _scaled_array(unreliability)
        )
        # order: checking regime, then free slots, then score, then peer id
        full = pick(self.full).astype(np.int64)
        if query.exact_first:
            exact = pick(self.exact)
            here = pick(self.numerics) == self._codes.get(query.numerics, -2)
            order = np.where(exact, np.where(here, REGIME_HERE, REGIME_EXACT), REGIME_NOISY) * 2 + full
        else:
            order = full
        first = order == order.min()
        top = score[first].min()
        ties = np.flatnonzero(first & (score == top))
        if rows.size != n:
            ties = rows[ties]
        return min((self.offers[r] for r in ties), key=lambda o: o.peer_id)


def _median(values: np.ndarray) -> float:
    """``statistics.median``'s number: the middle value, or the mean of the two middle ones as (a + b) / 2."""
    n = values.size
    half = n // 2
    if n % 2:
        return float(np.partition(values, half)[half])
    low, high = np.partition(values, (half - 1, half))[half - 1 : half + 1]
    return (float(low) + float(high)) / 2


def _filled(values: np.ndarray) -> np.ndarray:
    """``_fill_absent`` on an array with NaN for absent."""
    absent = np.isnan(values)
    if absent.any():
        present = values[~absent]
        values[absent] = _median(present) if present.size else 1.0
    return values


def _scaled_array(values: np.ndarray) -> np.ndarray:
    """``_scaled`` on an array."""
    low, high = values.min(), values.max()
    span = high - low
    return np.zeros_like(values) if span == 0 else (values - low) / span
