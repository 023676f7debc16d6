"""Checking a worker's answer against the model: a pure judgement over one engine call.

A worker records a fingerprint of the model's output distribution for every
token it samples (node/fingerprints.py). A verifier that has the same model
re-runs the request and the answer in one batched pass (``Engine.observe``),
which gives its own logits at every position and replays the job's sampler
chain on them with the job's seed. ``judge`` then decides, from those
observations alone, whether the answer is what the model, asked this, would
have produced:

- every fingerprint value matches the verifier's logit for that token, one by
  one within ``Tolerance.logit`` and on average within ``Tolerance.mean``
  (a different model, quantization or prompt moves them all);
- greedy: each token is the (penalised) argmax, up to near-ties;
- sampled: each token is among the chain's top-k/top-p/min-p candidates;
  with the job's seed the replayed draw picks the same token, up to a few
  flips near a boundary; and the tokens are not, taken together, less likely
  than the asked temperature makes them (a surprisal z-score);
- the text is what the tokens spell, and the finish reason is true (an
  end-of-generation token, a stop string, or max_tokens).

Who checks: ``LocalVerifier`` on the requester's own machine (``--verify``);
``CheckingEngine`` serves verification jobs for others on
``/llmarket/verify/1.0.0``, and ``spot_check`` hires such a worker. What happens
after a failed check is node/fraud.py's.

docs/verification.md gives the threat model, the measured honest error
distribution behind each tolerance, and what each check catches.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from node.concurrency import open_service_nursery
from node.errors import InvalidRequest, JobFailed, ModelError
from node.inference.fingerprints import RECORD_BYTES, Fingerprints, Observations, evidence, unpack
from node.market.jobs import VERIFY_PROTOCOL, check_result_receipt
from node.protocol.messages import CheckTask, JobDone, JobRequest, Offer, SignedVerdict
from node.payments.payer import FreePayer, Payer
from node.market.requester import Timeouts, attempt
from node.market.routing import Reputation, RouteQuery, rank
from node.inference.sampling import FINISH_LENGTH, FINISH_STOP, Delta, Finished, SamplingParams, Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """How far honest work may differ from the verifier's pass (calibration: docs/verification.md)."""

    logit: float = 2.0  # any one fingerprint value against the verifier's logit
    mean: float = 0.5  # the mean difference over all of a job's fingerprint values
    tie: float = 1.0  # greedy: how far (penalised logit) a token may sit below the verifier's pick
    # Where every fingerprint value matched exactly (the same kernels on both sides), replay is exact too: at
    # most 1 + n/64 picks may flip and 1 + n/32 sampled tokens fall outside the candidates. Elsewhere noise
    # flips picks in proportion to it: 2 + n·min(1, flips_per_error · mean error) may, and 2 + n/10 outside.
    flips_per_error: float = 4.0
    outside_noisy: float = 0.1
    surprise_z: float = 5.0  # sampled: how unlikely the tokens may be together, in standard deviations


@dataclass(frozen=True)
class Verdict:
    """A judgement, with the evidence it rests on."""

    ok: bool
    reason: str  # "" when ok, else the first check that failed, in one line
    tokens: int  # positions checked
    max_error: float  # the largest fingerprint difference (logits)
    mean_error: float
    flips: int  # replayed picks that differ from the worker's tokens
    outside: int  # tokens outside the chain's candidates
    surprise_z: float  # 0 for greedy

    def to_dict(self) -> dict:
        return asdict(self)


def _f16(values: np.ndarray) -> np.ndarray:
    """The verifier's values rounded as the worker's were, so that identical logits differ by exactly 0."""
    with np.errstate(over="ignore"):
        return values.astype(np.float16).astype(np.float32)


