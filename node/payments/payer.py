"""The requester's side of payment: a payer that pays each attempt of a job.

``run_job`` (node/market/requester.py) knows nothing of chains. For every attempt on
a worker it asks its ``Payer`` for a ``JobPayment`` (``async with
payer.pay(offer, request) as payment``); the payment's ``request`` is what is
sent (with payment terms attached, for a paid worker). While the answer
streams, the requester hands every chunk to ``on_chunk`` and the final
``JobDone`` to ``on_done``; either may send a payment message back through
``send``. Leaving the block gives back whatever the payment held.

Two payers exist:

- ``FreePayer``: pays nothing; for free workers.
- ``DepositPayer``: pays any worker from the requester's one deposit in a
  ``DepositEscrow``, with no chain step (docs/payments.md). Free workers stay
  free. Its terms are bound to the peer the requester sends from (signed with
  the requester's key for the job, the worker and its peer id), so a worker
  knows the deposit named is the sender's.

``CheckedPayment`` is what a paid attempt is, whatever makes its receipts: what
is owed for what checks out, and when to sign; ``DepositPayment`` says only how
a receipt is made. What is signed, and
when (docs/payments.md): the prompt once the worker announces its size, then
generated text as it arrives, a receipt every half window, never for text not
received; the final receipt is exactly usage × price. Every count is checked
against the model's own tokenizer when the payer has a ``usage`` oracle
(node/payments/usage.py; the requester app always gives one): the prompt's
exact token count, the text's tokens while streaming, and the worker's
fingerprint records at the end. Without one (tests with scripted engines), the
prompt is bounded by its bytes only.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio
from eth_utils import to_checksum_address

from node.errors import ConfigError, Overcharge
from node.payments.policy import job_cost, prompt_token_bound
from node.payments.usage import CheckedUsage
from node.protocol.messages import DepositReceipt, DepositTerms, JobChunk, JobDone, JobRequest, Offer
from node.protocol.wire import Message

if TYPE_CHECKING:  # a requester that pays nobody never imports web3
    from node.payments.deposits import DepositClient
    from node.payments.ledger import WalletLedger

Send = Callable[[Message], Awaitable[None]]
#: The checked usage of a request to an offer's worker (node/payments/usage.py). Raises ``ModelError`` or
#: ``PeerUnreachable`` when the model's tokenizer cannot be had (from that worker or elsewhere).
UsageOracle = Callable[[Offer, JobRequest], Awaitable[CheckedUsage]]

CREDIT_TOKENS = 64  # a paid worker may stream this many tokens' worth ahead of the last receipt
TERMS_TTL_S = 600  # a job's terms binding is good for this long (the worker checks it when the job starts)


class JobPayment(Protocol):
    """How one attempt on one worker is paid."""

    request: JobRequest  # what to send the worker

    @property
    def spent(self) -> int:
        """What was signed to this worker for this attempt, in token base units."""

    async def on_chunk(self, send: Send, chunk: JobChunk) -> None:
        """Text arrived (or, with no text, the worker announced what the prompt costs). Raises ``Overcharge``."""

    async def on_done(self, send: Send, done: JobDone) -> None:
        """The job ended: pay the final amount for the usage in ``done``. Raises ``Overcharge``."""


class Payer(Protocol):
    def pay(self, offer: Offer, request: JobRequest) -> AsyncIterator[JobPayment | None]:
        """``async with payer.pay(offer, request) as payment``: None if this worker cannot be paid right now
        (it is then treated as busy). Raises ``PaymentError`` if the wallet cannot pay at all: that ends the job.
        """


# ---------------------------------------------------------------------- free


@dataclass
class FreePayment:
    request: JobRequest
    spent: int = 0

    async def on_chunk(self, send: Send, chunk: JobChunk) -> None:
        pass

    async def on_done(self, send: Send, done: JobDone) -> None:
        pass


class FreePayer:
    """Pays nothing (the requester without a wallet)."""

    @asynccontextmanager
    async def pay(self, offer: Offer, request: JobRequest) -> AsyncIterator[JobPayment | None]:
        yield FreePayment(request)


# ---------------------------------------------------------------- checked


@dataclass(kw_only=True)
class CheckedPayment:
    """What every paid attempt shares, whatever the scheme: what is owed for what checks out, and when to sign.

    Amounts here are this attempt's own (its cost so far); a scheme's subclass turns one into a signed receipt
    and sends it (``_pay``), and sets ``paid`` to what it signed for this attempt.
    """

    request: JobRequest  # with payment terms
    price: int
    step: int  # sign again once this much more is owed
    prompt_bound: int
    checked: CheckedUsage | None = None  # the model's own counts; None: the prompt's byte bound only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    paid: int = 0  # signed for this attempt so far
    text: str = ""  # received so far

    @property
    def spent(self) -> int:
        return self.paid

    def owed(self, prompt_tokens: int, completion_tokens: int) -> int:
        return job_cost(prompt_tokens, completion_tokens, self.price)

    async def _pay(self, send: Send, amount: int) -> None:
        """Sign for ``amount`` (this attempt's cost so far, more than ``paid``) and send the receipt."""
        raise NotImplementedError

    def _check_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        if prompt_tokens > self.prompt_bound:
            raise Overcharge(f"worker claims {prompt_tokens} prompt tokens for a prompt of at most {self.prompt_bound}")
        if completion_tokens > int(self.request.params.get("max_tokens", 0)):
            raise Overcharge(f"worker claims {completion_tokens} tokens, more than max_tokens")

    async def on_chunk(self, send: Send, chunk: JobChunk) -> None:
        if self.checked is not None:
            return await self._on_checked_chunk(send, chunk)
        prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self._check_usage(prompt_tokens, self.completion_tokens + chunk.tokens)
        self.prompt_tokens, self.completion_tokens = prompt_tokens, self.completion_tokens + chunk.tokens
        owed = self.owed(self.prompt_tokens, self.completion_tokens)
        # A chunk with no text is the worker asking for what is owed (the prompt, before its first token).
        if owed > self.paid and (not chunk.text or owed - self.paid >= self.step):
            await self._pay(send, owed)

    async def on_done(self, send: Send, done: JobDone) -> None:
        usage = done.receipt
        if self.checked is not None:
            problem = self.checked.prompt_problem(usage.prompt_tokens) or self.checked.completion_problem(
                done, self.text, self.request
            )
            if problem:
                await self._refuse(send, problem)
        self._check_usage(usage.prompt_tokens, usage.completion_tokens)
        owed = self.owed(usage.prompt_tokens, usage.completion_tokens)
        if owed > self.paid:
            await self._pay(send, owed)

    # ------------------------------------------------- with the model's tokenizer (node/payments/usage.py)

    def _checked_owed(self) -> int:
        """What the tokens that check out are worth: the prompt as claimed, at most its exact size, and the
        answer's tokens whose records spell text received."""
        assert self.checked is not None
        prompt = min(self.prompt_tokens, self.checked.prompt_tokens)
        return self.owed(prompt, self.checked.payable(self.text))

    async def _refuse(self, send: Send, problem: str) -> None:
        """Pay for what checks out, refuse the rest: an overcharging worker is paid exactly its true usage so
        far, and the attempt ends (``Overcharge``: the requester bans it)."""
        owed = self._checked_owed()
        if owed > self.paid:
            await self._pay(send, owed)
        raise Overcharge(problem, kept=self.checked.kept(self.text))

    async def _on_checked_chunk(self, send: Send, chunk: JobChunk) -> None:
        assert self.checked is not None
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.completion_tokens += chunk.tokens
        if problem := self.checked.prompt_problem(self.prompt_tokens):
            await self._refuse(send, problem)
        problem = self.checked.take(chunk)  # the records of the tokens billed
        self.text += chunk.text
        if problem or (problem := self.checked.text_problem(self.text)):
            await self._refuse(send, problem)
        if self.completion_tokens > int(self.request.params.get("max_tokens", 0)):
            await self._refuse(send, f"worker claims {self.completion_tokens} tokens, more than max_tokens")
        owed = self._checked_owed()
        # A chunk with no text is the worker asking for what is owed (the prompt, before its first token).
        if owed > self.paid and (not chunk.text or owed - self.paid >= self.step):
            await self._pay(send, owed)


# ------------------------------------------------------------------- deposit


@dataclass(kw_only=True)
class DepositPayment(CheckedPayment):
    """One paid attempt from the requester's deposit: each receipt raises the (requester, worker) pair's total by
    what this attempt owes since its last one, and says how much of the total is this job's."""

    payer: DepositPayer
    worker: str  # the payee's checksummed address
    peer_id: str = ""

    async def _pay(self, send: Send, amount: int) -> None:
        cumulative, signature = await self.payer.allocate(self.worker, amount - self.paid, peer_id=self.peer_id)
        self.paid = amount
        await send(DepositReceipt(self.request.job_id, str(cumulative), str(amount), signature))


@dataclass
class DepositPayer:
    """Pays workers that charge from the requester's deposit in a ``DepositEscrow``; free workers stay free.

    No chain call at all: a worker never met before is paid at once (its first receipt raises a pair total of
    0). The pair's total lives in ``ledger`` (the wallet's SQLite), raised and committed before the signature
    leaves the process, under a per-worker lock, so the increments of concurrent jobs to one worker add up and
    the worker can credit each job its own part (node/payments/deposit_metering.py).
    """

    client: DepositClient  # with the requester's key
    ledger: WalletLedger
    host_peer_id: str = ""  # the libp2p peer the requester sends jobs from: its terms are bound to it
    usage: UsageOracle | None = None  # the model's own token counts (node/payments/usage.py)
    # Per worker: the tokens' worth it may stream ahead of our last receipt (node/market/trust.py);
    # ``credit_tokens`` for every worker when None.
    credit: Callable[[str], int] | None = None
    credit_tokens: int = CREDIT_TOKENS
    clock: Callable[[], float] = time.time
    _locks: dict[str, trio.Lock] = field(default_factory=dict)  # worker address → its pair's lock

    @property
    def requester(self) -> str:
        return self.client.account.address

    @asynccontextmanager
    async def pay(self, offer: Offer, request: JobRequest) -> AsyncIterator[JobPayment | None]:
        price = offer.price_per_1k
        if price <= 0:
            yield FreePayment(request)
            return
        if not self.host_peer_id:
            raise ConfigError("a deposit payer needs the peer id it sends jobs from (host_peer_id)")
        checked = await self.usage(offer, request) if self.usage is not None else None
        bound = checked.prompt_tokens if checked is not None else prompt_token_bound(request)
        tokens = self.credit(offer.peer_id) if self.credit is not None else self.credit_tokens
        window = max(job_cost(0, tokens, price), 1)
        escrow, worker = self.client.address, to_checksum_address(offer.payee)
        expires_at = int(self.clock()) + TERMS_TTL_S
        binding = self.client.sign_job_terms(request.job_id, worker, self.host_peer_id, expires_at)
        terms = DepositTerms(self.requester, self.client.deployment.chain_id, escrow, price, str(window),
                             expires_at=expires_at, binding=binding)  # fmt: skip
        yield DepositPayment(
            request=dataclasses.replace(request, payment=terms), price=price, step=max(window // 2, 1),
            prompt_bound=bound, checked=checked, payer=self, worker=worker, peer_id=offer.peer_id,
        )  # fmt: skip

    async def allocate(self, worker: str, increment: int, *, peer_id: str = "") -> tuple[int, bytes]:
        """Raise the pair's total by ``increment``, committed, and sign it: ``(total, signature)``."""
        async with self._locks.setdefault(worker, trio.Lock()):
            return await trio.to_thread.run_sync(functools.partial(self._allocate, worker, increment, peer_id))

    def _allocate(self, worker: str, increment: int, peer_id: str) -> tuple[int, bytes]:
        deployment = self.client.deployment
        total = self.ledger.allocate(deployment.chain_id, self.client.address, worker, increment, peer_id=peer_id)
        return total, self.client.sign_receipt(worker, total)
