"""The worker's side of getting paid from deposits: batch claims, and never losing a receipt.

The deposit scheme's receipts are in the ``WorkerLedger``'s pair table before the
worker relies on them (node/payments/deposit_metering.py). The ``DepositSettler``
turns them into ``claimBatch`` transactions: every requester due is claimed in one
transaction and one token transfer, up to ``max_batch`` receipts a transaction.

A pair is due:

- at once when the worker holds no reserve slot of the requester: until its
  first claim lands, nothing on chain guarantees it anything, so it claims
  promptly (and the claim takes a slot if one is free);
- at once when the requester is unlocking: withdrawal is possible at
  ``unlockAt``, so every receipt held is claimed before it;
- after ``settle_every`` jobs (1 by default), or ``settle_interval_s`` after its
  last claim (``SettlementPolicy``);
- at start-up: a restarted worker claims everything it holds.

A claim that paid less than the receipt (the requester's deposit ran out and the
worker's reserve share does not cover the rest) stays pending: it is tried again
when the requester's account changes on chain (``nudge``: a top-up lets the same
receipt claim the rest) or a new receipt comes, never in a loop. Claims wait while
the worker generates (``busy``) until it has been idle ``idle_s``, at most
``max_defer_s``; urgent ones (no slot, unlocking) do not wait.

The settler never stops the worker: any error of a round (an unreachable chain, a
rate-limited or refused RPC call, a read after a claim that failed) is logged once
and the round is retried with backoff (1 s doubling to 60 s) while the worker keeps
serving. Before claiming a pair whose state it is unsure of (at start-up, or when
the read after its last claim failed) it reads ``pairOf`` and only records what the
chain already paid, with no transaction. A claim that landed is read again for
``reorg_window_s`` (every ``recheck_s``): if a reorganisation dropped it, the ledger
learns the lower amount and the receipt is claimed again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from node.errors import ChainUnreachable, PaymentError
from node.payments.ledger import WorkerLedger, WorkerPair

if TYPE_CHECKING:  # web3 loads only where a client is made (node.app.paid)
    from node.payments.deposits import DepositClient, PairState

log = logging.getLogger(__name__)

MAX_BATCH = 100  # receipts per claimBatch: the gas target's size (docs/contracts.md)


async def wait_until_idle(busy: Callable[[], bool], idle_s: float, max_defer_s: float) -> None:
    """Return once ``busy()`` has been False for ``idle_s``, or after ``max_defer_s`` at most."""
    with trio.move_on_after(max_defer_s):
        idle_since = None
        while idle_since is None or trio.current_time() - idle_since < idle_s:
            if busy():
                idle_since = None
            elif idle_since is None:
                idle_since = trio.current_time()
            await trio.sleep(0.05)  # polling interval


def backoff(failures: int, poll_s: float) -> float:
    """How long to wait before the next round: ``poll_s``, or 1 s doubling to 60 s after failed rounds."""
    return min(60.0, 2.0 ** (failures - 1)) if failures else poll_s


@dataclass(frozen=True)
class SettlementPolicy:
    """When a worker claims a requester's receipts that are not due at once: every ``settle_every`` jobs, and at
    least every ``settle_interval_s`` (None: no interval)."""

    settle_every: int = 1
    settle_interval_s: float | None = None


@dataclass
class DepositSettler:
    ledger: WorkerLedger
    client: DepositClient  # with the worker's key
    policy: SettlementPolicy = field(default_factory=SettlementPolicy)
    clock: Callable[[], float] = time.time
    busy: Callable[[], bool] = lambda: False  # is the worker generating right now?
    max_defer_s: float = 30.0
    idle_s: float = 0.5
    max_batch: int = MAX_BATCH
    reorg_window_s: float = 900.0  # a landed claim is checked for a reorganisation this long…
    recheck_s: float = 60.0  # …this often
    # Told what the chain paid on each pair after a claim (the metering refreshes its reads of them).
    on_claimed: Callable[[dict[str, int]], None] = lambda paid: None
    # Counted on the trio thread (jobs per requester) and written by the claiming thread (what a claim covered):
    # one writer each, so a job counted during a claim is never lost.
    _jobs_done: dict[str, int] = field(default_factory=dict)
    _jobs_claimed: dict[str, int] = field(default_factory=dict)
    _last_claim: dict[str, float] = field(default_factory=dict)
    _tried: dict[str, tuple[int, int]] = field(default_factory=dict)  # requester → (best, claimed) last claimed
    _urgent: set[str] = field(default_factory=set)
    _unsure: set[str] = field(default_factory=set)  # pairs whose chain state after a claim could not be read
    _landed: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # requester → (paid, at, checked)
    _started: bool = False
    _failures: int = 0
    _poke: trio.Event = field(default_factory=trio.Event)

    @property
    def _where(self) -> tuple[int, str]:
        return self.client.deployment.chain_id, self.client.address

    def job_done(self, requester: str, *, urgent: bool = False) -> None:
        """Count a job paid by ``requester``; ``urgent``: claim it now (no slot yet, or the requester unlocks)."""
        self._jobs_done[requester] = self._jobs_done.get(requester, 0) + 1
        if urgent:
            self._urgent.add(requester)
        if urgent or self._unclaimed_jobs(requester) >= self.policy.settle_every:
            self._poke.set()

    def nudge(self, requester: str, *, urgent: bool = False) -> None:
        """The requester's account changed on chain: a receipt that was paid short may be claimed again."""
        self._tried.pop(requester, None)
        if urgent:
            self._urgent.add(requester)
            self._poke.set()

    def _unclaimed_jobs(self, requester: str) -> int:
        return self._jobs_done.get(requester, 0) - self._jobs_claimed.get(requester, 0)

    def due(self, now: float) -> list[WorkerPair]:
        """The pairs to claim now, under the policy (blocking: reads the ledger)."""
        pending = [
            p for p in self.ledger.pending_pairs(*self._where) if self._tried.get(p.requester) != (p.best, p.claimed)
        ]
        if not self._started:
            return pending
        interval = self.policy.settle_interval_s
        return [
            p
            for p in pending
            if p.requester in self._urgent
            or p.unlock_at
            or not p.has_slot
            or self._unclaimed_jobs(p.requester) >= self.policy.settle_every
            or (interval is not None and now - self._last_claim.get(p.requester, 0.0) >= interval)
        ]

    def urgent_due(self) -> bool:
        """Whether a pair is due that must not wait for the worker to be idle (blocking: reads the ledger)."""
        return any(p.unlock_at or not p.has_slot or p.requester in self._urgent for p in self.due(self.clock()))

    def claim(self, pairs: list[WorkerPair], counted: dict[str, int]) -> bool:
        """Claim ``pairs`` in one ``claimBatch`` (blocking). Returns False if it should be retried later.

        ``counted``: the jobs counted per requester when ``pairs`` were read from the ledger.
        """
        chain_id, escrow = self._where
        try:
            self.client.claim_batch([(p.requester, p.best, p.signature) for p in pairs])
        except ChainUnreachable as err:
            for p in pairs:
                self.ledger.update_pair(chain_id, escrow, p.requester, last_error=str(err))
            return False
        except PaymentError as err:
            if len(pairs) > 1:  # one entry the contract refuses reverts the batch: find it, claim the others
                log.warning("a batch claim of %d receipts was refused (%s); claiming them one by one", len(pairs), err)
                return all([self.claim([p], counted) for p in pairs])
            (pair,) = pairs
            log.warning("claim from %s refused: %s", pair.requester, err)
            self.ledger.update_pair(chain_id, escrow, pair.requester, last_error=str(err))
            self._tried[pair.requester] = (pair.best, pair.claimed)  # again only once something changes
            return True
        self._unsure.update(p.requester for p in pairs)  # until its state is read: no second transaction
        for p in pairs:
            self._jobs_claimed[p.requester] = counted.get(p.requester, 0)
            self._urgent.discard(p.requester)
        paid, unread = {}, None
        for p in pairs:
            try:
                state = self.client.pair_of(p.requester, self.client.account.address)
            except Exception as err:  # the claim landed; what it paid is read next round (``_unsure``)
                unread = err
                continue
            paid[p.requester] = self._record(p, state)
            log.info("claimed from %s: %s", p.requester, self._short(p, state) or f"{p.best - p.claimed} base units")
        if paid:
            self.on_claimed(paid)
        if unread is not None:
            log.warning("a claim landed, but what it paid cannot be read yet (read again next round): %s", unread)
        return unread is None

    @staticmethod
    def _short(p: WorkerPair, state: PairState) -> str | None:
        return f"paid {state.paid} of {p.best}: the requester's deposit ran out" if state.paid < p.best else None

    def _record(self, p: WorkerPair, state: PairState) -> int:
        """Write what the chain says of pair ``p`` (after a claim, or instead of one)."""
        chain_id, escrow = self._where
        self.ledger.update_pair(chain_id, escrow, p.requester, claimed=state.paid, has_slot=state.has_slot,
                                last_error=self._short(p, state))  # fmt: skip
        now = self.clock()
        self._tried[p.requester] = (p.best, state.paid)
        self._last_claim[p.requester] = now
        self._landed[p.requester] = (state.paid, now, now)
        self._unsure.discard(p.requester)
        return state.paid

    def _already_paid(self, pairs: list[WorkerPair]) -> list[WorkerPair]:
        """Of ``pairs``, those the chain has not paid in full; the others are recorded (blocking, a read each)."""
        claim, paid = [], {}
        for p in pairs:
            state = self.client.pair_of(p.requester, self.client.account.address)
            if state.paid >= p.best:
                paid[p.requester] = self._record(p, state)
            else:
                claim.append(p)
        if paid:
            self.on_claimed(paid)
        return claim

    def _check_reorgs(self) -> None:
        """Read again the pairs whose claims landed within ``reorg_window_s``; a claim that is gone is claimed
        again (blocking)."""
        now = self.clock()
        chain_id, escrow = self._where
        for requester, (paid, at, checked) in list(self._landed.items()):
            if now - at > self.reorg_window_s:
                del self._landed[requester]
                continue
            if now - checked < self.recheck_s:
                continue
            state = self.client.pair_of(requester, self.client.account.address)
            self._landed[requester] = (paid, at, now)
            if state.paid < paid:
                log.warning("a claim from %s was reorganised out (paid %d, was %d): claiming it again", requester,
                            state.paid, paid)  # fmt: skip
                self.ledger.lower_claimed(chain_id, escrow, requester, state.paid)
                self._tried.pop(requester, None)
                self._urgent.add(requester)
                self._landed[requester] = (state.paid, at, now)

    def settle_once(self) -> tuple[int, int]:
        """Claim everything due (blocking); returns (pairs claimed, pairs whose claim must be retried).

        Raises ``PaymentError`` (or any error of the chain client) when a read fails: ``run`` retries it.
        """
        ok = failed = 0
        self._check_reorgs()
        counted = dict(self._jobs_done)  # before reading the ledger: these jobs' receipts are in what we read
        due = self.due(self.clock())
        unsure = due if not self._started else [p for p in due if p.requester in self._unsure]
        if unsure:
            due = [p for p in due if p not in unsure] + self._already_paid(unsure)
        for start in range(0, len(due), self.max_batch):
            batch = due[start : start + self.max_batch]
            if self.claim(batch, counted):
                ok += len(batch)
            else:
                failed += len(batch)
        self._started = True
        return ok, failed

    async def run(self, *, poll_s: float = 5.0, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Settle until cancelled: at start-up, when poked, and every ``poll_s``; back off while the chain is down.

        Never fails: any error of a round is logged (once while it lasts) and the round retried with backoff."""
        task_status.started(self)
        while True:
            try:
                if self._started and not await trio.to_thread.run_sync(self.urgent_due):
                    await wait_until_idle(self.busy, self.idle_s, self.max_defer_s)
                _, failed = await self.client.io(self.settle_once)
                error = None
            except Exception as err:  # a settler that stops would never claim again: retry on any error
                failed, error = 1, err
            if error is not None and not self._failures:
                log.warning("cannot settle with the deposit escrow now (retrying with backoff): %s", error)
            self._failures = self._failures + 1 if failed else 0
            with trio.move_on_after(backoff(self._failures, poll_s)):
                await self._poke.wait()
            self._poke = trio.Event()
