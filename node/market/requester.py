"""Jobs from the requester's side: choose a worker, stream its answer, pay it, fail over.

``run_job`` walks the routed offers best first:

- a worker that rejects, cannot be reached, or fails before its first token is
  skipped for the next one;
- a worker that dies mid-stream is replaced by the next one, which is sent the
  text received so far (``resume_text``) and continues right after it; the
  caller's ``JobObserver`` is told (``on_failover``);
- when every usable worker turned it away as busy, it waits and asks again, like
  a queue, until the deadline;
- the whole job has one deadline, and never outlives it.

- a worker that accepts and then says nothing (no first token within a bound
  that grows with the prompt, or no progress for ``Timeouts.progress_s``) is
  dropped like one that died;
- a request the workers reject as its own fault (malformed, or too long for
  the context) ends the job with ``InvalidRequest`` after at most
  ``REQUEST_FAULT_TRIES`` workers said so; it never counts against them.

A job's state across its workers (who was tried, the text so far, why each failed) is a ``Failover``,
which does no I/O; ``run_job`` does the streaming and the timing, and tells its caller what happens
through a ``JobObserver``.

Paying is the ``Payer``'s concern (node/payments/payer.py): each attempt runs
inside ``payer.pay(offer, request)``, and every chunk and the final result
pass through it. A worker that bills more than it used (``Overcharge``) is
dropped and banned for ``OVERCHARGE_BAN_S``; when its signed receipt says so,
the result keeps that receipt as evidence (``JobResult.overcharges``). A
caller that checks answers itself passes a ``gate``: the final receipt is
signed only once the gate passed the answer, so a worker whose answer fails
the check keeps at most what the credit window gave it. Failures are
remembered in the requester's ``Reputation`` (backoff bans), and successes
too, with the speed and latency measured here.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from node.errors import (
    DeadlineExceeded,
    InvalidRequest,
    JobFailed,
    ModelError,
    NoWorker,
    Overcharge,
    PeerUnreachable,
    WireError,
)
from node.inference.sampling import SamplingParams, TokenLogprob, prompt_bytes
from node.market.jobs import JOB_PROTOCOL, check_result_receipt, logprobs_from_wire
from node.market.offers import best_offer
from node.market.routing import Reputation, RouteQuery, exclusion
from node.net.host import Host
from node.payments.payer import FreePayer, JobPayment, Payer
from node.protocol.messages import (
    ERROR_PAYMENT,
    REJECT_BUSY,
    REJECT_PAYMENT,
    REJECT_TOO_LONG,
    REQUEST_FAULTS,
    JobAccepted,
    JobCancel,
    JobChunk,
    JobDone,
    JobError,
    JobRejected,
    JobRequest,
    Offer,
    ResultReceipt,
)
from node.protocol.wire import receive, send


@dataclass(frozen=True)
class JobSpec:
    """What to run, independent of who runs it."""

    model: str
    params: SamplingParams
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_price_per_1k: int = 0


@dataclass(frozen=True)
class Proof:
    """What one worker answered to one request, as it signed it: enough for a verifier to re-check
    (node/verify/). A job's proof covers the worker that finished it, from the text it was given."""

    request: JobRequest  # as sent to the worker (``resume_text`` holds what others said before it)
    done: JobDone  # the worker's signed receipt and the answer's fingerprints
    text: str  # what this worker streamed

    @property
    def worker(self) -> str:
        return self.done.receipt.worker


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
    model: str = ""  # the model's CID
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when params.logprobs is set
    proof: Proof | None = None  # the finishing worker's part, for verification
    withheld: bool = False  # the gate failed the answer: its final receipt was not signed
    overcharges: list[Proof] = field(default_factory=list)  # signed answers that billed more than they used


@dataclass(frozen=True)
class Timeouts:
    """How long a worker may keep the requester waiting, at each step of an attempt."""

    accept_s: float = 10.0  # from the request to JobAccepted / JobRejected
    first_token_s: float = 20.0  # from acceptance to the first chunk, for a short prompt…
    first_token_per_prompt_byte_s: float = 0.01  # …plus this per prompt byte (a prefill of at least ~25 tokens/s)
    progress_s: float = 10.0  # between chunks once text flows

    def first_token_for(self, request: JobRequest) -> float:
        size = prompt_bytes(request.prompt, request.messages, request.resume_text)
        return self.first_token_s + self.first_token_per_prompt_byte_s * size


