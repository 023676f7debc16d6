"""The worker's side of getting paid: claiming receipts on chain, and never losing one.

Receipts are in the ``WorkerLedger`` before the worker relies on them. The
``Settler`` turns them into ``claim`` transactions:

- after every ``settle_every`` jobs on a channel (1 by default: claim on job
  completion), or when ``settle_interval_s`` has passed since the channel's
  last claim, whichever comes first;
- always once a channel's expiry is within ``safety_margin_s``;
- at start-up, everything unclaimed (a restarted worker catches up).

A claim is a few hundred milliseconds of Python (web3, signing); on a small
machine that would slow the next job's decoding, so claims wait while the
worker is generating (``busy``) until it has been idle for ``idle_s``, for at
most ``max_defer_s``.

A claim that fails because the chain is unreachable is retried with backoff
(1 s, doubling to 60 s) and the worker keeps serving. A claim the contract can
never accept (channel closed, expired) is given up and recorded. If the chain
already paid more than the ledger knows (a crash after the transaction was
mined), the ledger is brought up to date from the chain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from node.errors import ChainUnreachable, ChannelExpired, ChannelNotOpen, PaymentError
from node.payments.ledger import WorkerChannel, WorkerLedger

if TYPE_CHECKING:  # web3 loads only where a client is made (node.app.paid)
    from node.payments.escrow import EscrowClient

log = logging.getLogger(__name__)


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
    settle_every: int = 1
    settle_interval_s: float | None = None
    safety_margin_s: float = 600.0


@dataclass
class Settler:
    ledger: WorkerLedger
    client: EscrowClient
    policy: SettlementPolicy = field(default_factory=SettlementPolicy)
    clock: Callable[[], float] = time.time
    busy: Callable[[], bool] = lambda: False  # is the worker generating right now?
    max_defer_s: float = 30.0
    idle_s: float = 0.5  # how long the worker must have been idle before a claim starts
    # Jobs paid per channel, counted on the trio thread, and how many of them the last claim covered, written
    # by the claiming thread. Each dict has one writer, so a job counted during a claim is never lost.
    _jobs_done: dict[bytes, int] = field(default_factory=dict)
    _jobs_claimed: dict[bytes, int] = field(default_factory=dict)
    _last_claim: dict[bytes, float] = field(default_factory=dict)
    _started: bool = False
    _failures: int = 0
    _poke: trio.Event = field(default_factory=trio.Event)

    def job_done(self, channel_id: bytes) -> None:
        """Count a job paid on ``channel_id``; wakes the settler if a claim is now due."""
        self._jobs_done[channel_id] = self._jobs_done.get(channel_id, 0) + 1
        if self._unclaimed_jobs(channel_id) >= self.policy.settle_every:
            self._poke.set()

    def _unclaimed_jobs(self, channel_id: bytes) -> int:
        return self._jobs_done.get(channel_id, 0) - self._jobs_claimed.get(channel_id, 0)

    def due(self, now: float) -> list[WorkerChannel]:
        """The channels to claim now, under the policy."""
        pending = self.ledger.pending_claims()
        if not self._started:
            return pending
        interval = self.policy.settle_interval_s
        return [
            c
            for c in pending
            if self._unclaimed_jobs(c.channel_id) >= self.policy.settle_every
            or (interval is not None and now - self._last_claim.get(c.channel_id, 0.0) >= interval)
            or c.expiry - now <= self.policy.safety_margin_s
        ]

    def claim(self, channel: WorkerChannel, jobs_covered: int | None = None) -> bool:
        """Claim one channel's latest receipt (blocking). Returns False if it should be retried later.

        ``jobs_covered``: how many jobs had been counted when ``channel`` was read from the ledger.
        """
        if jobs_covered is None:
            jobs_covered = self._jobs_done.get(channel.channel_id, 0)
        try:
            self.client.claim(channel.channel_id, channel.receipted, channel.signature)
        except ChainUnreachable as err:
            self.ledger.mark_failed(channel.channel_id, str(err))
            return False
        except (ChannelNotOpen, ChannelExpired) as err:
            log.warning("giving up on channel 0x%s…: %s", channel.channel_id.hex()[:12], err)
            self.ledger.mark_failed(channel.channel_id, str(err), give_up=True)
            return True
        except PaymentError as err:
            if err.error in ("NothingToClaim", "AmountBelowPaid"):
                paid = self.client.get_channel(channel.channel_id).paid  # already paid: catch the ledger up
                self.ledger.mark_claimed(channel.channel_id, paid)
                return True
            self.ledger.mark_failed(channel.channel_id, str(err))
            return False
        self.ledger.mark_claimed(channel.channel_id, channel.receipted)
        self._jobs_claimed[channel.channel_id] = jobs_covered
        self._last_claim[channel.channel_id] = self.clock()
        log.info("claimed %d on channel 0x%s…", channel.claimable, channel.channel_id.hex()[:12])
        return True

    def settle_once(self) -> tuple[int, int]:
        """Claim everything due (blocking); returns (claimed, failed)."""
        ok = failed = 0
        counted = dict(self._jobs_done)  # before reading the ledger: these jobs' receipts are in what we read
        for channel in self.due(self.clock()):
            if self.claim(channel, counted.get(channel.channel_id, 0)):
                ok += 1
            else:
                failed += 1
        self._started = True
        return ok, failed

    async def run(self, *, poll_s: float = 5.0, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Settle until cancelled: at start-up, when poked, and every ``poll_s``; back off while the chain is down."""
        task_status.started(self)
        while True:
            await wait_until_idle(self.busy, self.idle_s, self.max_defer_s)
            _, failed = await self.client.io(self.settle_once)
            self._failures = self._failures + 1 if failed else 0
            with trio.move_on_after(backoff(self._failures, poll_s)):
                await self._poke.wait()
            self._poke = trio.Event()