def judge(
    observations: Observations,
    records: Fingerprints,
    params: SamplingParams,
    *,
    text: str,
    finish_reason: str,
    completion_tokens: int,
    tolerance: Tolerance = Tolerance(),
    exact: bool = False,
) -> Verdict:
    """Whether ``records`` (and the ``text``, ``finish_reason`` and token count the worker reported) pass.

    ``exact``: the worker's receipt names the verifier's own class of exact numerics, so every logit must
    match (f16 rounding aside): any difference fails."""
    obs, n = observations, len(records)
    m = obs.replayed
    errors = np.zeros(0, dtype=np.float32)
    if m:
        claimed = np.stack([records.logit1[:m], records.logit2[:m], records.logit[:m]])
        seen = _f16(np.stack([obs.at_top1[:m], obs.at_top2[:m], obs.at_token[:m]]))
        errors = np.abs(claimed - seen)
        errors = np.where(np.isnan(errors), np.inf, errors)
    picks_differ = obs.pick[:m] != records.tokens[:m]
    flips = int(picks_differ.sum())
    outside = int((~obs.allowed[:m]).sum())
    z = 0.0
    if params.temperature > 0 and m:
        inside = obs.allowed[:m] & (obs.p[:m] > 0)
        surprise = float(-np.log(obs.p[:m][inside]).sum())
        expected, variance = float(obs.entropy[:m][inside].sum()), float(obs.spread[:m][inside].sum())
        z = (surprise - expected) / math.sqrt(variance) if variance > 1e-9 else 0.0

    def verdict(reason: str = "") -> Verdict:
        return Verdict(
            ok=not reason,
            reason=reason,
            tokens=m,
            max_error=float(errors.max()) if errors.size else 0.0,
            mean_error=float(errors.mean()) if errors.size else 0.0,
            flips=flips,
            outside=outside,
            surprise_z=round(z, 3),
        )

    if obs.broken:
        return verdict(obs.broken)
    counted = n - (1 if obs.ends_on_eog else 0)
    if counted != completion_tokens:
        return verdict(f"{n} fingerprints for {completion_tokens} tokens")
    if finish_reason == FINISH_LENGTH:
        if obs.ends_on_eog or completion_tokens != params.max_tokens:
            return verdict(f"finish 'length' after {completion_tokens} of max_tokens {params.max_tokens}")
        if text != obs.text:
            return verdict("the text is not what the tokens spell")
    elif finish_reason == FINISH_STOP:
        hits = [i for stop in params.stop if (i := obs.text.find(stop)) != -1]
        if hits:
            if text != obs.text[: min(hits)]:
                return verdict("the text is not what the tokens spell, cut at the stop string")
        elif not obs.ends_on_eog:
            return verdict("finish 'stop' without an end-of-generation token or a stop string")
        elif text != obs.text:
            return verdict("the text is not what the tokens spell")
    else:
        return verdict(f"finish reason {finish_reason!r} is not a finished answer")

    if exact and errors.size and float(errors.max()) > 0:
        worst = np.unravel_index(int(np.argmax(errors)), errors.shape)
        return verdict(
            f"token {worst[1]}: a logit is off by {float(errors[worst]):.3f}, where this machine's numerics, "
            "which the worker claims, reproduce every logit exactly"
        )
    if errors.size:
        worst = np.unravel_index(int(np.argmax(errors)), errors.shape)
        if errors[worst] > tolerance.logit:
            off = float(errors[worst])
            return verdict(f"token {worst[1]}: a logit is off by {off:.2f} (at most {tolerance.logit})")
        if float(errors.mean()) > tolerance.mean:
            return verdict(f"logits are off by {float(errors.mean()):.3f} on average (at most {tolerance.mean})")
        above = obs.top[:m] - obs.at_top1[:m]
        if float(above.max()) > tolerance.logit:
            i = int(np.argmax(above))
            return verdict(f"token {i}: the claimed top token is {float(above[i]):.2f} below the real top")
    # A flip needs the draw to land near a boundary that the two runs' logits put in different places. Where
    # every fingerprint value matched to f16 precision, the logits differ by under ~0.01 (usually not at all:
    # docs/verification.md), so flips are all but impossible; elsewhere noise may flip a share of them.
    exact = errors.size > 0 and float(errors.max()) == 0.0
    if exact:
        allowed_flips, allowed_outside = 1 + m / 64, 1 + m / 32
    else:
        noise = float(errors.mean()) if errors.size else 1.0
        allowed_flips = 2 + m * min(1.0, tolerance.flips_per_error * noise)
        allowed_outside = 2 + tolerance.outside_noisy * m
    if params.temperature == 0:
        gaps = obs.gap[:m][picks_differ]
        if gaps.size and float(gaps.max()) > tolerance.tie:
            i = int(np.flatnonzero(picks_differ)[int(np.argmax(gaps))])
            return verdict(f"token {i} is not the most likely one (by {float(obs.gap[i]):.2f}) in a greedy answer")
        if flips > allowed_flips:
            return verdict(f"{flips} of {m} tokens are not the most likely one")
        return verdict()
    if outside > allowed_outside:
        return verdict(f"{outside} of {m} tokens are outside the top-k/top-p/min-p candidates")
    if obs.seeded and flips > allowed_flips:
        return verdict(f"{flips} of {m} tokens differ from the seeded draw's")
    if z > tolerance.surprise_z:
        return verdict(f"the tokens are too unlikely for temperature {params.temperature} (z = {z:.1f})")
    return verdict()


