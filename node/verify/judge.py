"""Judging a worker's answer against the model: pure, over one engine pass's observations.

A worker records a fingerprint of the model's output distribution for every
token it samples (node/inference/fingerprints.py). A verifier that has the same
model re-runs the request and the answer in one batched pass
(``Engine.observe``), which gives its own logits at every position and replays
the job's sampler chain on them with the job's seed. ``judge`` then decides,
from those observations alone, whether the answer is what the model, asked
this, would have produced:

- the usage the worker billed is the verifier's own count: the prompt's tokens and
  the answer's (one record per token, an end-of-generation record last);
- the answer does not go on past the model's end: no end-of-generation record
  before the last, no position where the verifier's greedy or seeded pick is
  end-of-generation and the worker went on, and (unseeded) a plausible chance
  that the asked sampler would have gone on as far;
- every fingerprint value matches the verifier's logit for that token, one by
  one and on average, within the limits of the worker's ``NoiseClass`` (exact:
  to the bit; cpu, gpu: fixed, calibrated limits). The class comes from the
  receipt's claim (``noise_class``), never from the records: a worker that claims
  nothing gets the widest, and that class is calibrated against the cheats;
- greedy: each token is the (penalised) argmax, up to near-ties;
- sampled: each token is among the chain's top-k/top-p/min-p candidates;
  with the job's seed the replayed draw picks the same token (exact: always;
  noisy classes: up to a few flips), and in a noisy class the flips do not lean toward less likely tokens
  (honest noise flips both ways alike); and the tokens are not, taken together,
  less likely than the asked temperature makes them (a surprisal z-score);
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
from node.inference.numerics import CPU_CLAIM, claims_exact
from node.inference.sampling import FINISH_LENGTH, FINISH_STOP, SamplingParams
from node.protocol.messages import CheckTask, JobRequest, SignedVerdict


@dataclass(frozen=True)
class NoiseClass:
    """How far an honest worker of one class of hardware may differ from this verifier's pass: fixed limits,
    calibrated on honest work (docs/verification.md), never derived from the worker's own records.

    Flip and outside allowances are ``slack + per_token × n`` for an answer of n tokens."""

    name: str
    logit: float  # any one fingerprint value against the verifier's logit (0: must match, f16 rounding aside)
    mean: float  # the mean difference over all of a job's fingerprint values
    tie: float  # how far (raw, penalised logits) a differing pick may sit from the verifier's: greedy, EOG
    flips: float  # replayed picks (greedy or seeded) that may differ, per token
    lower: float  # seeded: picks that may differ toward a token the verifier finds less likely, per token
    outside: float  # sampled tokens outside the chain's top-k/top-p/min-p candidates, per token
    surprise_z: float  # sampled: how unlikely the tokens may be together, in standard deviations
    slack: int  # flips, lower flips and outside tokens allowed whatever the length
    sign: float = 1e-5  # seeded: the least probability that honest, symmetric noise gives so many lower flips
    stop: float = 1e-6  # unseeded: the least probability that the sampler would have gone on where it did


#: The worker's receipt names the verifier's own numerics: every logit is reproduced to the bit, so the same
#: sampler chain, seed and logits pick the same token: not one flip or outside token is allowed.
EXACT = NoiseClass("exact", logit=0, mean=0, tie=0, flips=0, lower=0, outside=0, surprise_z=5, slack=0)
#: Another CPU build or instruction set, or this CPU in a path that is not bit-identical (several threads,
#: K-quants, a batch shared with other sequences).
CPU = NoiseClass("cpu", logit=1.5, mean=0.4, tie=1.0, flips=0.5, lower=0.25, outside=0.1, surprise_z=5, slack=2)
#: A GPU, or numerics the worker does not name: the widest.
GPU = NoiseClass("gpu", logit=2.0, mean=0.5, tie=1.0, flips=0.5, lower=0.25, outside=0.1, surprise_z=5, slack=2)
NOISE_CLASSES = {c.name: c for c in (EXACT, CPU, GPU)}


def noise_class(claimed: str, own: str) -> NoiseClass:
    """The class a worker whose receipt claims numerics ``claimed`` is checked in, by a verifier whose own
    (``Engine.batch_numerics``) are ``own``: ``EXACT`` when they are the same; ``CPU`` for a "cpu" claim
    ("cpu" or "cpu:…") or another machine's exact class (a probe hash: 16 hex digits, which only a CPU
    engine gives); ``GPU`` for anything else, "" included. The claim only ever narrows the allowances: a worker
    that claims nothing gets the widest class, and that class is calibrated to catch the cheats
    docs/verification.md lists."""
    if claimed and claimed == own:
        return EXACT
    if claimed == CPU_CLAIM or claimed.startswith(CPU_CLAIM + ":") or claims_exact(claimed):
        return CPU
    return GPU


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
    regime: str = ""  # the NoiseClass checked in
    lower: int = 0  # sampled: flips to a token the verifier's chain finds less likely than its own pick
    statistical: bool = False  # failed on a count or a probability that honest noise crosses now and then

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
    prompt_tokens: int,
    completion_tokens: int,
    noise: NoiseClass = GPU,
) -> Verdict:
    """Whether ``records`` (and the ``text``, ``finish_reason`` and usage the worker reported) pass.

    ``noise``: the class the worker is checked in (``noise_class`` of its receipt's claim); ``EXACT`` fails any
    logit that differs (f16 rounding aside). The checks, in order, are docs/verification.md's table."""
    obs, n = observations, len(records)
    m = obs.replayed
    errors = np.zeros(0, dtype=np.float32)
    if m:
        claimed = np.stack([records.logit1[:m], records.logit2[:m], records.logit[:m]])
        seen = _f16(np.stack([obs.at_top1[:m], obs.at_top2[:m], obs.at_token[:m]]))
        errors = np.abs(claimed - seen)
        errors = np.where(np.isnan(errors), np.inf, errors)
    tokens = records.tokens[:m]
    picks_differ = obs.pick[:m] != tokens
    flips = int(picks_differ.sum())
    outside = int((~obs.allowed[:m]).sum())
    sampled = params.temperature > 0
    z = 0.0
    if sampled and m:
        inside = obs.allowed[:m] & (obs.p[:m] > 0)
        surprise = float(-np.log(obs.p[:m][inside]).sum())
        expected, variance = float(obs.entropy[:m][inside].sum()), float(obs.spread[:m][inside].sum())
        z = (surprise - expected) / math.sqrt(variance) if variance > 1e-9 else 0.0

    lower = int((picks_differ & (obs.gap[:m] > 0)).sum()) if sampled else 0

    def verdict(reason: str = "", *, statistical: bool = False) -> Verdict:
        return Verdict(
            ok=not reason,
            reason=reason,
            tokens=m,
            max_error=float(errors.max()) if errors.size else 0.0,
            mean_error=float(errors.mean()) if errors.size else 0.0,
            flips=flips,
            outside=outside,
            surprise_z=round(z, 3),
            regime=noise.name,
            lower=lower,
            statistical=statistical and bool(reason) and noise is not EXACT,
        )

    # ---- what was billed and said: the usage, the end of the answer, the finish reason, the text
    if prompt_tokens != obs.prompt_tokens:
        return verdict(f"{prompt_tokens} prompt tokens billed where the prompt has {obs.prompt_tokens}")
    inner = np.flatnonzero(obs.eog[: n - 1])
    if inner.size:
        return verdict(f"token {int(inner[0])} ends the answer (end-of-generation), and the answer goes on")
    if obs.broken:
        return verdict(obs.broken)
    counted = n - (1 if obs.ends_on_eog else 0)
    if counted != completion_tokens:
        return verdict(f"{completion_tokens} completion tokens billed for {n} fingerprints")
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

    # ---- the fingerprints against the verifier's logits
    if errors.size:
        worst = np.unravel_index(int(np.argmax(errors)), errors.shape)
        off = float(errors[worst])
        if noise is EXACT and off > 0:
            return verdict(
                f"token {worst[1]}: a logit is off by {off:.3f}, where this machine's numerics, "
                "which the worker claims, reproduce every logit exactly"
            )
        if off > noise.logit:
            return verdict(f"token {worst[1]}: a logit is off by {off:.2f} (at most {noise.logit} for {noise.name})")
        if float(errors.mean()) > noise.mean:
            mean = float(errors.mean())
            return verdict(f"logits are off by {mean:.3f} on average (at most {noise.mean} for {noise.name})")
        above = obs.top[:m] - obs.at_top1[:m]
        if float(above.max()) > max(noise.logit, 0.01):
            i = int(np.argmax(above))
            return verdict(f"token {i}: the claimed top token is {float(above[i]):.2f} below the real top")

    # ---- the picks: went on where the model ends, greedy argmax, candidates, the seeded draw, surprisal
    raw_gap = obs.gap[:m] * (params.temperature if sampled else 1.0)  # in raw (penalised) logits
    if sampled and not obs.seeded:
        going = ~obs.eog[:m]
        with np.errstate(divide="ignore"):
            log_going = float(np.log1p(-np.minimum(obs.stop_p[:m][going], 1.0)).sum())
        if log_going < math.log(noise.stop):
            going_p = math.exp(log_going)
            return verdict(f"the answer goes on where the model would have ended it: with probability {going_p:.1e}")
    else:
        passed = obs.pick_eog[:m] & picks_differ  # the verifier's pick ends the answer; the worker's does not
        went_on = np.flatnonzero(passed if noise is EXACT else passed & (raw_gap > noise.tie))
        if sampled and noise is not EXACT:
            # A seeded draw near the boundary of end-of-generation's share flips with honest noise however far
            # the next token's logit is: one such flip is allowed; a second is padding.
            went_on = np.flatnonzero(passed)[1:]
        if went_on.size:
            i = int(went_on[0])
            return verdict(f"token {i}: the answer goes on where the model ends it (end-of-generation)")
    allowed_flips = noise.slack + noise.flips * m
    if not sampled:
        gaps = obs.gap[:m][picks_differ]
        if gaps.size and float(gaps.max()) > noise.tie:
            i = int(np.flatnonzero(picks_differ)[int(np.argmax(gaps))])
            return verdict(
                f"token {i} is not the most likely one (by {float(obs.gap[i]):.2f}) in a greedy answer",
                statistical=True,
            )
        if flips > allowed_flips:
            return verdict(f"{flips} of {m} tokens are not the most likely one", statistical=True)
        return verdict()
    if outside > noise.slack + noise.outside * m:
        return verdict(f"{outside} of {m} tokens are outside the top-k/top-p/min-p candidates", statistical=True)
    if obs.seeded:
        # Honest noise moves the draw's boundaries both ways alike, so its flips go to a less likely token as
        # often as to a more likely one; a hotter sampler's all go down, and a cheaper model's mostly do.
        if flips > allowed_flips:
            return verdict(f"{flips} of {m} tokens differ from the seeded draw's", statistical=True)
        if lower > noise.slack + noise.lower * m:
            return verdict(
                f"{lower} of {m} tokens differ from the seeded draw's toward less likely ones", statistical=True
            )
        if noise is not EXACT and one_sided(lower, flips) < noise.sign:
            return verdict(
                f"{lower} of {flips} tokens that differ from the seeded draw's are less likely than its own "
                f"(as likely as honest noise with probability {one_sided(lower, flips):.1e})",
                statistical=True,
            )
    if z > noise.surprise_z:
        return verdict(
            f"the tokens are too unlikely for temperature {params.temperature} (z = {z:.1f})", statistical=True
        )
    return verdict()


def one_sided(successes: int, trials: int) -> float:
    """P(X >= successes) for X ~ Binomial(trials, 1/2)."""
    if successes <= 0:
        return 1.0
    return sum(math.comb(trials, k) for k in range(successes, trials + 1)) / 2.0**trials


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