class _WorkerFailed(Exception):
    """One worker did not finish the job; ``partial``/``tokens`` is what it streamed first.

    ``penalise``: count it against the worker. ``busy``: it only had no free slot.
    ``request_fault``: the worker says the request itself is bad (malformed, too long).
    """

    def __init__(
        self,
        reason: str,
        *,
        partial: str = "",
        tokens: int = 0,
        penalise: bool = True,
        busy: bool = False,
        request_fault: bool = False,
    ) -> None:
        super().__init__(reason)
        self.partial, self.tokens, self.penalise, self.busy = partial, tokens, penalise, busy
        self.request_fault = request_fault
        self.logprobs: list[TokenLogprob] = []
        self.paid = 0  # what the requester signed to this worker before it failed
        self.overcharge = False  # it billed more than it used (banned, not only backed off)
        self.evidence: Proof | None = None  # its signed answer, when the overcharge is in its receipt


OVERCHARGE_BAN_S = 24 * 3600.0  # a worker that billed more than it used gets no more jobs (and no more receipts)
BUSY_RETRY_S = 0.25  # when every usable worker is busy, ask again after this long (until the deadline)
REQUEST_FAULT_TRIES = 2  # workers that must call the request bad before the job ends as InvalidRequest


@dataclass
class _Finished:
    """One attempt that finished: the worker's JobDone and what it streamed, with timings measured here."""

    request: JobRequest  # as sent, with any payment terms (what the worker's receipt signs)
    done: JobDone
    text: str
    logprobs: list[TokenLogprob]
    spent: int  # signed to the worker for this attempt
    first_token_s: float | None  # from sending the request to the first text
    elapsed_s: float
    withheld: bool = False  # the gate failed the answer: no final receipt


class JobObserver:
    """What ``run_job`` tells its caller while a job runs. Every method does nothing here: subclass this and
    override the ones you need. They are called on the trio thread between two reads of a stream, so they must
    return at once (hand slow work to a channel)."""

    def on_attempt(self, peer_id: str) -> None:
        """The job is being sent to worker ``peer_id``."""

    def on_tokens(self, prompt_tokens: int, tokens: int) -> None:
        """A chunk of a worker's answer came with ``tokens`` tokens; ``prompt_tokens`` is the prompt's size, or 0
        when the chunk does not say. Called for every chunk, text or not."""

    def on_logprobs(self, logprobs: tuple[TokenLogprob, ...]) -> None:
        """A piece's token logprobs (when ``params.logprobs`` is set), just before ``on_text`` gets the piece."""

    def on_text(self, piece: str) -> None:
        """A piece of the answer's text, as it streams in."""

    def on_failover(self, peer_id: str, reason: str, started: bool) -> None:
        """Worker ``peer_id`` was dropped for ``reason``; ``started``: it had streamed part of the answer, and
        the next worker continues after it."""


#: Decides, before the final receipt is signed, whether a finished answer is paid (``run_job``'s ``gate``).
Gate = Callable[["Proof"], Awaitable[bool]]


class _Timed(JobObserver):
    """Passes everything on to ``observer``, noting when the job's first text came (``first_token_s``)."""

    def __init__(self, observer: JobObserver, started_at: float) -> None:
        self.observer, self.started_at = observer, started_at
        self.first_token_s: float | None = None

    def on_attempt(self, peer_id: str) -> None:
        self.observer.on_attempt(peer_id)

    def on_tokens(self, prompt_tokens: int, tokens: int) -> None:
        self.observer.on_tokens(prompt_tokens, tokens)

    def on_logprobs(self, logprobs: tuple[TokenLogprob, ...]) -> None:
        self.observer.on_logprobs(logprobs)

    def on_text(self, piece: str) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started_at
        self.observer.on_text(piece)

    def on_failover(self, peer_id: str, reason: str, started: bool) -> None:
        self.observer.on_failover(peer_id, reason, started)


