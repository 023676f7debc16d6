"""The verification workloads, at any size: honest work (per-slot and batched engines) and every cheater.

One definition, two sizes. ``tests/test_verify.py`` runs each at a smoke size with
fixed seeds (a few dozen honest checks, 4 jobs per cheater), so a regression
fails the suite in minutes; ``bench/verify.py --calibrate`` runs them at the sizes
``docs/verification.md`` quotes (1,000 honest checks, 1,000 batched, 100 per
cheater) and writes the tallies there. Every job is ``job(i)``, seeded by
``i``: the same sizes give the same jobs everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import trio

from node.inference.engine import open_engine
from node.inference.sampling import SamplingParams
from node.protocol.messages import JobRequest
from node.verify import judge, local
from tests import cheaters
from tests.factories import gather

TOPICS = [
    "how a bicycle works", "the water cycle", "a lighthouse keeper's day", "why leaves change colour",
    "the rules of chess", "a trip to Mars", "how bread rises", "the history of the printing press",
    "a robot who learns to paint", "how volcanoes form", "a market town in winter", "the life of a honeybee",
]  # fmt: skip
PROGRESS_EVERY = 50  # checks between a workload's progress lines (``report``)
DOCUMENT = " ".join(
    f"Entry {i}: the harbour of town {i % 7} counted {i * 3} boats and {i % 5} ships." for i in range(48)
)


def job(i: int, *, long_every: int = 0, max_tokens: int = 40, short: bool = False) -> tuple[list[dict], SamplingParams]:
    """The i-th of a varied set of jobs: topics, temperatures, penalties, top-k/p, min-p, stops, seeds.
    ``short``: a question most answers end well before ``max_tokens``."""
    rng = random.Random(i)
    topic = TOPICS[i % len(TOPICS)]
    ask = f"In one short sentence: what is {topic}?" if short else f"Write a detailed paragraph about {topic}."
    messages = [{"role": "user", "content": ask}]
    if long_every and i % long_every == 0:  # a prompt over one 512-token batch
        messages = [{"role": "system", "content": DOCUMENT}, *messages]
    temperature = [0.0, 0.4, 0.7, 1.0, 1.3][i % 5]
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        seed=rng.randrange(2**31) if temperature else None,
        top_k=rng.choice([40, 0, 10]),
        top_p=rng.choice([0.95, 1.0, 0.8]),
        min_p=rng.choice([0.05, 0.0, 0.1]),
        repeat_penalty=rng.choice([1.1, 1.0, 1.3]),
        stop=("\n\n",) if i % 7 == 3 else (),
    )
    return messages, params


def as_request(messages, params: SamplingParams) -> JobRequest:
    fields = dataclasses.asdict(params)
    fields["stop"] = list(fields["stop"])
    return JobRequest(job_id="j", model="m", params=fields, messages=messages)


async def answer(engine, messages, params):
    async with engine.stream_chat(messages, params) as events:
        async for event in events:
            done = event
    return done


def claim(worker) -> str:
    """The numerics ``worker``'s receipts name: its own, and "cpu" for a real CPU engine that claims none (a
    path that is not bit-identical: several threads, a K-quant, a shared batch), as docs/verification.md
    asks engines to; cheaters and simulated noisy workers claim what they say."""
    numerics = getattr(worker, "numerics", "")
    return numerics or ("cpu" if getattr(worker, "gpu_layers", None) == 0 else "")


async def check(verifier, messages, params, done, worker=None) -> judge.Verdict:
    """``verifier``'s verdict on ``done``, the answer of ``worker`` (whose receipt would name its numerics),
    billed as ``done.usage`` says."""
    return await local.check(
        verifier, as_request(messages, params), done.fingerprints, text=done.text,
        finish_reason=done.finish_reason, prompt_tokens=done.usage.prompt_tokens,
        completion_tokens=done.usage.completion_tokens, numerics=claim(worker),
    )  # fmt: skip


@dataclass
class Honest:
    """Verdicts on honest answers; ``failures`` names every flagged one."""

    what: str
    verdicts: list[judge.Verdict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    reused_tokens: int = 0  # prompt tokens the batched engine found in a cache
    report: Callable[[str], None] | None = field(default=None, repr=False, compare=False)  # progress lines

    def keep(self, verdict: judge.Verdict, job_name: str) -> None:
        self.verdicts.append(verdict)
        if not verdict.ok:
            self.failures.append(f"{job_name}: {verdict.reason}")
        if self.report and len(self.verdicts) % PROGRESS_EVERY == 0:
            self.report(f"{self.what}: {len(self.verdicts)} checked, {len(self.failures)} flagged")

    def summary(self) -> str:
        errors = np.array([v.max_error for v in self.verdicts])
        means = np.array([v.mean_error for v in self.verdicts])
        regimes = sorted({v.regime for v in self.verdicts})
        text = (
            f"{self.what} ({', '.join(regimes)}): {len(self.verdicts)}, flagged: {len(self.failures)}; per-job max "
            f"logit error: median {np.median(errors):.4f}, p99 {np.quantile(errors, 0.99):.4f}, max "
            f"{errors.max():.4f}; per-job mean error max {means.max():.4f}; flips max "
            f"{max(v.flips for v in self.verdicts)} (per token {max(v.flips / v.tokens for v in self.verdicts):.3f}); "
            f"outside max {max(v.outside for v in self.verdicts)}; surprise z max "
            f"{max(v.surprise_z for v in self.verdicts):.2f}"
        )
        text += f"; prompt tokens found in a cache: {self.reused_tokens}" if self.reused_tokens else ""
        return text + "".join(f"\n  flagged: {failure}" for failure in self.failures)


async def honest_checks(model_file: Path, workdir: Path, *, pairs: int, singles: int, report=None) -> Honest:
    """``6 * pairs + 4 * singles`` honest checks.

    ``pairs`` rounds of two jobs at once on a 2-slot, 1-thread worker, each checked
    three times two at a time (warm caches after the first); every fourth round is
    served and checked with a Q2_K copy, whose batched pass is *not* bit-identical on
    CPUs. Then ``singles`` jobs on a 2-thread worker, each checked by a 1- and a
    2-thread verifier, cold and warm.
    """
    q2k = cheaters.requantize(model_file, workdir / "q2k.gguf", "Q2_K")
    tally = Honest("honest checks", report=report)
    async with (
        open_engine(model_file, slots=2, threads=1) as pair,
        open_engine(model_file, slots=1, threads=2) as single,
        open_engine(model_file, slots=2, threads=1) as verifiers,
        open_engine(q2k, slots=2, threads=1) as q2k_engine,
    ):
        for i in range(0, 2 * pairs, 2):
            engine = q2k_engine if i % 8 == 0 else pair
            name = "Q2_K" if engine is q2k_engine else "paired"
            jobs = [job(i, long_every=25), job(i + 1, long_every=25)]
            done = await gather(*(partial(answer, engine, *j) for j in jobs))
            for _ in range(3):  # then again: the verifier's slots hold these very prompts
                checker = q2k_engine if engine is q2k_engine else verifiers
                calls = (partial(check, checker, *jobs[k], done[k], engine) for k in range(2))
                for k, verdict in enumerate(await gather(*calls)):
                    tally.keep(verdict, f"job {i + k} ({name})")
        for i in range(2 * pairs, 2 * pairs + singles):
            messages, params = job(i, long_every=25)
            alone = await answer(single, messages, params)
            for checker, what in ((verifiers, "1 thread"), (single, "2 threads"), (verifiers, "1 thread, warm"),
                                  (single, "2 threads, warm")):  # fmt: skip
                tally.keep(await check(checker, messages, params, alone, single), f"job {i} (2 threads; {what})")
    return tally


async def batched_checks(model_file: Path, *, rounds: int, report=None) -> Honest:
    """``4 * rounds`` honest answers of the batched engine (batch-invariant: exact), four jobs at a time joining
    a quarter of a second apart, so prompts are prefilled beside other sequences' decoding; every fifth carries
    the long system document, mostly found in a cache or copied from another sequence (prefix reuse). Each is
    checked once by a one-thread verifier, two checks at once."""
    tally = Honest("honest batched checks", report=report)
    async with (
        open_engine(model_file, slots=4, kind="batched") as worker,
        open_engine(model_file, slots=2, threads=1) as verifiers,
    ):
        assert worker.reproducible and worker.numerics == worker.batch_numerics != ""  # batch-invariant: exact

        async def later(delay: float, messages, params):
            await trio.sleep(delay)
            return await answer(worker, messages, params)

        for i in range(0, 4 * rounds, 4):
            jobs = [job(i + k, long_every=5) for k in range(4)]
            done = await gather(*(partial(later, 0.25 * k, *jobs[k]) for k in range(4)))
            for first in (0, 2):
                calls = (partial(check, verifiers, *jobs[k], done[k], worker) for k in (first, first + 1))
                for k, verdict in enumerate(await gather(*calls)):
                    tally.keep(verdict, f"batched job {i + first + k}")
        tally.reused_tokens = worker._scheduler.reused_tokens
    return tally


async def noisy_checks(
    model_file: Path, *, jobs: int, sigma: float = cheaters.NOISE, first: int = 2000, report=None
) -> Honest:
    """``jobs`` honest answers (up to 96 tokens) of a worker whose logits carry Gaussian noise of ``sigma`` at
    every position (``cheaters.NoisyHonest``, as a GPU's might; it claims no numerics, so it is checked in the
    widest class), each checked by a one-thread verifier. ``first``: the first ``job``'s index."""
    tally = Honest(f"honest noisy checks (noise {sigma})", report=report)
    async with (
        open_engine(model_file, slots=1, threads=1) as own,
        open_engine(model_file, slots=1, threads=1) as verifier,
    ):
        worker = cheaters.NoisyHonest(cheaters.Direct(own), sigma)
        for i in range(first, first + jobs):
            messages, params = job(i, long_every=25, max_tokens=96)
            done = await answer(worker, messages, params)
            tally.keep(await check(verifier, messages, params, done, worker), f"noisy job {i}")
    return tally