def request_params(request: JobRequest) -> SamplingParams:
    """The sampling parameters a job asked for; ``InvalidRequest`` if they are bad."""
    try:
        params = SamplingParams(**{**request.params, "stop": tuple(request.params.get("stop", ()))})
    except TypeError as err:
        raise InvalidRequest(f"bad sampling parameters: {err}") from None
    params.validate()
    return params


async def check(
    engine,
    request: JobRequest,
    fingerprints: bytes,
    *,
    text: str,
    finish_reason: str,
    completion_tokens: int,
    tolerance: Tolerance = Tolerance(),
    numerics: str = "",
) -> Verdict:
    """Re-run ``request``'s answer on ``engine`` (which loads the request's model) and judge it.

    ``numerics`` is what the worker's receipt claims; when it is the engine's own, the check is exact.

    Raises:
        InvalidRequest: the request or the fingerprints cannot be checked at all.
        ContextTooLong: prompt + answer do not fit the engine's context.
    """
    verdict, _ = await examine(
        engine,
        request,
        fingerprints,
        text=text,
        finish_reason=finish_reason,
        completion_tokens=completion_tokens,
        tolerance=tolerance,
        numerics=numerics,
    )
    return verdict


async def examine_answer(
    engine, request: JobRequest, text: str, done: JobDone, tolerance: Tolerance = Tolerance()
) -> tuple[Verdict, Observations]:
    """``examine`` a worker's answer to ``request``: the ``text`` it streamed and its ``JobDone``."""
    return await examine(
        engine,
        request,
        done.fingerprints,
        text=text,
        finish_reason=done.finish_reason,
        completion_tokens=done.receipt.completion_tokens,
        tolerance=tolerance,
        numerics=done.receipt.numerics,
    )


async def examine(
    engine,
    request: JobRequest,
    fingerprints: bytes,
    *,
    text: str,
    finish_reason: str,
    completion_tokens: int,
    tolerance: Tolerance = Tolerance(),
    numerics: str = "",
) -> tuple[Verdict, Observations]:
    """``check``, with the observations the verdict rests on."""
    params = request_params(request)
    try:
        records = unpack(fingerprints)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    if request.messages is not None:
        observing = engine.observe_chat(request.messages, params, fingerprints, assistant_prefix=request.resume_text)
    elif request.prompt is not None:
        observing = engine.observe_completion(request.prompt, params, fingerprints, resume_text=request.resume_text)
    else:
        raise InvalidRequest("the request has neither messages nor a prompt")
    observations = await observing
    verdict = judge(
        observations,
        records,
        params,
        text=text,
        finish_reason=finish_reason,
        completion_tokens=completion_tokens,
        tolerance=tolerance,
        exact=bool(numerics) and numerics == getattr(engine, "batch_numerics", ""),
    )
    return verdict, observations


# ------------------------------------------------------------------ self-check