async def _attempt(
    host: Host,
    offer: Offer,
    request: JobRequest,
    payer: Payer,
    observer: JobObserver,
    timeouts: Timeouts,
    protocol: str = JOB_PROTOCOL,
    gate: Gate | None = None,
) -> _Finished:
    """Run ``request`` on one worker, paid by ``payer`` at ``offer.price_per_1k``."""
    try:
        async with payer.pay(offer, request) as payment:
            if payment is None:  # as many of our jobs as it has slots run there already
                raise _WorkerFailed("busy with our other jobs", penalise=False, busy=True)
            return await _run_attempt(host, offer, payment, observer, timeouts, protocol, gate)
    except (ModelError, PeerUnreachable) as err:  # the payer could not get the model's tokenizer to check counts
        raise _WorkerFailed(f"cannot check what it would bill: {err}") from None


@dataclass(frozen=True)
class Attempt:
    """One request answered by one worker (``attempt``)."""

    request: JobRequest  # as sent (with payment terms, if paid)
    done: JobDone
    text: str
    cost: int  # signed to the worker


async def attempt(
    host: Host,
    offer: Offer,
    request: JobRequest,
    payer: Payer,
    *,
    protocol: str = JOB_PROTOCOL,
    timeouts: Timeouts = Timeouts(),
) -> Attempt:
    """Run ``request`` once on ``offer``'s worker over ``protocol``, paid at ``offer.price_per_1k``; no failover.

    Raises:
        JobFailed: the worker rejected it, failed, or sent a result that does not check out.
    """
    try:
        finished = await _attempt(host, offer, request, payer, JobObserver(), timeouts, protocol)
    except _WorkerFailed as failure:
        raise JobFailed(f"{offer.peer_id[:12]}…: {failure}") from None
    return Attempt(finished.request, finished.done, finished.text, finished.spent)


def _rejection(first: JobRejected) -> _WorkerFailed:
    detail = f"rejected: {first.reason} {first.detail}".strip()
    if first.reason == REJECT_BUSY:
        return _WorkerFailed(detail, penalise=False, busy=True)
    if first.reason in REQUEST_FAULTS:
        return _WorkerFailed(detail, penalise=False, request_fault=True)
    if first.reason == REJECT_PAYMENT:  # our payment terms: not the worker's fault
        return _WorkerFailed(detail, penalise=False)
    return _WorkerFailed(detail)


