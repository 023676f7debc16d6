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
``max_defer_s``; urgent ones (no slot, unlocking) do not wait. An unreachable
chain is retried with backoff (1 s doubling to 60 s) while the worker keeps serving.
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
    from node.payments.deposits import DepositClient

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
    # Told which requesters' pairs changed on chain after each claim (the metering refreshes its reads of them).
    on_claimed: Callable[[set[str]], None] = lambda requesters: None
    # Counted on the trio thread (jobs per requester) and written by the claiming thread (what a claim covered):
    # one writer each, so a job counted during a claim is never lost.
    _jobs_done: dict[str, int] = field(default_factory=dict)
    _jobs_claimed: dict[str, int] = field(default_factory=dict)
    _last_claim: dict[str, float] = field(default_factory=dict)
    _tried: dict[str, tuple[int, int]] = field(default_factory=dict)  # requester → (best, claimed) last claimed
    _urgent: set[str] = field(default_factory=set)
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
        now = self.clock()
        for p in pairs:
            state = self.client.pair_of(p.requester, self.client.account.address)
            short = f"paid {state.paid} of {p.best}: the requester's deposit ran out" if state.paid < p.best else None
            self.ledger.update_pair(chain_id, escrow, p.requester, claimed=state.paid, has_slot=state.has_slot,
                                    last_error=short)  # fmt: skip
            self._tried[p.requester] = (p.best, state.paid)
            self._jobs_claimed[p.requester] = counted.get(p.requester, 0)
            self._last_claim[p.requester] = now
            self._urgent.discard(p.requester)
            log.info("claimed from %s: %s", p.requester, short or f"{p.best - p.claimed} base units")
        self.on_claimed({p.requester for p in pairs})
        return True

    def settle_once(self) -> tuple[int, int]:
        """Claim everything due (blocking); returns (pairs claimed, pairs whose claim must be retried)."""
        ok = failed = 0
        counted = dict(self._jobs_done)  # before reading the ledger: these jobs' receipts are in what we read
        due = self.due(self.clock())
        for start in range(0, len(due), self.max_batch):
            batch = due[start : start + self.max_batch]
            if self.claim(batch, counted):
                ok += len(batch)
            else:
                failed += len(batch)
        self._started = True
        return ok, failed

    async def run(self, *, poll_s: float = 5.0, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Settle until cancelled: at start-up, when poked, and every ``poll_s``; back off while the chain is down."""
        task_status.started(self)
        while True:
            if self._started and not await trio.to_thread.run_sync(self.urgent_due):
                await wait_until_idle(self.busy, self.idle_s, self.max_defer_s)
            _, failed = await self.client.io(self.settle_once)
            self._failures = self._failures + 1 if failed else 0
            with trio.move_on_after(backoff(self._failures, poll_s)):
                await self._poke.wait()
            self._poke = trio.Event()
