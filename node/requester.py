"""Jobs from the requester's side: choose a worker, stream its answer, pay it, fail over.

``run_job`` walks the routed offers best first:

- a worker that rejects, cannot be reached, or fails before its first token is
  skipped for the next one;
- a worker that dies mid-stream is replaced by the next one, which is sent the
  text received so far (``resume_text``) and continues right after it; the
  caller is told (``on_failover``);
- when every usable worker turned it away as busy, it waits and asks again, like
  a queue, until the deadline;
- the whole job has one deadline, and never outlives it.

A worker that charges is paid from a ``Wallet``: a channel is reused or opened,
receipts are signed as tokens arrive (never for text not received), and the
final receipt is exactly usage × price (docs/payments.md). Failures are
remembered in the requester's ``Reputation`` (backoff bans), and successes too.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from node.billing import prompt_token_bound
from node.engine import SamplingParams
from node.errors import DeadlineExceeded, JobFailed, NoWorker, PeerUnreachable, WireError
from node.host import Host, Stream
from node.jobs import JOB_PROTOCOL, verify_receipt
from node.messages import (
    REJECT_BUSY,
    JobAccepted,
    JobCancel,
    JobChunk,
    JobDone,
    JobError,
    JobRejected,
    JobRequest,
    Offer,
    PaymentTerms,
    PayReceipt,
    ResultReceipt,
)
from node.payments.policy import job_cost, worst_case_cost
from node.payments.wallet import Wallet
from node.routing import Reputation, RouteQuery, exclusion, rank
from node.wire import receive, send


@dataclass(frozen=True)
class JobSpec:
    """What to run, independent of who runs it."""

    model: str
    params: SamplingParams
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_price_per_1k: int = 0


@dataclass
class JobResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    workers: list[str] = field(default_factory=list)  # every worker that produced part of the text
    receipts: list[ResultReceipt] = field(default_factory=list)
    elapsed_s: float = 0.0
    first_token_s: float | None = None
    cost: int = 0  # token base units signed to workers for this job (0 for free workers)


class _WorkerFailed(Exception):
    """One worker did not finish the job; ``partial``/``tokens`` is what it streamed first."""

    def __init__(
        self, reason: str, *, partial: str = "", tokens: int = 0, penalise: bool = True, busy: bool = False
    ) -> None:
        super().__init__(reason)
        self.partial, self.tokens, self.penalise, self.busy = partial, tokens, penalise, busy
        self.paid = 0  # what the requester signed to this worker before it failed


BUSY_RETRY_S = 0.25  # when every usable worker is busy, ask again after this long (until the deadline)
CREDIT_TOKENS = 64  # a paid worker may stream this many tokens' worth ahead of the last receipt


@dataclass
class _Payer:
    """The requester's side of one paid attempt: signs receipts as tokens arrive."""

    wallet: Wallet
    request: JobRequest
    price: int
    base: int  # what was signed on the channel before this job
    step: int  # sign again once this much more is owed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    signed: int = 0

    @property
    def channel_id(self) -> bytes:
        return self.request.payment.channel_id

    def owed(self, prompt_tokens: int, completion_tokens: int) -> int:
        return self.base + job_cost(prompt_tokens, completion_tokens, self.price)

    async def receipt(self, amount: int) -> PayReceipt:
        amount, signature = await trio.to_thread.run_sync(self.wallet.sign, self.channel_id, amount)
        self.signed = amount
        return PayReceipt(self.request.job_id, str(amount), signature)

    async def on_chunk(self, stream: Stream, chunk: JobChunk) -> None:
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.completion_tokens += chunk.tokens
        owed = self.owed(self.prompt_tokens, self.completion_tokens)
        if owed - self.signed >= self.step:
            await send(stream, await self.receipt(owed))

    async def on_done(self, stream: Stream, done: JobDone) -> None:
        """Sign the final receipt: exactly the job's usage at the price (after a plausibility check)."""
        usage = done.receipt
        if usage.prompt_tokens > prompt_token_bound(self.request):
            raise _WorkerFailed(f"worker claims {usage.prompt_tokens} prompt tokens for a shorter prompt")
        if usage.completion_tokens > int(self.request.params.get("max_tokens", 0)):
            raise _WorkerFailed(f"worker claims {usage.completion_tokens} tokens, more than max_tokens")
        await send(stream, await self.receipt(self.owed(usage.prompt_tokens, usage.completion_tokens)))