async def _run_attempt(
    host: Host,
    offer: Offer,
    payment: JobPayment,
    observer: JobObserver,
    timeouts: Timeouts,
    protocol: str,
    gate: Gate | None = None,
) -> _Finished:
    request = payment.request
    began, first_text_at = time.perf_counter(), None
    try:
        stream = await host.open_stream(offer.peer_id, protocol, offer.addrs)
    except PeerUnreachable as err:
        raise _WorkerFailed(str(err)) from None
    text, tokens, logprobs = "", 0, []
    done: JobDone | None = None

    async def reply(message) -> None:
        await send(stream, message)

    async def next_message(timeout_s: float, waiting_for: str):
        with trio.move_on_after(timeout_s):
            return await receive(stream)
        raise _WorkerFailed(f"no {waiting_for} within {timeout_s:.0f}s", partial=text, tokens=tokens)

    try:
        await send(stream, request)
        first = await next_message(timeouts.accept_s, "answer")
        if isinstance(first, JobRejected):
            raise _rejection(first)
        if not isinstance(first, JobAccepted):
            raise _WorkerFailed(f"answered {first.TYPE} instead of accepting")
        wait_s, waiting_for = timeouts.first_token_for(request), "first token"
        while True:
            msg = await next_message(wait_s, waiting_for)
            if isinstance(msg, JobChunk):
                await payment.on_chunk(reply, msg)
                if msg.text or msg.tokens:
                    wait_s, waiting_for = timeouts.progress_s, "progress"
                text += msg.text
                tokens += msg.tokens
                observer.on_tokens(msg.prompt_tokens, msg.tokens)
                if msg.logprobs:
                    piece = logprobs_from_wire(msg.logprobs)
                    logprobs.extend(piece)
                    observer.on_logprobs(piece)
                if msg.text:
                    first_text_at = first_text_at or time.perf_counter()
                    observer.on_text(msg.text)
            elif isinstance(msg, JobDone):
                problem = check_result_receipt(msg.receipt, payment.request, text, msg.fingerprints)
                if problem:
                    raise _WorkerFailed(problem, partial=text, tokens=tokens)
                done = msg
                pay = gate is None or await gate(Proof(payment.request, done, text))
                if pay:
                    await payment.on_done(reply, done)
                await stream.close()
                now = time.perf_counter()
                first = first_text_at - began if first_text_at else None
                return _Finished(request, done, text, logprobs, payment.spent, first, now - began, withheld=not pay)
            elif isinstance(msg, JobError):
                # A worker that stopped because our receipts fell behind is not at fault.
                penalise = msg.reason != ERROR_PAYMENT
                raise _WorkerFailed(f"worker error: {msg.detail}", partial=text, tokens=tokens, penalise=penalise)
            elif isinstance(msg, JobRejected) and msg.reason == REJECT_TOO_LONG:
                raise _rejection(msg)
            else:
                raise _WorkerFailed(f"unexpected {msg.TYPE}", partial=text, tokens=tokens)
    except (EOFError, ConnectionError, WireError) as err:
        await stream.reset()
        failure = _WorkerFailed(
            "stream ended" if str(err) in ("", "stream ended") else f"stream ended ({err})", partial=text, tokens=tokens
        )
        failure.paid, failure.logprobs = payment.spent, logprobs
        raise failure from None
    except Overcharge as err:
        # The worker is paid what checked out (the payer has just signed for it): the receipt is delivered, then
        # the job is cancelled, before the stream goes.
        with trio.move_on_after(1):
            try:
                await send(stream, JobCancel(request.job_id))
                await stream.close()
            except (EOFError, ConnectionError, WireError):
                pass
        await stream.reset()
        partial, kept = err.kept if err.kept is not None else (text, tokens)  # only what checked out is kept
        failure = _WorkerFailed(f"overcharge: {err}", partial=partial, tokens=kept)
        failure.paid, failure.logprobs, failure.overcharge = payment.spent, logprobs[:kept], True
        if done is not None:  # its signed receipt bills what its records do not hold: evidence for others
            failure.evidence = Proof(payment.request, done, text)
        raise failure from None
    except _WorkerFailed as failure:
        failure.paid, failure.logprobs = payment.spent, logprobs
        await stream.reset()
        raise
    except BaseException:  # cancelled (deadline, Ctrl-C), or our own payment failed: tell the worker, drop the stream
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


# Longer than any token of the BPE vocabularies in use, so bytes / 256 bounds a prompt's tokens from below. A
# heuristic for refusing hopeless prompts early; the worker, which tokenizes, has the last word (``too_long``).
MAX_BYTES_PER_TOKEN = 256