CHEATS = ["Q4_0", "Q2_K", "hidden-prompt", "hotter", "random-tokens", "truncate-pad", "noisy-hotter", "noisy-Q4_0",
          "pad-past-eog", "mild-hidden-prompt", "truncated-prompt", "hotter-1.3", "forged-Q2_K",
          "pad-past-eog-exact"]  # fmt: skip
WRAPPERS = {
    "hidden-prompt": cheaters.HiddenPrompt,
    "mild-hidden-prompt": lambda engine: cheaters.HiddenPrompt(engine, "Be concise."),
    "truncated-prompt": cheaters.TruncatePrompt,
    "hotter-1.3": lambda engine: cheaters.HotSampler(engine, factor=1.3),
    "hotter": cheaters.HotSampler,
    "random-tokens": cheaters.RandomTokens,
    "truncate-pad": cheaters.TruncatePad,
    "noisy-hotter": lambda engine: cheaters.NoisyRecords(cheaters.HotSampler(engine)),
}
#: The cheats of the noisy regime (no numerics claimed, noise in the records) are counted on jobs of at least 64
#: tokens (docs/verification.md); the others on jobs of at least 32.
LONG = {"noisy-hotter": 64, "noisy-Q4_0": 64, "pad-past-eog": 64, "pad-past-eog-exact": 64}
PADDERS = {"pad-past-eog", "pad-past-eog-exact"}  # the first claims no numerics, the second the real engine's
#: The noisy-regime cheaters (no numerics claimed, noise in the records): issue 19 asks >= 95% caught of them,
#: and 100% of every other cheater (the default worker's exact regime).
TARGET = {"noisy-hotter": 0.95, "noisy-Q4_0": 0.95, "pad-past-eog": 0.95}
#: Cheats that may leave an answer exactly as an honest worker gives it (a slightly hotter sampler can draw
#: every token the asked one draws): such a job is not cheated, and is not counted.
MAY_NOT_CHANGE = {"hotter-1.3"}


