"""Judging a worker's answer against the model: pure, over one engine pass's observations.

A worker records a fingerprint of the model's output distribution for every
token it samples (node/inference/fingerprints.py). A verifier that has the same
model re-runs the request and the answer in one batched pass
(``Engine.observe``), which gives its own logits at every position and replays
the job's sampler chain on them with the job's seed. ``judge`` then decides,
from those observations alone, whether the answer is what the model, asked
this, would have produced:

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

A verdict travels as a verification job's output text (``verdict_text``, read
back by ``read_verdict``), which the checking worker's receipt signs.

Who checks: node/verify/local.py on a machine with the model (``--verify``, and
every worker for others); node/verify/spot.py hires another worker to check.
What happens after a failed check is node/verify/fraud.py's.

docs/verification.md gives the threat model, the measured honest error
distribution behind each tolerance, and what each check catches.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from node.errors import InvalidRequest
from node.inference.fingerprints import Fingerprints, Observations, evidence
from node.inference.sampling import FINISH_LENGTH, FINISH_STOP, SamplingParams
from node.protocol.messages import CheckTask, JobRequest, SignedVerdict


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


#: The calibrated tolerances: every check's default.
TOLERANCE = Tolerance()


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
    tolerance: Tolerance = TOLERANCE,
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


def describe(verdict: Verdict) -> str:
    """One line for a person."""
    if verdict.ok:
        return (
            f"verified: {verdict.tokens} tokens match the model "
            f"(largest logit difference {verdict.max_error:.3f}, {verdict.flips} near-tie flips)"
        )
    return f"verification FAILED: {verdict.reason}"


# ------------------------------------------------------------------ a verdict as a verification job's output


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
