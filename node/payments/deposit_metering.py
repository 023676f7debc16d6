"""The worker's side of the deposit scheme: jobs paid from a requester's deposit in a ``DepositEscrow``.

A requester deposits once and pays any worker with EIP-712 receipts, each cumulative
for its (requester, worker) pair: "I owe this worker this much in total, ever"
(node/payments/deposit_receipts.py). Concurrent jobs to one worker share the pair's
counter: the requester raises it by each job's increment under a lock, and every
``deposit.receipt/1`` also says how much of the total is this job's. The meter
(the ``JobMeter`` of node/payments/metering.py) credits each job its own part.

**Admission** first checks that the requester named in the terms sent them: its
signature binds the job id, this worker's payee address and the libp2p peer the
request came from (``DepositTerms.binding``), so nobody can name someone else's
deposit. It then reads the requester's account and this worker's pair from chain
(``accountOf``, ``pairOf``, ``guaranteeOf``), cached per requester for ``cache_ttl_s``
and dropped as soon as an event names the requester (``run`` polls the escrow's
events) or a claim of ours lands; never from what the requester says. It refuses
(``PaymentRefused``, node/payments/policy.py ``deposit_problem``):

- an unlocking requester (it may withdraw at ``unlockAt``; claims already held are
  claimed before then);
- a requester whose deposit plus this worker's reserve share cannot cover what it
  may owe this worker and the job's worst case;
- a job that would take this worker's unclaimed exposure to the requester (the best
  receipt held above what the chain paid, plus the running jobs' worst cases not
  yet receipted) past its bound: what the reserve guarantees it (``guaranteeOf``,
  0 without a slot) plus an unsecured ``allowance`` (default: one job of
  ``ALLOWANCE_TOKENS`` tokens, an 8 KiB conversation and the default ``max_tokens``);
- a job that would take the unsecured part of its exposure summed over every
  requester it serves past ``unsecured_cap`` (default ``UNSECURED_ALLOWANCES``
  allowances): a cheater hopping addresses gets at most that from one worker.

**Receipts** are checked exactly as ``claim`` will (the requester's signature over
``Receipt(this worker, cumulative)`` for this chain and escrow) and committed to the
worker's ledger (SQLite, ``synchronous=FULL``) before the job is credited. The ledger
keeps the best signature per pair and the credit given to jobs, ever, and refuses a
credit that would pass the best receipt: the sum of all jobs' credits never exceeds
the best signed total (counted from what the chain had paid when the worker's ledger
first held the pair, as read at the job's admission), so one signature can never
back two jobs, and a worker that lost its ledger never credits a receipt the chain
already paid. Receipts of concurrent jobs may arrive in any order: the requester's
increments are allocated in sequence, so any set of them is covered by the highest
total among them.

**However a job ends** the job service ``close``s its meter: the job's reservation is
given back and, if it took receipts, the settler counts it (a cancelled job's
receipts are claimed like a finished one's).

**Settlement** is the ``DepositSettler``'s (node/payments/deposit_settlement.py): batch
claims, prompt ones for pairs without a slot and for unlocking requesters. An
unlock is noticed from the escrow's events even when no further job comes: every
requester an event names whose receipts the worker holds unclaimed is read again,
which records its ``unlockAt`` in the ledger and has the settler claim at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from eth_utils import is_address, to_checksum_address

from node.errors import InvalidReceipt, PaymentError, PaymentRefused
from node.payments.deposit_receipts import check_job_terms, check_receipt
from node.payments.deposit_settlement import DepositSettler, backoff
from node.payments.metering import WaitsForReceipts
from node.payments.policy import (
    MESSAGE_TOKEN_OVERHEAD,
    PROMPT_TOKEN_OVERHEAD,
    deposit_problem,
    job_cost,
    prompt_token_bound,
    worst_case_cost,
)
from node.protocol.messages import DepositReceipt, DepositTerms, JobRequest
from node.protocol.wire import Message

if TYPE_CHECKING:  # web3 loads only where a client is made (node.app.paid)
    from node.payments.deposits import DepositAccount, DepositClient, PairState
    from node.payments.ledger import WorkerLedger

log = logging.getLogger(__name__)

#: A requester may owe this worker this many tokens' worth unsecured (beyond what its reserve guarantees the worker):
#: the worst case of one job at the default max_tokens (256) whose conversation is up to 8 KiB in up to 4 messages
#: (the worker bounds a prompt by its bytes, roles included, plus the template's overheads, before tokenizing it:
#: ``prompt_token_bound``). A job whose worst case is larger (say max_tokens 16k) is refused by a worker whose
#: reserve share does not cover it.
ALLOWANCE_TOKENS = 8192 + PROMPT_TOKEN_OVERHEAD + 4 * MESSAGE_TOKEN_OVERHEAD + 256
#: The unsecured exposure a worker accepts summed over every requester it serves, in allowances.
UNSECURED_ALLOWANCES = 4


@dataclass(frozen=True)
class ChainView:
    """A requester's account and this worker's pair, as read from chain at ``read_at`` (trio time)."""

    account: DepositAccount
    pair: PairState
    guarantee: int
    read_at: float


@dataclass
class _Pair:
    """One requester's pair, in memory: its lock (credits are decided one at a time) and the running jobs."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    active: set[DepositMeter] = field(default_factory=set)  # jobs admitted and not closed
    best: int = 0  # the best receipt held (from the ledger)
    paid: int = 0  # what the chain paid on the pair, as last seen
    guarantee: int = 0  # what the reserve guarantees this worker, as last seen
    has_slot: bool = False  # whether this worker holds one of the requester's slots, as last seen
    unlocking: bool = False  # whether the requester was unlocking, as last seen
    loaded: bool = False

    def exposure(self, paid: int | None = None) -> int:
        """What the requester may owe this worker unpaid: receipts held above ``paid`` and running jobs' rest."""
        return max(self.best - (self.paid if paid is None else paid), 0) + sum(m.reserved for m in self.active)

    def unsecured(self) -> int:
        return max(self.exposure() - self.guarantee, 0)