@dataclass
class LocalVerifier:
    """Checks finished jobs with engines on this machine (``request --verify``, ``gateway --verify``).

    ``engines`` maps a model CID to an engine that loads it. A job for another
    model is not checked (``check_result`` returns None).
    """

    engines: dict[str, Any]
    tolerance: Tolerance = Tolerance()

    async def check_result(self, result) -> Verdict | None:
        """The verdict on ``result`` (a ``node.market.requester.JobResult``); None when it cannot be checked here."""
        proof = result.proof
        engine = self.engines.get(result.model)
        if proof is None or engine is None or not proof.done.fingerprints:
            return None
        verdict, _ = await examine_answer(engine, proof.request, proof.text, proof.done, self.tolerance)
        log.info("job %s from %s…: %s", proof.request.job_id, proof.worker[:12], describe(verdict))
        return verdict


def describe(verdict: Verdict) -> str:
    """One line for a person."""
    if verdict.ok:
        return (
            f"verified: {verdict.tokens} tokens match the model "
            f"(largest logit difference {verdict.max_error:.3f}, {verdict.flips} near-tie flips)"
        )
    return f"verification FAILED: {verdict.reason}"


def local_model_path(data_dir: Path, cid: str) -> Path:
    """The file of model ``cid`` on this machine (the model cache, or the embedded default model).

    Raises:
        ModelError: the model is not here; it says how to get it.
    """
    from node.models.default import DEFAULT_MODEL_CID, default_model_file
    from node.models.store import ModelStore

    if cid == DEFAULT_MODEL_CID:
        return default_model_file()
    stored = ModelStore.in_data_dir(data_dir).get(cid)
    if stored is None:
        raise ModelError(f"--verify needs model {cid} on this machine; fetch it first: llmarket models add {cid}")
    return stored.path


@asynccontextmanager
async def open_local_verifier(data_dir: Path, cid: str, *, n_ctx: int = 4096) -> AsyncIterator[LocalVerifier]:
    """A ``LocalVerifier`` for model ``cid``, with a one-slot engine (loaded in a thread)."""
    from node.inference.engine import open_engine

    path = await trio.to_thread.run_sync(local_model_path, Path(data_dir), cid)
    async with open_engine(path, slots=1, n_ctx=n_ctx) as engine:
        yield LocalVerifier({cid: engine})


# ------------------------------------------------------------------ verification jobs (worker side)


