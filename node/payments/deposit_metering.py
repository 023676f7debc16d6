"""The worker's side of the deposit scheme: jobs paid from a requester's deposit in a ``DepositEscrow``.

A requester deposits once and pays any worker with EIP-712 receipts, each cumulative
for its (requester, worker) pair: "I owe this worker this much in total, ever"
(node/payments/deposit_receipts.py). Concurrent jobs to one worker share the pair's
counter: the requester raises it by each job's increment under a lock, and every
``deposit.receipt/1`` also says how much of the total is this job's. The meter
(the ``JobMeter`` of node/payments/metering.py) credits each job its own part.

**Admission** reads the requester's account and this worker's pair from chain
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
  yet receipted) past its bound: what the reserve guarantees it
  (``guaranteeOf``) once it holds a slot, else an unsecured ``allowance``
  (default: one job of ``ALLOWANCE_TOKENS`` tokens, a long prompt and the default
  ``max_tokens``).

**Receipts** are checked exactly as ``claim`` will (the requester's signature over
``Receipt(this worker, cumulative)`` for this chain and escrow) and committed to the
worker's ledger (SQLite, ``synchronous=FULL``) before the job is credited. The ledger
keeps the best signature per pair and the credit given to jobs, ever, and refuses a
credit that would pass the best receipt: the sum of all jobs' credits never exceeds
the best signed total (counted from what the chain had paid when the worker's ledger
began), so one signature can never back two jobs. Receipts of concurrent jobs may
arrive in any order: the requester's increments are allocated in sequence, so any
set of them is covered by the highest total among them.

**Settlement** is the ``DepositSettler``'s (node/payments/deposit_settlement.py): batch
claims, prompt ones for pairs without a slot and for unlocking requesters.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from eth_utils import is_address, to_checksum_address

from node.errors import InvalidReceipt, PaymentError, PaymentRefused
from node.payments.deposit_receipts import check_receipt
from node.payments.deposit_settlement import DepositSettler
from node.payments.metering import WaitsForReceipts
from node.payments.policy import deposit_problem, job_cost, prompt_token_bound, worst_case_cost
from node.protocol.messages import DepositReceipt, JobRequest
from node.protocol.wire import Message

if TYPE_CHECKING:  # web3 loads only where a client is made (node.app.paid)
    from node.payments.deposits import DepositAccount, DepositClient, PairState
    from node.payments.ledger import WorkerLedger

log = logging.getLogger(__name__)

#: A requester whose reserve does not back this worker yet may owe it this many tokens' worth unclaimed: the
#: worst case of one job at the default max_tokens (256) whose prompt is up to 8 KiB (the worker bounds a prompt
#: by its bytes before tokenizing it: a 2,048-token context's worth of text).
ALLOWANCE_TOKENS = 8192 + 256


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
    # Jobs admitted and not yet settled. Weak: a job that ends without settling (cancelled, cut off) frees its
    # reservation when the job service drops its meter.
    active: weakref.WeakSet[DepositMeter] = field(default_factory=weakref.WeakSet)
    best: int = 0  # the best receipt held (from the ledger)
    loaded: bool = False


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
    allowance: int | None = None  # unsecured exposure per requester without a slot; None: ALLOWANCE_TOKENS' worth
    cache_ttl_s: float = 5.0  # chain reads older than this are read again (events drop them sooner)
    receipt_timeout_s: float = 10.0
    settle_timeout_s: float = 180.0  # for the final receipt (a requester may check the answer first)
    events_poll_s: float = 1.0
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
        if held is not None and (held.unlock_at, held.has_slot) != (account.unlock_at, pair.has_slot):
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
        if account.unlocking:
            self.settler.nudge(requester, urgent=True)  # claim what we hold before it may withdraw
        return view

    def forget(self, requester: str) -> None:
        """Drop the cached read of ``requester`` (an event named it)."""
        self._views.pop(requester, None)

    def _claimed(self, requesters: set[str]) -> None:
        for requester in requesters:  # called from the settler's thread: a dict pop is atomic
            self._views.pop(requester, None)

    async def watch_events(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Drop cached reads of every requester an escrow event names, every ``events_poll_s``."""
        next_block = await self.client.io(self.client.block_number) + 1
        task_status.started()
        while True:
            await trio.sleep(self.events_poll_s)
            try:
                latest = await self.client.io(self.client.block_number)
                if latest < next_block:
                    continue
                changed = await self.client.io(self.client.requesters_changed, next_block, latest)
            except PaymentError as err:  # the chain is down: reads age out on the TTL meanwhile
                log.debug("cannot read the deposit escrow's events: %s", err)
                continue
            next_block = latest + 1
            for requester in changed:
                self.forget(requester)
                self.settler.nudge(requester)

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
            pair.best, pair.loaded = max(pair.best, held.best if held else 0), True
        return pair

    async def admit(self, request: JobRequest) -> DepositMeter:
        """Check the requester's account on chain. Raises ``PaymentRefused`` with the reason."""
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
        try:
            window = min(int(terms.credit_window), self.max_credit_window)
            view = await self.view(requester)
        except (ValueError, PaymentError) as err:
            raise PaymentRefused(f"cannot check the requester's deposit: {err}") from None
        pair = await self._pair(requester)
        needed = worst_case_cost(prompt_token_bound(request), int(request.params.get("max_tokens", 256)), price)
        exposure = max(pair.best - view.pair.paid, 0) + sum(m.reserved for m in pair.active)
        problem = deposit_problem(
            view.account, guarantee=view.guarantee, has_slot=view.pair.has_slot, exposure=exposure, needed=needed,
            allowance=self.allowance,
        )  # fmt: skip
        if problem:
            raise PaymentRefused(problem)
        meter = DepositMeter(self, request.job_id, requester, max(window, 1), needed)
        pair.active.add(meter)
        return meter


@dataclass(eq=False)
class DepositMeter(WaitsForReceipts):
    """One paid job's account: what it costs so far, and how much of the pair's receipts is credited to it."""

    metering: DepositMetering
    job_id: str
    requester: str
    window: int
    worst: int  # the job's worst-case cost, reserved against the bound until it is credited
    credited: int = 0  # this job's part of the receipts held
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def reserved(self) -> int:
        """What this job may still add to the requester's debt beyond its credit."""
        return max(self.worst - self.credited, 0)

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
            try:
                held = await trio.to_thread.run_sync(
                    lambda: metering.ledger.credit_pair(
                        metering.chain_id, metering.escrow, self.requester, cumulative, message.signature,
                        max(amount - self.credited, 0), floor=view.pair.paid if view else 0,
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
        metering = self.metering
        metering._pairs[self.requester].active.discard(self)
        view = metering._views.get(self.requester)
        urgent = view is None or not view.pair.has_slot or view.account.unlocking
        metering.settler.job_done(self.requester, urgent=urgent)
        return "paid" if paid else "final receipt missing"