async def _payer_for(wallet: Wallet, offer: Offer, request: JobRequest) -> _Payer:
    """Choose (or open) a channel to the offer's payee and attach payment terms to ``request``."""
    price = offer.price_per_1k
    needed = worst_case_cost(prompt_token_bound(request), int(request.params["max_tokens"]), price)
    # A wallet that cannot fund a channel (no tokens, no ETH, no chain) cannot pay any worker:
    # its PaymentError ends the job rather than trying the next worker.
    channel = await trio.to_thread.run_sync(
        lambda: wallet.lease(offer.payee, needed, peer_id=offer.peer_id, max_leases=max(offer.slots_total, 1))
    )
    if channel is None:  # as many of our jobs as it has slots run there already
        raise _WorkerFailed("busy with our other jobs", penalise=False, busy=True)
    window = max(job_cost(0, CREDIT_TOKENS, price), 1)
    terms = PaymentTerms(channel.channel_id, channel.chain_id, channel.escrow, price, str(window))
    paid_request = dataclasses.replace(request, payment=terms)
    return _Payer(wallet, paid_request, price, channel.signed, max(window // 2, 1), signed=channel.signed)


async def _attempt(
    host: Host,
    offer: Offer,
    request: JobRequest,
    on_text: Callable[[str], None],
    accept_timeout_s: float,
    wallet: Wallet | None = None,
) -> tuple[JobDone, str, int]:
    """Run ``request`` on one worker (paying it from ``wallet`` if it charges); returns JobDone, text, cost."""
    if offer.price_per_1k <= 0 or wallet is None:
        return await _run_attempt(host, offer, request, on_text, accept_timeout_s, None)
    payer = None
    try:
        # Shielded: a cancellation while the wallet leases (in a thread) would lose the lease.
        with trio.CancelScope(shield=True):
            payer = await _payer_for(wallet, offer, request)
        return await _run_attempt(host, offer, payer.request, on_text, accept_timeout_s, payer)
    finally:
        if payer is not None:
            wallet.release(payer.channel_id)


async def _run_attempt(
    host: Host,
    offer: Offer,
    request: JobRequest,
    on_text: Callable[[str], None],
    accept_timeout_s: float,
    payer: _Payer | None,
) -> tuple[JobDone, str, int]:
    try:
        stream = await host.open_stream(offer.peer_id, JOB_PROTOCOL, offer.addrs)
    except PeerUnreachable as err:
        raise _WorkerFailed(str(err)) from None
    text, tokens = "", 0
    try:
        await send(stream, request)
        with trio.move_on_after(accept_timeout_s) as accept_wait:
            first = await receive(stream)
        if accept_wait.cancelled_caught:
            raise _WorkerFailed(f"no answer within {accept_timeout_s:.0f}s")
        if isinstance(first, JobRejected):
            detail = f"rejected: {first.reason} {first.detail}".strip()
            busy = first.reason == REJECT_BUSY
            raise _WorkerFailed(detail, penalise=not busy, busy=busy)
        if not isinstance(first, JobAccepted):
            raise _WorkerFailed(f"answered {first.TYPE} instead of accepting")
        while True:
            msg = await receive(stream)
            if isinstance(msg, JobChunk):
                text += msg.text
                tokens += msg.tokens
                on_text(msg.text)
                if payer is not None:
                    await payer.on_chunk(stream, msg)
            elif isinstance(msg, JobDone):
                problem = verify_receipt(msg.receipt, request, text)
                if problem:
                    raise _WorkerFailed(problem, partial=text, tokens=tokens)
                if payer is not None:
                    await payer.on_done(stream, msg)
                await stream.close()
                return msg, text, payer.signed - payer.base if payer else 0
            elif isinstance(msg, JobError):
                raise _WorkerFailed(f"worker error: {msg.detail}", partial=text, tokens=tokens)
            else:
                raise _WorkerFailed(f"unexpected {msg.TYPE}", partial=text, tokens=tokens)
    except (EOFError, ConnectionError, WireError) as err:
        await stream.reset()
        failure = _WorkerFailed(f"stream ended ({err or 'closed'})", partial=text, tokens=tokens)
        failure.paid = payer.signed - payer.base if payer else 0
        raise failure from None
    except _WorkerFailed as failure:
        failure.paid = payer.signed - payer.base if payer else 0
        await stream.reset()
        raise
    except BaseException:  # cancelled (deadline, Ctrl-C): tell the worker, then drop the stream
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await send(stream, JobCancel(request.job_id))
            except (ConnectionError, EOFError):
                pass
        await stream.reset()
        raise


def _why_no_worker(offers: list[Offer], query: RouteQuery, reputation: Reputation, now: float) -> str:
    reasons: dict[str, int] = {}
    for offer in offers:
        reason = exclusion(offer, query, reputation, now)
        if reason and reason not in ("not the pinned peer", "does not serve the model"):
            reasons[reason] = reasons.get(reason, 0) + 1
    if not reasons:
        who = f"peer {query.pinned_peer}" if query.pinned_peer else "no worker"
        return f"{who} offers model {query.model} on the market; see `llmarket peers`"
    detail = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    return f"no worker can take a job for {query.model} now ({detail}); see `llmarket peers`"


async def run_job(
    host: Host,
    offers: Callable[[], list[Offer]],
    query: RouteQuery,
    spec: JobSpec,
    *,
    reputation: Reputation,
    deadline_s: float = 120.0,
    accept_timeout_s: float = 10.0,
    on_text: Callable[[str], None] = lambda text: None,
    on_failover: Callable[[str, str, bool], None] = lambda peer, reason, started: None,
    clock: Callable[[], float] = time.time,
    wallet: Wallet | None = None,
) -> JobResult:
    """Run ``spec`` on the best workers in ``offers()``, failing over as needed.

    Args:
        offers: the live offers (called again after each failure).
        on_text: called with each piece of text as it streams in.
        on_failover: called with (peer id, reason, whether it had started) when a worker is dropped.
        wallet: pays workers that charge (the query must then allow paid offers on its chain and escrow).

    Raises:
        NoWorker: nobody can take the job at all.
        JobFailed: every candidate failed, or ``deadline_s`` passed.
    """
    job_id = secrets.token_hex(8)
    started_at = time.perf_counter()
    first_token_s: float | None = None
    text, completion_used = "", 0
    workers: list[str] = []
    receipts: list[ResultReceipt] = []
    tried: set[str] = set()
    busy: set[str] = set()  # tried, and turned us away only because all their slots were in use
    reasons: list[str] = []
    cost = 0

    def record_text(piece: str) -> None:
        nonlocal first_token_s
        if first_token_s is None:
            first_token_s = time.perf_counter() - started_at
        on_text(piece)

    with trio.move_on_after(deadline_s) as deadline:
        while True:
            available = [o for o in offers() if o.peer_id not in tried]
            candidates = rank(available, query, reputation, clock(), limit=1)  # re-ranked after every failure
            if not candidates and tried and tried == busy:
                # every worker we could use is busy: wait for one, like a queue, within the deadline
                await trio.sleep(BUSY_RETRY_S)
                tried.clear()
                busy.clear()
                continue
            if not candidates:
                if not tried:
                    raise NoWorker(_why_no_worker(offers(), query, reputation, clock()))
                raise JobFailed(f"every worker failed ({'; '.join(reasons)})")
            offer = candidates[0]
            tried.add(offer.peer_id)
            params = dataclasses.asdict(spec.params)
            params["stop"] = list(params["stop"])
            params["max_tokens"] = max(spec.params.max_tokens - completion_used, 1)
            request = JobRequest(
                job_id=job_id,
                model=spec.model,
                params=params,
                messages=spec.messages,
                prompt=spec.prompt,
                max_price_per_1k=spec.max_price_per_1k,
                resume_text=text,
            )
            began = time.perf_counter()
            try:
                done, part, paid = await _attempt(host, offer, request, record_text, accept_timeout_s, wallet)
                cost += paid
            except _WorkerFailed as failure:
                cost += failure.paid
                if failure.busy:
                    busy.add(offer.peer_id)
                if failure.partial:
                    text += failure.partial
                    completion_used += failure.tokens
                    workers.append(offer.peer_id)
                if failure.penalise:
                    reputation.failure(offer.peer_id, clock())
                reasons.append(f"{offer.peer_id[:12]}…: {failure}")
                on_failover(offer.peer_id, str(failure), bool(failure.partial))
                continue
            reputation.success(offer.peer_id)
            reputation.latency(offer.peer_id, 1000 * (time.perf_counter() - began))
            workers.append(offer.peer_id)
            receipts.append(done.receipt)
            return JobResult(
                text=text + part,
                finish_reason=done.finish_reason,
                prompt_tokens=done.receipt.prompt_tokens,
                completion_tokens=completion_used + done.receipt.completion_tokens,
                workers=workers,
                receipts=receipts,
                elapsed_s=time.perf_counter() - started_at,
                first_token_s=first_token_s,
                cost=cost,
            )
    assert deadline.cancelled_caught
    raise DeadlineExceeded(f"the job did not finish within its {deadline_s:.0f}s deadline ({len(text)} characters received)")