def verdict_text(task: CheckTask, verdict: Verdict, observations: Observations) -> str:
    """A verification job's output: the verdict on the checked answer, with the per-token evidence, as
    canonical JSON (the verifier's result receipt signs its hash)."""
    return json.dumps(
        {
            "job_id": task.original.job_id,
            "worker": task.done.receipt.worker,
            "receipt_signature": task.done.receipt.signature.hex(),
            "verdict": verdict.to_dict(),
            "evidence": base64.b64encode(evidence(observations)).decode(),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def read_verdict(signed: SignedVerdict) -> Verdict:
    """The verdict a ``SignedVerdict`` states about its check task's answer; ``ValueError`` if it states none."""
    task = signed.request.check
    try:
        data = json.loads(signed.text)
        fields = data["verdict"]
        if not isinstance(fields, dict) or not isinstance(fields.get("ok"), bool):
            raise TypeError("no ok")
        verdict = Verdict(**fields)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"not a verdict: {err}") from None
    if task is None or data.get("job_id") != task.original.job_id or data.get("worker") != task.done.receipt.worker:
        raise ValueError("the verdict is about another job")
    return verdict


def checked_task(request: JobRequest) -> CheckTask:
    """``request``'s check task, if it can be checked at all; ``InvalidRequest`` (one line) if not."""
    task = request.check
    if task is None:
        raise InvalidRequest("not a verification job")
    original = task.original
    if original.check is not None:
        raise InvalidRequest("a verification job cannot check another verification job")
    if original.model != request.model:
        raise InvalidRequest("the answer to check is for another model")
    problem = check_result_receipt(task.done.receipt, original, task.text, task.done.fingerprints)
    if problem:
        raise InvalidRequest(f"the answer to check: {problem}")
    if not task.done.fingerprints:
        raise InvalidRequest("the answer to check has no fingerprints")
    return task


@dataclass
class CheckingEngine:
    """Serves verification jobs with ``engine``: a ``WorkerService`` with ``protocol=VERIFY_PROTOCOL`` calls
    ``stream_check`` for each request. The job's usage is the tokens evaluated (prompt + answer, billed as
    prompt tokens); its output text is ``verdict_text``, so the worker's signed receipt signs the verdict."""

    engine: Any
    tolerance: Tolerance = Tolerance()

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    @asynccontextmanager
    async def stream_check(self, request: JobRequest) -> AsyncIterator[trio.MemoryReceiveChannel]:
        task = checked_task(request)
        send, recv = trio.open_memory_channel(2)

        async def run() -> None:
            async with send:
                started = time.perf_counter()
                verdict, observations = await examine_answer(
                    self.engine, task.original, task.text, task.done, self.tolerance
                )
                log.info("checked job %s of %s…: %s", task.original.job_id, task.done.receipt.worker[:12],
                         describe(verdict))  # fmt: skip
                text = verdict_text(task, verdict, observations)
                records = len(task.done.fingerprints) // RECORD_BYTES
                usage = Usage(prompt_tokens=observations.prompt_tokens + records, completion_tokens=0)
                took = time.perf_counter() - started
                await send.send(Delta(text, 0, usage.prompt_tokens))
                await send.send(Finished(text, usage, FINISH_STOP, took, took))

        async with open_service_nursery() as nursery:
            nursery.start_soon(run)
            try:
                async with recv:
                    yield recv
            finally:
                nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ spot checks (requester side)


@dataclass(frozen=True)
class SpotCheck:
    """Another worker's signed verdict on a job's answer, and what it cost."""

    verdict: Verdict
    signed: SignedVerdict
    cost: int

    @property
    def verifier(self) -> str:
        return self.signed.receipt.worker


def verification_request(proof, max_price_per_1k: int) -> JobRequest:
    """The verification job for ``proof`` (a ``node.market.requester.Proof``): see ``JobRequest.check``."""
    original = proof.request
    return JobRequest(
        job_id=secrets.token_hex(8),
        model=original.model,
        params={**original.params, "max_tokens": 1, "logprobs": None},
        messages=original.messages,
        prompt=original.prompt,
        max_price_per_1k=max_price_per_1k,
        resume_text=original.resume_text + proof.text,
        check=CheckTask(original=original, text=proof.text, done=proof.done),
    )


async def spot_check(
    host,
    offers: Callable[[], list[Offer]],
    result,
    *,
    reputation: Reputation,
    payer: Payer | None = None,
    query: RouteQuery | None = None,
    timeouts: Timeouts | None = None,
    clock: Callable[[], float] = time.time,
    tries: int = 2,
) -> SpotCheck | None:
    """Hire another worker serving ``result``'s model to check its answer (``/llmarket/verify/1.0.0``).

    ``query`` is the job's routing query (price limit, chain, free only); the verifier is chosen by it, at
    its ``verify_price_per_1k``, never the worker that answered. Returns None when nobody could check it
    (no other worker, or ``tries`` of them failed); a verifier that fails counts against its reputation.
    """
    proof = result.proof
    if proof is None or not proof.done.fingerprints:
        return None
    query = dataclasses.replace(query or RouteQuery(result.model, free_only=True), model=result.model, pinned_peer=None)
    others = [dataclasses.replace(o, price_per_1k=o.verify_price_per_1k) for o in offers() if o.peer_id != proof.worker]
    request = verification_request(proof, query.max_price_per_1k or 0)
    for offer in rank(others, query, reputation, clock(), limit=tries):
        try:
            done = await attempt(host, offer, request, payer or FreePayer(), protocol=VERIFY_PROTOCOL,
                                 timeouts=timeouts or Timeouts())  # fmt: skip
            signed = SignedVerdict(done.request, done.text, done.done.receipt)
            verdict = read_verdict(signed)
        except (JobFailed, ValueError) as err:
            log.info("spot check of job %s by %s… failed: %s", proof.request.job_id, offer.peer_id[:12], err)
            reputation.failure(offer.peer_id, clock())
            continue
        reputation.success(offer.peer_id)
        log.info("spot check of job %s by %s…: %s", proof.request.job_id, offer.peer_id[:12], describe(verdict))
        return SpotCheck(verdict, signed, done.cost)
    return None