def context_problem(offers: list[Offer], spec: JobSpec) -> str | None:
    """Why ``spec`` cannot fit the context of any worker serving its model, or None.

    Checked before routing, so a request that cannot run anywhere is the
    client's error at once (never a worker's fault, never a ban). The prompt's
    token count is not known before a worker tokenizes it, so only what is
    certain is checked: ``max_tokens`` alone, and the prompt's bytes divided by
    the most bytes one token can cover.
    """
    contexts = [m.context_size for o in offers for m in o.models if m.cid == spec.model and m.context_size > 0]
    if not contexts:
        return None
    limit = max(contexts)
    size = prompt_bytes(spec.prompt, spec.messages)
    at_least = -(-size // MAX_BYTES_PER_TOKEN)
    if spec.params.max_tokens >= limit:
        return f"max_tokens {spec.params.max_tokens} does not fit the model's context of {limit} tokens; lower it"
    if at_least + spec.params.max_tokens > limit:
        return (
            f"the prompt ({size} bytes, at least {at_least} tokens) plus max_tokens "
            f"{spec.params.max_tokens} does not fit the model's context of {limit} tokens; shorten it"
        )
    return None


def _job_seed(params: SamplingParams) -> int | None:
    """A sampled job always carries a seed: any verifier can then replay the worker's draws (node/verify/)."""
    return params.seed if params.seed is not None or params.temperature == 0 else secrets.randbits(31)


@dataclass
class Failover:
    """One job's way through its workers (``run_job``'s state): who was tried, what they streamed, why they failed.

    It decides no timing and does no I/O: ``run_job`` asks it for each worker's request, tells it how each
    attempt ended, and raises what it says when nobody is left.
    """

    spec: JobSpec
    job_id: str = field(default_factory=lambda: secrets.token_hex(8))
    seed: int | None = None  # filled in from ``spec`` (``_job_seed``) unless given
    text: str = ""  # what failed workers streamed: the next one continues after it
    logprobs: list[TokenLogprob] = field(default_factory=list)  # and their logprobs
    completion_used: int = 0  # and their tokens
    workers: list[str] = field(default_factory=list)  # every worker that produced part of the text, in order
    cost: int = 0  # signed to workers so far
    overcharges: list[Proof] = field(default_factory=list)  # signed answers that billed more than they used
    tried: set[str] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)  # tried, and turned us away only because all their slots were in use
    request_faults: list[str] = field(default_factory=list)  # workers' words on what is wrong with the request
    reasons: list[str] = field(default_factory=list)  # one line per failed attempt

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = _job_seed(self.spec.params)

    def untried(self, offers: list[Offer]) -> list[Offer]:
        return [o for o in offers if o.peer_id not in self.tried]

    def retry_busy(self) -> bool:
        """Whether some workers only were busy; if so, they may be tried again (after a wait, like a queue)."""
        if not self.busy:
            return False
        self.tried -= self.busy
        self.busy.clear()
        return True

    def request_to(self, peer_id: str) -> JobRequest:
        """The request for worker ``peer_id``: the rest of the job, after the text received so far."""
        self.tried.add(peer_id)
        params = dataclasses.asdict(self.spec.params)
        params["stop"] = list(params["stop"])
        params["seed"] = self.seed
        params["max_tokens"] = max(self.spec.params.max_tokens - self.completion_used, 1)
        return JobRequest(
            job_id=self.job_id,
            model=self.spec.model,
            params=params,
            messages=self.spec.messages,
            prompt=self.spec.prompt,
            max_price_per_1k=self.spec.max_price_per_1k,
            resume_text=self.text,
        )

    def failed(self, peer_id: str, failure: _WorkerFailed) -> None:
        """Keep what ``peer_id`` streamed and was paid before ``failure``.

        Raises:
            InvalidRequest: ``REQUEST_FAULT_TRIES`` workers called the request itself bad before any answered.
        """
        self.cost += failure.paid
        if failure.evidence is not None:
            self.overcharges.append(failure.evidence)
        if failure.busy:
            self.busy.add(peer_id)
        if failure.partial:
            self.text += failure.partial
            self.logprobs += failure.logprobs
            self.completion_used += failure.tokens
            self.workers.append(peer_id)
        if failure.request_fault:
            self.request_faults.append(str(failure).removeprefix("rejected: ").strip())
            if len(self.request_faults) >= REQUEST_FAULT_TRIES and not self.workers:
                raise InvalidRequest(self.request_faults[0]) from None
        self.reasons.append(f"{peer_id[:12]}…: {failure}")

    def gave_up(self) -> InvalidRequest | JobFailed:
        """Why the job ends when every worker tried has failed (and none is only busy)."""
        if self.request_faults and not self.workers:
            return InvalidRequest(self.request_faults[0])
        return JobFailed(f"every worker failed ({'; '.join(self.reasons)})")

    def result(self, peer_id: str, finished: _Finished, *, elapsed_s: float, first_token_s: float | None) -> JobResult:
        """The job's result, ``peer_id`` having finished it."""
        done = finished.done
        return JobResult(
            text=self.text + finished.text,
            finish_reason=done.finish_reason,
            prompt_tokens=done.receipt.prompt_tokens,
            completion_tokens=self.completion_used + done.receipt.completion_tokens,
            workers=[*self.workers, peer_id],
            receipts=[done.receipt],
            elapsed_s=elapsed_s,
            first_token_s=first_token_s,
            cost=self.cost + finished.spent,
            model=self.spec.model,
            logprobs=self.logprobs + finished.logprobs,
            proof=Proof(finished.request, done, finished.text),
            withheld=finished.withheld,
            overcharges=list(self.overcharges),
        )


