"""Jobs over ``/llmarket/job/1.0.0``: the worker's side and the requester's side.

One job is one stream. The requester sends a ``JobRequest`` and keeps its side
open; the worker answers ``JobRejected`` (busy, unknown model, price,
malformed) or ``JobAccepted``, then ``JobChunk``s as tokens come, then
``JobDone`` with a signed ``ResultReceipt`` (or ``JobError``). Either side
cancels: the requester by sending ``JobCancel`` or just going away (the worker
stops generating at the next token and frees the slot); the worker by ending
the stream.

The requester (``run_job``) walks the routed offers best first:

- a worker that rejects, cannot be reached, or fails before its first token is
  skipped for the next one;
- a worker that dies mid-stream is replaced by the next one, which is sent the
  text received so far (``resume_text``) and continues right after it; the
  caller is told (``on_failover``);
- the whole job has one deadline, and never outlives it.

Failures are remembered in the requester's ``Reputation`` (backoff bans), and
successes too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from node.billing import Billing, PaymentRefused, WorkerPayments, prompt_token_bound
from node.concurrency import open_service_nursery
from node.engine import Delta, Finished, SamplingParams
from node.errors import InvalidReceipt, InvalidRequest, NodeError, PaymentError, WireError
from node.host import Host, PeerUnreachable, Stream
from node.identity import Identity, verify_peer_signature
from node.messages import (
    REJECT_BUSY,
    REJECT_MALFORMED,
    REJECT_PAYMENT,
    REJECT_PRICE,
    REJECT_UNKNOWN_MODEL,
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
from node.wire import encode, pack, receive, receive_as, send

log = logging.getLogger("node.jobs")

JOB_PROTOCOL = "/llmarket/job/1.0.0"


class NoWorker(NodeError):
    """No worker on the market can take the job (none offers the model, all are busy, or all failed)."""


class JobFailed(NodeError):
    """The job did not finish: every worker tried failed, or the deadline passed."""


class JobEngine(Protocol):
    """What a worker needs of an engine (``node.engine.Engine`` or a test double)."""

    @property
    def free_slots(self) -> int: ...

    def stream_chat(self, messages: Any, params: SamplingParams, *, assistant_prefix: str = ""): ...

    def stream_completion(self, prompt: str, params: SamplingParams): ...


def request_hash(request: JobRequest) -> bytes:
    return hashlib.sha256(encode(request)).digest()


def receipt_signing_bytes(receipt: ResultReceipt) -> bytes:
    return pack(dataclasses.replace(receipt, signature=b""))


def verify_receipt(receipt: ResultReceipt, request: JobRequest, output: str) -> str | None:
    """Why the worker's result receipt does not check out, or None if it does."""
    if receipt.job_id != request.job_id or receipt.model != request.model:
        return "receipt is for another job or model"
    if receipt.request_hash != request_hash(request):
        return "receipt is for another request"
    if receipt.output_hash != hashlib.sha256(output.encode()).digest():
        return "receipt does not match the text received"
    if not verify_peer_signature(receipt.worker, receipt_signing_bytes(receipt), receipt.signature):
        return "receipt signature is not the worker's"
    return None


# ------------------------------------------------------------------- worker


