"""The worker's side of payment: a meter per job.

``WorkerService`` (node/market/jobs.py) knows nothing of chains. For every request it
asks its ``Metering`` to ``admit`` it, which returns a ``JobMeter`` or raises
``PaymentRefused`` (the rejection is sent to the requester). While the job
streams, the service hands the meter every payment message the requester
sends (``take``), asks it whether the text produced so far is covered
(``covers``) and waits for credit when it is not (``wait_for_credit``). After
the job it asks the meter to ``settle`` the final amount.

Two meters exist here (a third, ``DepositMetering``, is in deposit_metering.py):

- ``FreeMetering``: the no-op meter of a free worker (everything is covered).
- ``EscrowMetering``: payment through an ``InferenceEscrow`` channel. Before
  generating, it reads the channel from the chain and refuses it unless it is
  open, pays this worker, leaves time to claim, and has the job's worst case
  left (``node.payments.policy.channel_problem``). While streaming, the
  requester sends cumulative receipts; each is checked exactly as the contract
  will (``node.payments.receipts.check_pay_receipt``) and written to the
  ledger before the worker relies on it.

The credit window. The prompt is paid first: once the worker has evaluated
the prompt it announces the prompt's exact size (a chunk with no text, see
node/market/jobs.py), and the requester signs for it, after checking the count
against a bound it computed from the prompt's bytes. From then on the worker
streams at most ``credit_window`` base units ahead of the last receipt, so a
requester that stops paying gets at most a window of text for free, and a
worker that stops streaming has been paid for at most what it sent plus the
prompt it evaluated. A window therefore only has to cover generation: any
prompt that fits the context can be paid for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from node.errors import InvalidReceipt, PaymentError, PaymentRefused
from node.payments.policy import channel_problem, job_cost, prompt_token_bound, worst_case_cost
from node.payments.receipts import check_pay_receipt
from node.protocol.messages import JobRequest, PaymentTerms, PayReceipt
from node.protocol.wire import Message

if TYPE_CHECKING:  # a free worker never imports web3
    from node.payments.escrow import ChannelState, EscrowClient
    from node.payments.ledger import WorkerLedger
    from node.payments.settlement import Settler


class JobMeter(Protocol):
    """One admitted job's account."""

    def covers(self, prompt_tokens: int, completion_tokens: int) -> bool:
        """Whether streaming this far is within the credit the requester has given."""

    async def take(self, message: Message) -> bool:
        """Handle a payment message from the requester; False if it is not one. Raises ``InvalidReceipt``."""

    async def wait_for_credit(self, prompt_tokens: int, completion_tokens: int) -> bool:
        """Wait until streaming this far is covered; False if the requester did not pay in time."""

    async def settle(self, prompt_tokens: int, completion_tokens: int) -> str:
        """After the job: collect the final amount for this usage. Returns a note for the job's log line."""


class Metering(Protocol):
    """Admits jobs: one meter per request."""

    price_per_1k: int

    async def admit(self, request: JobRequest) -> JobMeter:
        """The meter for ``request``. Raises ``PaymentRefused`` with the reason."""


# ---------------------------------------------------------------------- free


class FreeMeter:
    def covers(self, prompt_tokens: int, completion_tokens: int) -> bool:
        return True

    async def take(self, message: Message) -> bool:
        return False

    async def wait_for_credit(self, prompt_tokens: int, completion_tokens: int) -> bool:
        return True

    async def settle(self, prompt_tokens: int, completion_tokens: int) -> str:
        return ""


@dataclass(frozen=True)
class FreeMetering:
    """A free worker: every job is admitted and nothing is owed."""

    price_per_1k: int = 0

    async def admit(self, request: JobRequest) -> JobMeter:
        return FreeMeter()


# -------------------------------------------------------------------- escrow


