"""Adaptive trust: how often a requester spot-checks a worker, and how far it lets it stream ahead of payment.

A ban is per peer id (node/market/routing.py's ``Reputation.ban``), and a fresh key
costs nothing, so a caught cheater can come back as a stranger. A requester
therefore trusts a worker only as far as it has verified it: ``Trust`` keeps,
per worker, how many of its answers passed a check (our own ``--verify`` or a
spot check) and whether one failed, and turns that into two numbers.

``spot_probability(peer_id, base)``: the chance that a finished job is
spot-checked. A worker with fewer than ``FIRST_CHECKS`` passed checks is always
checked; after that the chance falls with each pass, as
``DECAY / (passed - FIRST_CHECKS + DECAY)``: 1 at ``FIRST_CHECKS`` passes,
½ after ``DECAY`` more, ⅓ after twice that, and so on, never below the
requester's ``base`` (``--spot-check``). A noisy worker (its receipts claim no
exact numerics, so it is checked in a noisy class: node/verify/judge.py) is checked at least
``NOISY_FACTOR × base``. ``base`` 0 turns checks off: the requester asked for none.
A worker caught once is always checked (it is banned anyway, node/verify/fraud.py).

A noisy worker's failed check can be *statistical* (``Verdict.statistical``:
too many flips of the seeded draw, a greedy pick past the near-tie allowance, …
limits that an honest worker on other hardware crosses in about 2% of jobs,
docs/verification.md). Such a failure is a strike, not a proof: ``struck``
makes the worker a stranger again (always checked for its next
``FIRST_CHECKS`` jobs, the smallest credit window) and says whether it has
now failed ``STRIKES`` checks in a row, when the caller bans it as for any
failed check. A check that passes clears the strikes. An honest noisy worker
is then banned after two failures in a row (about 0.04% of pairs of checks),
while a cheater that the noisy checks catch 95% of the time is, after its
first strike, checked on its next ``FIRST_CHECKS`` jobs, where one more cheat
is very likely its second strike.

``credit_tokens(peer_id)``: how many tokens' worth a paid worker may stream
ahead of the requester's last receipt (node/payments/payer.py). It starts at
``CREDIT_START`` and doubles every ``FIRST_CHECKS`` passes, up to
``CREDIT_TOKENS`` (the payer's fixed window before adaptive trust).

The constants are chosen with ``bench/spotcheck.py``, which runs this very code
against honest workers and cheaters that take a new key after each catch
(docs/verification.md, "Trust"). The probability falls with *passes*, not with
jobs, so the only way to be checked less is to be checked and pass; how fast
it falls is bounded by what checking honest workers may cost (at a verifier's
default price, a tenth of the job's, a check costs about a tenth of the job).

``Trust`` is plain memory, one small record per worker, kept for at most
``max_peers`` workers (the least verified are forgotten first: a forgotten
worker is a stranger again, which only means more checks). One object per
requester; no module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from node.payments.payer import CREDIT_TOKENS

#: A worker's first jobs are checked whatever the requester's base probability (unless that is 0).
FIRST_CHECKS = 3
#: After ``FIRST_CHECKS`` passes, the probability halves after this many more passes, thirds after twice that…
DECAY = 1.5
#: A noisy worker (no exact numerics claimed) is checked at least this many times the base probability.
NOISY_FACTOR = 2.0
#: Statistical failures in a row (no passed check between) that ban a noisy worker (``Trust.struck``).
STRIKES = 2
#: The credit window of a worker with no verified history, in tokens; it doubles every ``FIRST_CHECKS`` passes.
CREDIT_START = 16


def probability_after(passed: int, base: float, *, exact: bool = True) -> float:
    """The spot-check probability of a worker whose answers passed ``passed`` checks (none failed)."""
    if base <= 0:
        return 0.0
    floor = min(1.0, base if exact else NOISY_FACTOR * base)
    if passed < FIRST_CHECKS:
        return 1.0
    return max(floor, min(1.0, DECAY / (passed - FIRST_CHECKS + DECAY)))


def credit_after(passed: int) -> int:
    """The credit window, in tokens, of a worker whose answers passed ``passed`` checks (none failed)."""
    return min(CREDIT_TOKENS, CREDIT_START << min(passed // FIRST_CHECKS, 16))


@dataclass
class TrustRecord:
    passed: int = 0  # answers of this worker that passed a check
    caught: bool = False  # an answer of this worker failed a check
    strikes: int = 0  # statistical failures since its last passed check


@dataclass
class Trust:
    """What a requester has verified of each worker, and the spot-check probability and credit that follow."""

    max_peers: int = 10_000
    strikes: int = STRIKES  # statistical failures in a row that ban (``struck``)
    peers: dict[str, TrustRecord] = field(default_factory=dict)

    def spot_probability(self, peer_id: str, base: float, *, exact: bool = True) -> float:
        """The chance that a job ``peer_id`` finished is spot-checked, for a requester whose own is ``base``.

        ``exact``: the worker's receipt claims exact numerics (see the module docstring for the noisy floor).
        """
        if base <= 0:
            return 0.0
        rec = self.peers.get(peer_id)
        if rec is not None and rec.caught:
            return 1.0
        return probability_after(rec.passed if rec is not None else 0, base, exact=exact)

    def credit_tokens(self, peer_id: str) -> int:
        """Tokens' worth ``peer_id`` may stream ahead of our last receipt."""
        rec = self.peers.get(peer_id)
        if rec is None or rec.caught:
            return CREDIT_START
        return credit_after(rec.passed)

    def passed(self, peer_id: str) -> None:
        """An answer of ``peer_id`` passed a check (ours or a spot check)."""
        rec = self._record(peer_id)
        rec.passed += 1
        rec.strikes = 0

    def struck(self, peer_id: str) -> bool:
        """An answer of ``peer_id`` failed a check only statistically: it starts over as a stranger. True when
        that makes ``strikes`` in a row, and the caller treats it as caught (bans it, ``failed``)."""
        rec = self._record(peer_id)
        rec.passed = 0
        rec.strikes += 1
        return rec.strikes >= self.strikes

    def failed(self, peer_id: str) -> None:
        """An answer of ``peer_id`` failed a check: it starts over, and is always checked."""
        rec = self._record(peer_id)
        rec.passed, rec.caught = 0, True

    def verified(self, peer_id: str) -> int:
        """How many of ``peer_id``'s answers passed a check."""
        rec = self.peers.get(peer_id)
        return 0 if rec is None else rec.passed

    def _record(self, peer_id: str) -> TrustRecord:
        rec = self.peers.get(peer_id)
        if rec is None:
            if len(self.peers) >= self.max_peers:
                least = min(self.peers, key=lambda p: (self.peers[p].passed, self.peers[p].strikes))
                del self.peers[least]
            rec = self.peers[peer_id] = TrustRecord()
        return rec
