"""Jobs over ``/llmarket/job/1.0.0``: the protocol's shared pieces and the worker's side.

One job is one stream. The requester sends a ``JobRequest`` and keeps its side
open; the worker answers ``JobRejected`` (busy, unknown model, price,
malformed) or ``JobAccepted``, then ``JobChunk``s as tokens come, then
``JobDone`` with the answer's fingerprints (node/inference/fingerprints.py) and a signed
``ResultReceipt`` that commits to them (or ``JobError``). Either side
cancels: the requester by sending ``JobCancel`` or just going away (the worker
stops generating at the next token and frees the slot); the worker by ending
the stream.

Payment is not this module's concern: a ``Metering`` admits each request and
gives a ``JobMeter`` that says how far the text may stream ahead of what the
requester has paid (node/payments/metering.py), closed however the job ends; a
free worker's meter allows everything. The requester's side, with routing and failover, is
``node.market.requester``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from node.concurrency import open_service_nursery
from node.errors import ContextTooLong, InvalidReceipt, InvalidRequest, PaymentRefused, WireError
from node.inference.batched import EngineFailed
from node.inference.fingerprints import digest as fingerprint_digest
from node.inference.sampling import Delta, Finished, SamplingParams, TokenLogprob
from node.market.activity import CANCELLED, DONE, FAILED, REJECTED, RUNNING, SERVED, VERIFY, Activity
from node.net.host import Host, Stream
from node.net.identity import Identity, verify_peer_signature
from node.payments.metering import FreeMetering, JobMeter, Metering
from node.payments.policy import job_cost
from node.protocol.messages import (
    ERROR_ENGINE,
    ERROR_PAYMENT,
    REJECT_BUSY,
    REJECT_MALFORMED,
    REJECT_PAYMENT,
    REJECT_PRICE,
    REJECT_TOO_LONG,
    REJECT_UNKNOWN_MODEL,
    JobAccepted,
    JobCancel,
    JobChunk,
    JobDone,
    JobError,
    JobRejected,
    JobRequest,
    Logprob,
    ResultReceipt,
)
from node.protocol.wire import encode, pack, receive, receive_as, send

log = logging.getLogger(__name__)

JOB_PROTOCOL = "/llmarket/job/1.0.0"
#: Verification jobs: a ``JobRequest`` with ``check`` set, answered like a job whose output is a signed verdict
#: (node/verify/). Served by a second ``WorkerService`` whose engines are ``node.verify.local.CheckingEngine``s.
VERIFY_PROTOCOL = "/llmarket/verify/1.0.0"


class JobEngine(Protocol):
    """What a worker needs of an engine (``node.inference.engine.Engine``, ``node.verify.local.CheckingEngine``
    or a test double).

    Each ``stream_*`` method returns an async context manager that yields a ``trio.MemoryReceiveChannel`` of
    ``Delta`` events ending with one ``Finished``; leaving it early cancels the generation and frees the slot.
    """

    @property
    def free_slots(self) -> int: ...

    def stream_chat(self, messages: Any, params: SamplingParams, *, assistant_prefix: str = ""): ...

    def stream_completion(self, prompt: str, params: SamplingParams, *, resume_text: str = ""): ...

    def stream_check(self, request: JobRequest):
        """Run the verification job ``request`` (its ``check`` is set) as the other ``stream_*`` methods run a
        job; the text is the verdict on the checked answer (``node.verify.judge.verdict_text``), which the
        worker's receipt then signs.

        Called only by a ``WorkerService`` on ``VERIFY_PROTOCOL``; an engine that serves ordinary jobs only
        need not have it.

        Raises:
            InvalidRequest: the answer cannot be checked (not a verification job, another model, no
                fingerprints, a receipt that does not match it), when the job is entered or before.
        """
        ...


def logprobs_to_wire(logprobs: tuple[TokenLogprob, ...]) -> list[Logprob]:
    return [Logprob(lp.token, lp.logprob, [t for t, _ in lp.top], [v for _, v in lp.top]) for lp in logprobs]


def logprobs_from_wire(logprobs: list[Logprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(lp.token, lp.logprob, tuple(zip(lp.top_tokens, lp.top_logprobs, strict=False))) for lp in logprobs
    )


def request_hash(request: JobRequest) -> bytes:
    return hashlib.sha256(encode(request)).digest()


def receipt_signing_bytes(receipt: ResultReceipt) -> bytes:
    return pack(dataclasses.replace(receipt, signature=b""))


def check_result_receipt(
    receipt: ResultReceipt, request: JobRequest, output: str, fingerprints: bytes = b""
) -> str | None:
    """Why the worker's signed statement of its result does not check out, or None if it does."""
    if receipt.job_id != request.job_id or receipt.model != request.model:
        return "receipt is for another job or model"
    if receipt.request_hash != request_hash(request):
        return "receipt is for another request"
    if receipt.output_hash != hashlib.sha256(output.encode()).digest():
        return "receipt does not match the text received"
    if receipt.fingerprints_hash != fingerprint_digest(fingerprints):
        return "receipt does not match the fingerprints received"
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
    metering: Metering = field(default_factory=FreeMetering)
    request_timeout_s: float = 10.0
    flush_s: float = 0.02
    busy_wait_s: float = 1.0
    on_slots_changed: Callable[[], None] = lambda: None
    protocol: str = JOB_PROTOCOL  # VERIFY_PROTOCOL: verification jobs only
    activity: Activity = field(default_factory=Activity)  # jobs as they happen, for the web page

    def install(self) -> None:
        self.host.set_handler(self.protocol, self.handle)

    @property
    def price_per_1k(self) -> int:
        return self.metering.price_per_1k

    @property
    def free_slots(self) -> int:
        return sum(e.free_slots for e in self.engines.values())

    async def handle(self, stream: Stream) -> None:
        with trio.fail_after(self.request_timeout_s):
            request = await receive_as(stream, JobRequest)
        admitted = await self._admit(request, stream.peer_id)
        if isinstance(admitted, JobRejected):
            job = self.activity.started(self._kind, request.job_id, request.model, stream.peer_id)
            self.activity.ended(job.id, REJECTED, detail=f"{admitted.reason}: {admitted.detail}")
            log.info("job %s from %s…: rejected (%s %s)", request.job_id, stream.peer_id[:12], admitted.reason,
                     admitted.detail)  # fmt: skip
            await send(stream, admitted)
            await stream.close()
            return
        generation, meter = admitted
        try:
            await self._run(stream, request, generation, meter)
        finally:  # however the job ended: the meter gives back what it held and hands on what was paid
            meter.close()

    @property
    def _kind(self) -> str:
        return VERIFY if self.protocol == VERIFY_PROTOCOL else SERVED

    async def _admit(self, request: JobRequest, peer_id: str) -> tuple[Any, JobMeter] | JobRejected:
        """The engine's generation and the job's meter (``peer_id`` sent the request), or why it is rejected."""
        engine = self.engines.get(request.model)
        try:
            params = SamplingParams(**{**request.params, "stop": tuple(request.params.get("stop", ()))})
            params.validate()
            if (request.messages is None) == (request.prompt is None):
                raise InvalidRequest("send messages or a prompt, not both or neither")
            if (request.check is not None) != (self.protocol == VERIFY_PROTOCOL):
                raise InvalidRequest(
                    f"verification jobs go to {VERIFY_PROTOCOL}, and only they"
                    if request.check is not None
                    else f"{VERIFY_PROTOCOL} takes verification jobs only (a request with a check)"
                )
            if engine is not None:
                if request.check is not None:
                    generation = engine.stream_check(request)
                elif request.messages is not None:
                    generation = engine.stream_chat(request.messages, params, assistant_prefix=request.resume_text)
                else:
                    generation = engine.stream_completion(request.prompt, params, resume_text=request.resume_text)
        except ContextTooLong as err:
            return JobRejected(request.job_id, REJECT_TOO_LONG, str(err))
        except (TypeError, ValueError, InvalidRequest) as err:
            return JobRejected(request.job_id, REJECT_MALFORMED, str(err))
        if engine is None:
            return JobRejected(request.job_id, REJECT_UNKNOWN_MODEL, f"this worker does not serve {request.model}")
        if self.price_per_1k > request.max_price_per_1k:
            return JobRejected(request.job_id, REJECT_PRICE, f"price is {self.price_per_1k} per 1k tokens")
        if not await self._slot_soon(engine):
            return JobRejected(request.job_id, REJECT_BUSY, "all slots are busy")
        try:
            meter = await self.metering.admit(request, peer_id)
        except PaymentRefused as err:
            return JobRejected(request.job_id, REJECT_PAYMENT, str(err))
        return generation, meter

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

    async def _run(self, stream: Stream, request: JobRequest, generation, meter: JobMeter) -> None:
        async with open_service_nursery() as nursery:
            # The requester's side stays open: a JobCancel, or the stream ending, cancels the job.
            async def watch() -> None:
                try:
                    while True:
                        msg = await receive(stream)
                        if isinstance(msg, JobCancel) and msg.job_id == request.job_id:
                            break
                        await meter.take(msg)
                except (EOFError, ConnectionError, WireError):
                    pass
                except InvalidReceipt as err:
                    log.info("job %s: stopping on a bad receipt: %s", request.job_id, err)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            log.info(
                "job %s from %s…: accepted (%s connection)",
                request.job_id,
                stream.peer_id[:12],
                self.host.connection_kind(stream.peer_id) or "no",
            )
            outcome = "cancelled"
            job = self.activity.started(self._kind, request.job_id, request.model, stream.peer_id)
            try:
                async with generation as events:
                    await send(stream, JobAccepted(request.job_id, self.price_per_1k, 0))
                    self.on_slots_changed()
                    outcome, usage = await self._pump(stream, request, events, meter, job.id)
                if usage is not None:  # the slot is free again; now collect the pay
                    note = await meter.settle(*usage)
                    outcome += f", {note}" if note else ""
                    cost = job_cost(*usage, self.price_per_1k) if note == "paid" else 0
                    self.activity.ended(
                        job.id, DONE, detail=outcome, prompt_tokens=usage[0], tokens=usage[1], cost=cost
                    )  # fmt: skip  (its speed was set when it finished generating)
            except ContextTooLong as err:
                outcome = "rejected: too long"
                await send(stream, JobRejected(request.job_id, REJECT_TOO_LONG, str(err)))
            except InvalidRequest as err:
                outcome = "rejected: malformed"
                await send(stream, JobRejected(request.job_id, REJECT_MALFORMED, str(err)))
            except EngineFailed as err:  # never a JobDone: nothing of a failed job is billed
                outcome = f"failed: {err}"
                await send(stream, JobError(request.job_id, f"the worker's engine failed: {err}", ERROR_ENGINE))
            finally:
                self.on_slots_changed()
                log.info("job %s: %s", request.job_id, outcome)
                if job.state == RUNNING:
                    state = CANCELLED if outcome == "cancelled" else FAILED
                    self.activity.ended(job.id, REJECTED if outcome.startswith("rejected") else state, detail=outcome)
            await stream.close()
            nursery.cancel_scope.cancel()

    async def _pump(
        self, stream: Stream, request: JobRequest, events, meter: JobMeter, row: str
    ) -> tuple[str, tuple[int, int] | None]:
        """Forward the engine's events as frames; returns how the job ended, and its usage if it finished.

        The first text goes out at once (time to first token); after that, text
        is sent at most every ``flush_s``: one frame per few tokens instead of
        one per token, which matters when requester and worker share CPUs.
        Text goes out only while the meter says it is covered; when it is not,
        a chunk with no text first tells the requester what is owed (the
        prompt's size, before the first token), then the pump waits for credit.
        """
        text, tokens, logprobs, records, sent_first = "", 0, [], b"", False
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
                    text, tokens, records = text + event.text, tokens + event.tokens, records + event.records
                    logprobs += logprobs_to_wire(event.logprobs)
                    prompt_tokens, completion_tokens = event.prompt_tokens, completion_tokens + event.tokens
                    self.activity.progress(row, event.tokens, prompt_tokens=prompt_tokens)
                    if sent_first:  # hold it until the flush time
                        flush_at = min(flush_at, trio.current_time() + self.flush_s)
                        continue
                # the first text, the flush time (event is None), or the end
                if text or tokens:
                    if not meter.covers(prompt_tokens, completion_tokens):
                        if not sent_first:  # say what the prompt costs before asking for credit
                            await send(stream, JobChunk(request.job_id, "", 0, prompt_tokens))
                        if not await meter.wait_for_credit(prompt_tokens, completion_tokens):
                            detail = "stopped: the requester's receipts fell behind"
                            await send(stream, JobError(request.job_id, detail, ERROR_PAYMENT))
                            return f"stopped after {completion_tokens} tokens: receipts fell behind", None
                    await send(stream, JobChunk(request.job_id, text, tokens, prompt_tokens, logprobs, records))
                    text, tokens, logprobs, records, sent_first, flush_at = "", 0, [], b"", True, math.inf
                if isinstance(event, Finished):
                    receipt = self._receipt(request, event)
                    await send(stream, JobDone(request.job_id, event.finish_reason, receipt, event.fingerprints))
                    decode_s = event.elapsed_s - (event.first_token_s or 0.0)
                    rate = (event.usage.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0
                    self.activity.get(row).tokens_per_s = round(rate, 1)
                    outcome = f"done, {event.usage.completion_tokens} tokens ({rate:.0f}/s), {event.finish_reason}"
                    return outcome, (event.usage.prompt_tokens, event.usage.completion_tokens)

    def _receipt(self, request: JobRequest, done: Finished) -> ResultReceipt:
        receipt = ResultReceipt(
            job_id=request.job_id,
            model=request.model,
            request_hash=request_hash(request),
            output_hash=hashlib.sha256(done.text.encode()).digest(),
            prompt_tokens=done.usage.prompt_tokens,
            completion_tokens=done.usage.completion_tokens,
            worker=self.identity.peer_id,
            fingerprints_hash=fingerprint_digest(done.fingerprints),
            numerics=getattr(self.engines.get(request.model), "numerics", ""),
        )
        return dataclasses.replace(receipt, signature=self.identity.sign(receipt_signing_bytes(receipt)))
