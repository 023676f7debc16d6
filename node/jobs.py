"""Jobs over ``/llmarket/job/1.0.0``: the protocol's shared pieces and the worker's side.

One job is one stream. The requester sends a ``JobRequest`` and keeps its side
open; the worker answers ``JobRejected`` (busy, unknown model, price,
malformed) or ``JobAccepted``, then ``JobChunk``s as tokens come, then
``JobDone`` with a signed ``ResultReceipt`` (or ``JobError``). Either side
cancels: the requester by sending ``JobCancel`` or just going away (the worker
stops generating at the next token and frees the slot); the worker by ending
the stream.

The requester's side, with routing and failover, is ``node.requester``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from node.billing import Billing, PaymentRefused, WorkerPayments
from node.concurrency import open_service_nursery
from node.engine import Delta, Finished, SamplingParams
from node.errors import InvalidReceipt, InvalidRequest, WireError
from node.host import Host, Stream
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
    PayReceipt,
    ResultReceipt,
)
from node.wire import encode, pack, receive, receive_as, send

log = logging.getLogger("node.jobs")

JOB_PROTOCOL = "/llmarket/job/1.0.0"


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