@dataclass
class DepositMetering:
    """A paid worker on the deposit scheme: admits jobs against the requester's account on chain.

    Blocking calls (web3, SQLite) run in threads; chain reads go through the client's ``io`` limiter. ``run``
    (in the worker's nursery) watches the escrow's events and runs the settler.
    """

    client: DepositClient  # with the worker's own key
    ledger: WorkerLedger
    price_per_1k: int
    max_credit_window: int = 0  # the most a requester may ask to stream ahead of receipts; 0: 256 tokens' worth
    settler: DepositSettler | None = None  # None: a settler with the default policy
    allowance: int | None = None  # unsecured exposure per requester; None: ALLOWANCE_TOKENS' worth
    unsecured_cap: int | None = None  # unsecured exposure over all requesters; None: UNSECURED_ALLOWANCES allowances
    cache_ttl_s: float = 5.0  # chain reads older than this are read again (events drop them sooner)
    receipt_timeout_s: float = 10.0
    settle_timeout_s: float = 180.0  # for the final receipt (a requester may check the answer first)
    events_poll_s: float = 1.0
    clock: Callable[[], float] = time.time  # wall clock: terms bindings expire
    _views: dict[str, ChainView] = field(default_factory=dict)
    _pairs: dict[str, _Pair] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.settler is None:
            self.settler = DepositSettler(self.ledger, self.client)
        self.settler.on_claimed = self._claimed
        if self.max_credit_window <= 0:
            self.max_credit_window = max(job_cost(0, 256, self.price_per_1k), 1)
        if self.allowance is None:
            self.allowance = job_cost(0, ALLOWANCE_TOKENS, self.price_per_1k)
        if self.unsecured_cap is None:
            self.unsecured_cap = UNSECURED_ALLOWANCES * self.allowance

    @property
    def payee(self) -> str:
        return self.client.account.address

    @property
    def escrow(self) -> str:
        return self.client.address

    @property
    def chain_id(self) -> int:
        return self.client.deployment.chain_id

    # ------------------------------------------------------------ chain reads

    def _read(self, requester: str) -> tuple[DepositAccount, PairState, int]:
        """Blocking: the requester's account, our pair and guarantee; the settler learns of an unlock."""
        client = self.client
        account, pair = client.account_of(requester), client.pair_of(requester, self.payee)
        guarantee = client.guarantee_of(requester, self.payee) if pair.has_slot else 0
        held = self.ledger.get_pair(self.chain_id, self.escrow, requester)
        if held is None or (held.unlock_at, held.has_slot) != (account.unlock_at, pair.has_slot):
            self.ledger.update_pair(self.chain_id, self.escrow, requester, unlock_at=account.unlock_at,
                                    has_slot=pair.has_slot)  # fmt: skip
        return account, pair, guarantee

    async def view(self, requester: str, *, fresh: bool = False) -> ChainView:
        """The requester's state on chain, from the cache if it is younger than ``cache_ttl_s``."""
        cached = self._views.get(requester)
        if cached is not None and not fresh and trio.current_time() - cached.read_at < self.cache_ttl_s:
            return cached
        account, pair, guarantee = await self.client.io(self._read, requester)
        view = ChainView(account, pair, guarantee, trio.current_time())
        self._views[requester] = view
        known = self._pairs.setdefault(requester, _Pair())
        known.paid, known.guarantee = max(known.paid, pair.paid), guarantee
        known.has_slot, known.unlocking = pair.has_slot, account.unlocking
        if account.unlocking:
            self.settler.nudge(requester, urgent=True)  # claim what we hold before it may withdraw
        return view

    def forget(self, requester: str) -> None:
        """Drop the cached read of ``requester`` (an event named it)."""
        self._views.pop(requester, None)

    def _claimed(self, paid: dict[str, int]) -> None:
        """A claim landed (called from the settler's thread: a dict pop and an int store are atomic)."""
        for requester, amount in paid.items():
            self._views.pop(requester, None)
            if (known := self._pairs.get(requester)) is not None:
                known.paid = max(known.paid, amount)

    def _holding(self, requesters: set[str]) -> list[str]:
        """Blocking: those of ``requesters`` whose receipts this worker holds above what the chain paid."""
        pending = {p.requester for p in self.ledger.pending_pairs(self.chain_id, self.escrow)}
        return sorted(requesters & pending)

    async def _events_once(self, next_block: int) -> int:
        """Handle the escrow's events from ``next_block`` on; returns the next block to read."""
        latest = await self.client.io(self.client.block_number)
        if latest < next_block:
            return next_block
        changed = await self.client.io(self.client.requesters_changed, next_block, latest)
        for requester in changed:
            self.forget(requester)
            self.settler.nudge(requester)
        # An unlock must be seen even if the requester never sends us another job: read again every requester
        # whose receipts we hold unclaimed (this records its unlockAt and, if it is unlocking, claims at once).
        for requester in await trio.to_thread.run_sync(self._holding, changed):
            await self.view(requester, fresh=True)
        return latest + 1

    async def watch_events(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Drop cached reads of every requester an escrow event names, every ``events_poll_s``.

        Never fails: while the chain cannot be read (any error: down, rate-limited, a refused log range) it logs
        one line, backs off (1 s doubling to 60 s) and reads the missed blocks once it answers again; cached
        reads age out on the TTL meanwhile.
        """
        next_block: int | None = None
        failures = 0

        async def step() -> None:
            nonlocal next_block, failures
            try:
                if next_block is None:  # from the chain's head on (the settler claims what is held at start-up)
                    next_block = await self.client.io(self.client.block_number) + 1
                else:
                    next_block = await self._events_once(next_block)
                if failures:
                    log.info("reading the deposit escrow's events again")
                failures = 0
            except Exception as err:  # a watcher that stops would miss unlocks: retry on any error
                if not failures:
                    log.warning("cannot read the deposit escrow's events (retrying with backoff): %s", err)
                failures += 1

        await step()
        task_status.started()
        while True:
            await trio.sleep(backoff(failures, self.events_poll_s))
            await step()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Watch events and settle until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.watch_events)
            await nursery.start(self.settler.run)
            task_status.started()

    # -------------------------------------------------------------- admission

    async def _pair(self, requester: str) -> _Pair:
        pair = self._pairs.setdefault(requester, _Pair())
        if not pair.loaded:
            held = await trio.to_thread.run_sync(self.ledger.get_pair, self.chain_id, self.escrow, requester)
            if held is not None:
                pair.best, pair.paid = max(pair.best, held.best), max(pair.paid, held.claimed)
            pair.loaded = True
        return pair

    def _check_binding(self, terms: DepositTerms, job_id: str, requester: str, peer_id: str) -> None:
        """Refuse terms the requester did not bind to this job, this worker and the peer that sent them."""
        if not terms.binding:
            raise PaymentRefused("the payment terms are not signed by the requester (no binding): update the client")
        try:
            expires_at = int(terms.expires_at)
            check_job_terms(self.client.domain, requester, job_id, self.payee, peer_id, expires_at, terms.binding)
        except (ValueError, TypeError, InvalidReceipt) as err:
            raise PaymentRefused(f"the payment terms are not the requester's for this peer and job: {err}") from None
        if expires_at < self.clock():
            raise PaymentRefused(f"the payment terms expired at {expires_at}: sign them again")

    async def admit(self, request: JobRequest, peer_id: str) -> DepositMeter:
        """Check the terms are bound to ``peer_id`` (the stream's remote peer) and the requester's account on
        chain. Raises ``PaymentRefused`` with the reason."""
        terms, price = request.payment, self.price_per_1k
        if terms is None:
            raise PaymentRefused(f"this worker charges {price} per 1k tokens: send payment terms (a deposit)")
        if terms.chain_id != self.chain_id or terms.escrow.lower() != self.escrow.lower():
            raise PaymentRefused(f"this worker is paid on chain {self.chain_id}, deposit escrow {self.escrow}")
        if terms.price_per_1k < price:
            raise PaymentRefused(f"price is {price} per 1k tokens, offered {terms.price_per_1k}")
        if not is_address(terms.requester):
            raise PaymentRefused(f"{terms.requester!r} is not an address")
        requester = to_checksum_address(terms.requester)
        self._check_binding(terms, request.job_id, requester, peer_id)  # before anything is read or reserved
        try:
            window = min(int(terms.credit_window), self.max_credit_window)
            view = await self.view(requester)
        except (ValueError, PaymentError) as err:
            raise PaymentRefused(f"cannot check the requester's deposit: {err}") from None
        pair = await self._pair(requester)
        needed = worst_case_cost(prompt_token_bound(request), int(request.params.get("max_tokens", 256)), price)
        exposure = pair.exposure(paid=view.pair.paid)
        others = sum(p.unsecured() for r, p in self._pairs.items() if r != requester)
        problem = deposit_problem(
            view.account, guarantee=view.guarantee, has_slot=view.pair.has_slot, exposure=exposure, needed=needed,
            allowance=self.allowance, unsecured_elsewhere=others, unsecured_cap=self.unsecured_cap,
        )  # fmt: skip
        if problem:
            raise PaymentRefused(problem)
        meter = DepositMeter(self, request.job_id, requester, max(window, 1), needed, floor=view.pair.paid)
        pair.active.add(meter)
        return meter


@dataclass(eq=False)
class DepositMeter(WaitsForReceipts):
    """One paid job's account: what it costs so far, and how much of the pair's receipts is credited to it."""

    metering: DepositMetering
    job_id: str
    requester: str
    window: int
    worst: int  # the job's worst-case cost, reserved against the bound until it is credited or closed
    floor: int = 0  # what the chain had paid on the pair when the job was admitted (read from chain)
    credited: int = 0  # this job's part of the receipts held
    _changed: trio.Event = field(default_factory=trio.Event)
    _closed: bool = False

    @property
    def reserved(self) -> int:
        """What this job may still add to the requester's debt beyond its credit."""
        return 0 if self._closed else max(self.worst - self.credited, 0)

    def covers(self, prompt_tokens: int, completion_tokens: int) -> bool:
        return job_cost(prompt_tokens, completion_tokens, self.metering.price_per_1k) - self.credited <= self.window

    async def take(self, message: Message) -> bool:
        if not isinstance(message, DepositReceipt) or message.job_id != self.job_id:
            return False
        try:
            cumulative, amount = int(message.cumulative), int(message.job_amount)
        except ValueError:
            amounts = f"{message.cumulative!r}, {message.job_amount!r}"
            raise InvalidReceipt(f"receipt amounts {amounts} are not numbers") from None
        if amount > cumulative:
            raise InvalidReceipt(f"this job's {amount} is more than the pair's total {cumulative}")
        metering = self.metering
        pair = await metering._pair(self.requester)
        if amount <= self.credited and cumulative <= pair.best:
            return True  # nothing new (or a replay)
        check_receipt(metering.client.domain, self.requester, metering.payee, cumulative, message.signature)
        async with pair.lock:  # one credit at a time per pair: each sees the one before
            view = metering._views.get(self.requester)
            # Where a ledger that never held the pair starts counting credits: what the chain had paid, read at
            # this job's admission at the latest (only this worker's claims raise it, and those are in its ledger).
            floor = max(self.floor, view.pair.paid if view else 0, pair.paid)
            try:
                held = await trio.to_thread.run_sync(
                    lambda: metering.ledger.credit_pair(
                        metering.chain_id, metering.escrow, self.requester, cumulative, message.signature,
                        max(amount - self.credited, 0), floor=floor,
                    )
                )  # fmt: skip
            except ValueError as err:
                raise InvalidReceipt(f"receipt does not back this job's credit: {err}") from None
            pair.best = held.best
        self.credited = max(self.credited, amount)
        self._receipt_taken()
        return True

    async def settle(self, prompt_tokens: int, completion_tokens: int) -> str:
        """Wait for this job's credit to reach exactly its cost (``settle_timeout_s``), then tell the settler."""
        final = job_cost(prompt_tokens, completion_tokens, self.metering.price_per_1k)
        paid = await self._wait_until(lambda: self.credited >= final, self.metering.settle_timeout_s)
        self.close()
        return "paid" if paid else "final receipt missing"

    def close(self) -> None:
        """The job ended (settled or not): free its reservation; if it took receipts, the settler counts it."""
        if self._closed:
            return
        self._closed = True
        metering = self.metering
        if (pair := metering._pairs.get(self.requester)) is not None:
            pair.active.discard(self)
        if self.credited > 0:  # claimed at once if nothing guarantees it (no slot) or the requester may withdraw
            urgent = pair is None or not pair.has_slot or pair.unlocking
            metering.settler.job_done(self.requester, urgent=urgent)