@dataclass
class Caught:
    """One cheater's tally: jobs checked, jobs caught, the first failing check of each, what passed."""

    cheat: str
    least: int = 32  # the shortest answer counted (tokens)
    checked: int = 0
    caught: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    passed: list[str] = field(default_factory=list)
    verdicts: list[tuple[SamplingParams, judge.Verdict]] = field(default_factory=list, repr=False)  # every check

    def summary(self) -> str:
        return (
            f"{self.cheat}: caught {self.caught} of {self.checked} jobs of >= {self.least} tokens; "
            f"failed checks: {json.dumps(self.reasons)}"
        )


def reason_kind(reason: str) -> str:
    """A verdict's reason without its token position, numbers and tolerance, to count failed checks by kind:
    "token 7: a logit is off by 3.10 (at most 2.0)" -> "a logit is off by #"; the exact regime's reason keeps
    its "where this machine's numerics … reproduce every logit exactly"."""
    text = re.sub(r"^token \d+: ", "", reason)
    text = re.split(r"[(;]", text)[0].strip()
    return re.sub(r"\d+(\.\d+)?", "#", text)


async def cheater_checks(
    cheat: str, model_file: Path, workdir: Path, *, jobs: int, first: int = 1000, report=None
) -> Caught:
    """``jobs`` checked answers of at least 32 tokens (64: ``LONG``) from the cheater ``cheat`` (in ``CHEATS``);
    a padder's answers count only where it padded (the model would have ended before ``max_tokens``).
    ``first``: the first ``job``'s index."""
    path = model_file
    quantization = cheat.removeprefix("noisy-").removeprefix("forged-")
    if quantization in cheaters.QUANTIZATIONS:
        path = cheaters.requantize(model_file, workdir / f"{quantization}.gguf", quantization)
    least = LONG.get(cheat, 32)
    tally = Caught(cheat, least)
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(open_engine(path, slots=2, kind="batched"))  # the default engine
        verifier = await stack.enter_async_context(open_engine(model_file, slots=2, threads=1))
        if cheat in ("noisy-Q4_0", "forged-Q2_K") or cheat in PADDERS:
            real = cheaters.Direct(await stack.enter_async_context(open_engine(model_file, slots=1, threads=1)))
        if cheat == "noisy-Q4_0":
            worker = cheaters.ForgedTokens(engine, real)
        elif cheat == "forged-Q2_K":  # the real model's exact numerics claimed, no noise
            worker = cheaters.ForgedTokens(engine, real, sigma=0.0, numerics=real.engine.numerics)
        elif cheat == "pad-past-eog-exact":  # as a default worker pads: its batched engine claims exact numerics
            worker = cheaters.PadPastEOG(real, numerics=real.engine.numerics)
        elif cheat == "pad-past-eog":
            worker = cheaters.PadPastEOG(real)
        else:
            worker = WRAPPERS[cheat](engine) if cheat in WRAPPERS else engine

        async def checked_if_long(messages, params) -> judge.Verdict | None:
            done = await answer(worker, messages, params)
            if done.usage.completion_tokens < least:
                return None
            if cheat in PADDERS and worker.honest[done.text] >= done.usage.completion_tokens:
                return None  # the model would not have ended earlier: nothing was padded
            if cheat in MAY_NOT_CHANGE and (await answer(engine, messages, params)).text == done.text:
                return None  # the honest engine (batch-invariant) gives the same answer: nothing was cheated
            return await check(verifier, messages, params, done, worker)

        i = first
        while tally.checked < jobs:
            pair = [job(i + k, long_every=25, max_tokens=max(40, least + least // 2), short=cheat in PADDERS)
                    for k in range(2)]  # fmt: skip
            i += 2
            calls = (partial(checked_if_long, m, replace(p, stop=())) for m, p in pair)
            for (_, params), verdict in zip(pair, await gather(*calls), strict=True):
                if verdict is None or tally.checked >= jobs:
                    continue
                tally.checked += 1
                tally.caught += not verdict.ok
                tally.verdicts.append((params, verdict))
                if verdict.ok:
                    tally.passed.append(f"temperature {params.temperature}, {verdict}")
                key = reason_kind(verdict.reason) if verdict.reason else "passed"
                tally.reasons[key] = tally.reasons.get(key, 0) + 1
                if report and tally.checked % PROGRESS_EVERY == 0:
                    report(f"{cheat}: caught {tally.caught} of {tally.checked}")
    return tally