async def run_job(
    host: Host,
    offers: Callable[[], list[Offer]],
    query: RouteQuery,
    spec: JobSpec,
    *,
    reputation: Reputation,
    deadline_s: float = 120.0,
    timeouts: Timeouts = Timeouts(),
    observer: JobObserver | None = None,
    clock: Callable[[], float] = time.time,
    payer: Payer | None = None,
    gate: Gate | None = None,
) -> JobResult:
    """Run ``spec`` on the best workers in ``offers()``, failing over as needed.

    Args:
        offers: the live offers (called again after each failure).
        observer: told of each attempt, chunk, piece of text and failover (``JobObserver``).
        payer: pays workers that charge (default: ``FreePayer``; the query must then be free only).
        gate: checks a finished answer before its final receipt is signed (``--verify``); False withholds it
            (``JobResult.withheld``), and the caller acts on its own verdict.

    Raises:
        InvalidRequest: the request cannot run: it does not fit the model's context, or workers rejected it
            as malformed.
        NoWorker: nobody can take the job at all.
        JobFailed: every candidate failed; ``DeadlineExceeded`` if ``deadline_s`` passed.
        PaymentError: the payer cannot pay (no funds, no chain).
    """
    payer = payer or FreePayer()
    problem = context_problem(offers(), spec)
    if problem:
        raise InvalidRequest(problem)
    job = Failover(spec)
    started_at = time.perf_counter()
    timed = _Timed(observer or JobObserver(), started_at)
    with trio.move_on_after(deadline_s) as deadline:
        while True:
            # re-routed after each failure; over the book's columns when ``offers`` is a book's ``live``
            offer = best_offer(offers(), query, reputation, clock(), exclude=job.tried)
            if offer is None and job.busy:  # every worker we could still use is busy: wait for one, and ask again
                await trio.sleep(BUSY_RETRY_S)
                job.retry_busy()
                continue
            if offer is None and not job.tried:
                raise NoWorker(_why_no_worker(offers(), query, reputation, clock()))
            if offer is None:
                raise job.gave_up()
            request = job.request_to(offer.peer_id)
            began = time.perf_counter()
            timed.on_attempt(offer.peer_id)
            try:
                finished = await _attempt(host, offer, request, payer, timed, timeouts, gate=gate)
            except _WorkerFailed as failure:
                if failure.overcharge:
                    reputation.ban(offer.peer_id, clock(), OVERCHARGE_BAN_S)
                elif failure.penalise:
                    reputation.failure(offer.peer_id, clock())
                job.failed(offer.peer_id, failure)
                timed.on_failover(offer.peer_id, str(failure), bool(failure.partial))
                continue
            reputation.success(offer.peer_id)
            reputation.latency(offer.peer_id, 1000 * (time.perf_counter() - began))
            _observe(reputation, offer.peer_id, finished)
            elapsed_s = time.perf_counter() - started_at
            return job.result(offer.peer_id, finished, elapsed_s=elapsed_s, first_token_s=timed.first_token_s)
    assert deadline.cancelled_caught
    raise DeadlineExceeded(
        f"the job did not finish within its {deadline_s:.0f}s deadline ({len(job.text)} characters received)"
    )


def _observe(reputation: Reputation, peer_id: str, finished: _Finished) -> None:
    """Tell the reputation how fast the worker really was: routing trusts this over what offers claim."""
    tokens = finished.done.receipt.completion_tokens
    decode_s = finished.elapsed_s - (finished.first_token_s or 0.0)
    reputation.observe(
        peer_id,
        tokens_per_s=(tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else None,
        first_token_ms=1000 * finished.first_token_s if finished.first_token_s is not None else None,
    )