@dataclass
class WorkerService:
    """Serve jobs on ``host`` with ``engine`` for the models in ``models`` (CID → engine)."""

    host: Host
    identity: Identity
    engines: dict[str, JobEngine]
    price_per_1k: int = 0
    request_timeout_s: float = 10.0
    flush_s: float = 0.02
    busy_wait_s: float = 1.0
    payments: WorkerPayments | None = None  # required when price_per_1k > 0
    on_slots_changed: Callable[[], None] = lambda: None

    def install(self) -> None:
        self.host.set_handler(JOB_PROTOCOL, self.handle)

    @property
    def free_slots(self) -> int:
        return sum(e.free_slots for e in self.engines.values())

    async def handle(self, stream: Stream) -> None:
        with trio.fail_after(self.request_timeout_s):
            request = await receive_as(stream, JobRequest)
        engine = self.engines.get(request.model)
        rejection = None
        try:
            params = SamplingParams(**{**request.params, "stop": tuple(request.params.get("stop", ()))})
            params.validate()
            if (request.messages is None) == (request.prompt is None):
                raise InvalidRequest("send messages or a prompt, not both or neither")
        except (TypeError, InvalidRequest) as err:
            rejection = JobRejected(request.job_id, REJECT_MALFORMED, str(err))
        else:
            if engine is None:
                rejection = JobRejected(
                    request.job_id, REJECT_UNKNOWN_MODEL, f"this worker does not serve {request.model}"
                )
            elif self.price_per_1k > request.max_price_per_1k:
                rejection = JobRejected(request.job_id, REJECT_PRICE, f"price is {self.price_per_1k} per 1k tokens")
            elif not await self._slot_soon(engine):
                rejection = JobRejected(request.job_id, REJECT_BUSY, "all slots are busy")
        billing = None
        if rejection is None and self.price_per_1k > 0:
            try:
                if self.payments is None:
                    raise PaymentRefused("this worker has no payment set-up")
                billing = await Billing.open(self.payments, request, self.price_per_1k)
            except PaymentRefused as err:
                rejection = JobRejected(request.job_id, REJECT_PAYMENT, str(err))
        if rejection is not None:
            log.info("job %s from %s…: rejected (%s)", request.job_id, stream.peer_id[:12], rejection.reason)
            await send(stream, rejection)
            await stream.close()
            return
        if request.messages is not None:
            generation = engine.stream_chat(request.messages, params, assistant_prefix=request.resume_text)
        else:
            generation = engine.stream_completion(request.prompt + request.resume_text, params)
        await self._run(stream, request, generation, billing)

    async def _slot_soon(self, engine: JobEngine) -> bool:
        """Whether a slot is free, or frees within ``busy_wait_s``.

        A requester that sends its next job right after the last one finished
        would otherwise often find the slot not yet released (a few ms) and be
        turned away; genuinely busy workers still answer within a moment.
        """
        with trio.move_on_after(self.busy_wait_s):
            while engine.free_slots <= 0:
                await trio.sleep(0.01)  # polling interval; the engine has no "slot freed" event
            return True
        return False

    async def _run(self, stream: Stream, request: JobRequest, generation, billing: Billing | None) -> None:
        async with open_service_nursery() as nursery:
            # The requester's side stays open: a JobCancel, or the stream ending, cancels the job.
            async def watch() -> None:
                try:
                    while True:
                        msg = await receive(stream)
                        if isinstance(msg, JobCancel) and msg.job_id == request.job_id:
                            break
                        if isinstance(msg, PayReceipt) and billing is not None and msg.job_id == request.job_id:
                            await billing.accept(msg)
                except (EOFError, ConnectionError, WireError):
                    pass
                except InvalidReceipt as err:
                    log.info("job %s: stopping on a bad receipt: %s", request.job_id, err)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            log.info("job %s from %s…: accepted", request.job_id, stream.peer_id[:12])
            outcome = "cancelled"
            try:
                async with generation as events:
                    await send(stream, JobAccepted(request.job_id, self.price_per_1k, 0))
                    self.on_slots_changed()
                    outcome, final = await self._pump(stream, request, events, billing)
                if billing is not None and final is not None:  # the slot is free again; now collect the pay
                    paid = await billing.wait_for_final(final)
                    outcome += ", paid" if paid else ", final receipt missing"
                    billing.done()
            except InvalidRequest as err:
                await send(stream, JobRejected(request.job_id, REJECT_MALFORMED, str(err)))
            finally:
                self.on_slots_changed()
                log.info("job %s: %s", request.job_id, outcome)
            await stream.close()
            nursery.cancel_scope.cancel()

    async def _pump(
        self, stream: Stream, request: JobRequest, events, billing: Billing | None
    ) -> tuple[str, int | None]:
        """Forward the engine's events as frames; returns how the job ended, and what a paid job owes in all.

        The first text goes out at once (time to first token); after that, text
        is sent at most every ``flush_s``: one frame per few tokens instead of
        one per token, which matters when requester and worker share CPUs. A
        paid job sends text only while the requester's receipts cover it.
        """
        text, tokens, sent_first = "", 0, False
        prompt_tokens = completion_tokens = 0
        flush_at = math.inf
        async with events:
            while True:
                event = None
                with trio.move_on_at(flush_at):
                    try:
                        event = await events.receive()
                    except trio.EndOfChannel:
                        return "ended without a result", None
                if isinstance(event, Delta):
                    text, tokens = text + event.text, tokens + event.tokens
                    prompt_tokens, completion_tokens = event.prompt_tokens, completion_tokens + event.tokens
                    if sent_first:  # hold it until the flush time
                        flush_at = min(flush_at, trio.current_time() + self.flush_s)
                        continue
                # the first text, the flush time (event is None), or the end
                if text or tokens:
                    if billing is not None and not await billing.wait_for_credit(prompt_tokens, completion_tokens):
                        await send(stream, JobError(request.job_id, "stopped: the requester's receipts fell behind"))
                        return f"stopped after {completion_tokens} tokens: receipts fell behind the credit window", None
                    await send(stream, JobChunk(request.job_id, text, tokens, prompt_tokens))
                    text, tokens, sent_first, flush_at = "", 0, True, math.inf
                if isinstance(event, Finished):
                    await send(stream, JobDone(request.job_id, event.finish_reason, self._receipt(request, event)))
                    final = billing.owed(event.usage.prompt_tokens, event.usage.completion_tokens) if billing else None
                    decode_s = event.elapsed_s - (event.first_token_s or 0.0)
                    rate = (event.usage.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0
                    return f"done, {event.usage.completion_tokens} tokens ({rate:.0f}/s), {event.finish_reason}", final

    def _receipt(self, request: JobRequest, done: Finished) -> ResultReceipt:
        receipt = ResultReceipt(
            job_id=request.job_id,
            model=request.model,
            request_hash=request_hash(request),
            output_hash=hashlib.sha256(done.text.encode()).digest(),
            prompt_tokens=done.usage.prompt_tokens,
            completion_tokens=done.usage.completion_tokens,
            worker=self.identity.peer_id,
        )
        return dataclasses.replace(receipt, signature=self.identity.sign(receipt_signing_bytes(receipt)))


# ---------------------------------------------------------------- requester


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

    def __init__(self, reason: str, *, partial: str = "", tokens: int = 0, penalise: bool = True) -> None:
        super().__init__(reason)
        self.partial, self.tokens, self.penalise = partial, tokens, penalise
        self.paid = 0  # what the requester signed to this worker before it failed


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
    try:
        channel = await trio.to_thread.run_sync(lambda: wallet.channel_for(offer.payee, needed, peer_id=offer.peer_id))
    except PaymentError as err:
        raise _WorkerFailed(f"could not fund a channel to {offer.payee}: {err}", penalise=False) from None
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
    payer = await _payer_for(wallet, offer, request) if offer.price_per_1k > 0 and wallet is not None else None
    if payer is not None:
        request = payer.request
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
            raise _WorkerFailed(detail, penalise=first.reason != REJECT_BUSY)
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
    raise JobFailed(f"the job did not finish within its {deadline_s:.0f}s deadline ({len(text)} characters received)")