@dataclass
class EscrowMetering:
    """A paid worker: jobs are paid through escrow channels, with receipts as tokens stream.

    Blocking calls (web3, SQLite) run in threads; chain reads go through the
    client's shared ``io`` limiter.
    """

    client: EscrowClient  # with the worker's own key
    ledger: WorkerLedger
    settler: Settler
    price_per_1k: int
    max_credit_window: int  # the most a requester may ask this worker to stream ahead of receipts
    min_time_left_s: float = 1800.0  # a channel must outlive this to be served (claims need time)
    receipt_timeout_s: float = 10.0
    # For the final receipt: a requester that checks an answer itself (``--verify``) signs it only after the
    # verdict, which re-runs prompt + answer on its machine. The slot is free meanwhile; only the stream waits.
    settle_timeout_s: float = 180.0

    @property
    def payee(self) -> str:
        return self.client.account.address

    async def admit(self, request: JobRequest) -> EscrowMeter:
        """Check the request's channel on chain. Raises ``PaymentRefused`` with the reason."""
        terms, price = request.payment, self.price_per_1k
        deployment = self.client.deployment
        if terms is None:
            raise PaymentRefused(f"this worker charges {price} per 1k tokens: send payment terms (a channel)")
        if not isinstance(terms, PaymentTerms):
            raise PaymentRefused(f"this worker is paid through escrow channels, not the {terms.scheme} scheme")
        if terms.chain_id != deployment.chain_id or terms.escrow.lower() != deployment.escrow.lower():
            raise PaymentRefused(f"this worker is paid on chain {deployment.chain_id}, escrow {deployment.escrow}")
        if terms.price_per_1k < price:
            raise PaymentRefused(f"price is {price} per 1k tokens, offered {terms.price_per_1k}")
        try:
            window = min(int(terms.credit_window), self.max_credit_window)
            channel = await self.client.io(self.client.get_channel, terms.channel_id)
            now = await self.client.io(self.client.chain_time)
        except (ValueError, PaymentError) as err:
            raise PaymentRefused(f"cannot check the channel: {err}") from None
        held = await trio.to_thread.run_sync(self.ledger.get, terms.channel_id)
        receipted = max(held.receipted if held else 0, channel.paid)
        needed = worst_case_cost(prompt_token_bound(request), int(request.params.get("max_tokens", 256)), price)
        problem = channel_problem(
            channel,
            payee=self.payee,
            now=now,
            min_time_left_s=self.min_time_left_s,
            signed_total=receipted,
            needed=needed,
        )
        if problem:
            raise PaymentRefused(problem)
        return EscrowMeter(self, request.job_id, channel, max(window, 1), receipted, receipted)


class WaitsForReceipts:
    """What the paid meters share: waiting until the receipts taken cover something.

    A subclass has ``metering`` (with ``receipt_timeout_s``), a ``_changed`` event and ``covers``, and calls
    ``_receipt_taken`` after each new receipt.
    """

    metering: Any  # the job's metering: ``receipt_timeout_s``
    _changed: trio.Event

    def covers(self, prompt_tokens: int, completion_tokens: int) -> bool:
        raise NotImplementedError

    def _receipt_taken(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_until(self, covered, timeout_s: float | None = None) -> bool:
        with trio.move_on_after(self.metering.receipt_timeout_s if timeout_s is None else timeout_s):
            while not covered():
                await self._changed.wait()
            return True
        return False

    async def wait_for_credit(self, prompt_tokens: int, completion_tokens: int) -> bool:
        return await self._wait_until(lambda: self.covers(prompt_tokens, completion_tokens))


@dataclass
class EscrowMeter(WaitsForReceipts):
    """One paid job's account: what it costs so far, and what the requester has receipted."""

    metering: EscrowMetering
    job_id: str
    channel: ChannelState
    window: int
    base: int  # what was owed on the channel before this job
    receipted: int  # the highest receipt held (cumulative, whole channel)
    _changed: trio.Event = field(default_factory=trio.Event)

    def owed(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The channel's cumulative amount if this job stopped now."""
        return self.base + job_cost(prompt_tokens, completion_tokens, self.metering.price_per_1k)

    def covers(self, prompt_tokens: int, completion_tokens: int) -> bool:
        return self.owed(prompt_tokens, completion_tokens) - self.receipted <= self.window

    async def take(self, message: Message) -> bool:
        if not isinstance(message, PayReceipt) or message.job_id != self.job_id:
            return False
        try:
            amount = int(message.cumulative)
        except ValueError:
            raise InvalidReceipt(f"receipt amount {message.cumulative!r} is not a number") from None
        if amount <= self.receipted:
            return True  # nothing new (or a replay)
        client, channel = self.metering.client, self.channel
        check_pay_receipt(
            client.domain, channel.channel_id, amount, message.signature,
            requester=channel.requester, deposit=channel.deposit, paid=channel.paid,
        )  # fmt: skip
        await trio.to_thread.run_sync(
            lambda: self.metering.ledger.record_receipt(
                channel.channel_id, amount, message.signature,
                chain_id=client.deployment.chain_id, escrow=client.deployment.escrow,
                requester=channel.requester, expiry=channel.expiry,
            )
        )  # fmt: skip
        self.receipted = amount
        self._receipt_taken()
        return True

    async def settle(self, prompt_tokens: int, completion_tokens: int) -> str:
        """Wait for a receipt of exactly the job's cost (``settle_timeout_s``: the requester may check the answer
        first), then tell the settler a job was paid."""
        final = self.owed(prompt_tokens, completion_tokens)
        paid = await self._wait_until(lambda: self.receipted >= final, self.metering.settle_timeout_s)
        self.metering.settler.job_done(self.channel.channel_id)
        return "paid" if paid else "final receipt missing"
