"""The batched engine (node/inference/batched.py) with the real model: jobs of different lengths joining at different
times, cancellation mid-batch, per-sequence sampling, a long prompt admitted while others decode, prompt
prefixes found in a sequence's cache (its own or another's) instead of computed again. Every answer
must pass verification against the model (node/verify/local.py, a one-thread per-slot verifier): greedy answers are
the argmax at each token up to near-ties, sampled ones the seeded draws of their own parameters. Bitwise
equality with a solo run is not asserted: a prompt prefilled beside other sequences is computed in other
ubatch shapes, and whether the floats then agree depends on the CPU (docs/benchmarks.md)."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from node.inference.engine import open_engine
from node.inference.sampling import Delta, Finished, SamplingParams
from node.protocol.messages import JobRequest
from node.verify import local as verify
from tests.factories import gather

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "a market town", "winter in the mountains", "bread", "a lighthouse", "trains", "bees", "rain"]
# A system prompt of ~1,000 tokens: longer than a prefill chunk and than one 512-token batch.
DOCUMENT = " ".join(
    f"Record {k}: the cooperative shipped {k * 13} crates of apples and {k * 5} barrels of cider to the "
    f"{['northern', 'southern', 'eastern', 'western'][k % 4]} depot, and noted the weather as "
    f"{['fair', 'wet', 'windy', 'cold'][k % 3]}."
    for k in range(1, 40)
)


def request(k: int, *, long: bool = False, max_tokens: int = 32, **changes) -> tuple[list[dict], SamplingParams]:
    messages = [{"role": "user", "content": f"Write a few lines about {TOPICS[k % len(TOPICS)]}."}]
    if long:
        messages.insert(0, {"role": "system", "content": DOCUMENT})
    return messages, SamplingParams(max_tokens=max_tokens, temperature=0, **changes)


async def run(engine, messages, params, *, after_s: float = 0.0, stop_after: int | None = None):
    """One job's Finished event (None when it was cancelled after ``stop_after`` deltas)."""
    await trio.sleep(after_s)
    deltas = 0
    async with engine.stream_chat(messages, params) as events:
        async for event in events:
            if isinstance(event, Delta):
                deltas += 1
                if stop_after is not None and deltas >= stop_after:
                    return None  # leaving the block cancels the job
            if isinstance(event, Finished):
                return event
    raise AssertionError("no Finished event")


@pytest.fixture
async def engines(default_model_file):
    """A batched engine with 8 sequences, and a one-thread per-slot engine that checks answers."""
    async with (
        open_engine(default_model_file, slots=8, kind="batched") as batched,
        open_engine(default_model_file, slots=1, threads=1) as verifier,
    ):
        yield batched, verifier


async def honest(verifier, messages, params: SamplingParams, done) -> None:
    """``done`` is an honest answer to (messages, params), as node/verify/judge.py judges it."""
    fields = dataclasses.asdict(params)
    fields["stop"] = list(fields["stop"])
    verdict = await verify.check(
        verifier, JobRequest(job_id="j", model="m", params=fields, messages=messages), done.fingerprints,
        text=done.text, finish_reason=done.finish_reason, completion_tokens=done.usage.completion_tokens,
    )  # fmt: skip
    assert verdict.ok, verdict.reason
    records = len(done.fingerprints) // 15
    assert done.usage.completion_tokens <= records <= done.usage.completion_tokens + 1


@pytest.mark.long
async def test_eight_jobs_of_different_lengths_joining_at_different_times(engines):
    batched, verifier = engines
    jobs = [request(k, long=k % 3 == 0, max_tokens=8 + 12 * k) for k in range(8)]
    with trio.fail_after(900):
        steps = batched._scheduler.steps
        results = await gather(*(lambda k=k: run(batched, *jobs[k], after_s=0.3 * k) for k in range(8)))
        for k, (messages, params) in enumerate(jobs):
            done = results[k]
            assert done.usage.completion_tokens <= params.max_tokens
            assert (done.finish_reason == "length") == (done.usage.completion_tokens == params.max_tokens), k
            assert done.usage.prompt_tokens > (1000 if k % 3 == 0 else 20)
            await honest(verifier, messages, params, done)
    assert batched.free_slots == 8
    # sequences shared decode steps: far fewer steps than tokens generated
    assert batched._scheduler.steps - steps < 0.6 * sum(r.usage.completion_tokens for r in results)


async def test_a_cancelled_job_frees_its_sequence_and_the_others_go_on_unaffected(engines):
    batched, verifier = engines
    jobs = [request(k, max_tokens=48) for k in range(3)]
    with trio.fail_after(300):
        results = await gather(
            lambda: run(batched, *jobs[0]),
            lambda: run(batched, *jobs[1], stop_after=3),
            lambda: run(batched, *jobs[2]),
        )
        assert results[1] is None
        while batched.free_slots < 8:  # the cancelled sequence is back within a step
            await trio.sleep(0.01)
        for k in (0, 2):
            await honest(verifier, *jobs[k], results[k])
        reused = batched._scheduler.reused_tokens
        again = await run(batched, *jobs[1])  # the cancelled job's cells serve the same prompt again
        assert batched._scheduler.reused_tokens - reused == again.usage.prompt_tokens - 1
        await honest(verifier, *jobs[1], again)


async def test_sampling_parameters_do_not_leak_between_sequences(engines):
    batched, verifier = engines
    greedy = request(0, max_tokens=40)
    hot = (greedy[0], dataclasses.replace(greedy[1], temperature=1.5, seed=7, top_k=0, top_p=1.0, min_p=0.0))
    with trio.fail_after(300):
        done_greedy, done_hot = await gather(lambda: run(batched, *greedy), lambda: run(batched, *hot))
        assert done_hot.text != done_greedy.text  # the hot one really sampled at its own temperature
        await honest(verifier, *greedy, done_greedy)  # the argmax at every token: no heat leaked into it
        await honest(verifier, *hot, done_hot)  # its own seeded draws at 1.5


@pytest.mark.long
async def test_a_long_prompt_is_admitted_while_others_decode(engines):
    batched, verifier = engines
    short = request(1, max_tokens=64)
    long = request(2, long=True, max_tokens=16)
    with trio.fail_after(300):
        before = batched._scheduler.mixed_steps
        done_short, done_long = await gather(lambda: run(batched, *short), lambda: run(batched, *long, after_s=0.5))
        assert done_long.usage.prompt_tokens > 1000
        assert batched._scheduler.mixed_steps - before >= 2  # its chunks went in beside the other's tokens
        await honest(verifier, *short, done_short)
        await honest(verifier, *long, done_long)


@pytest.mark.long
async def test_a_prompt_prefix_already_in_a_cache_is_not_computed_again(engines):
    """The same ~1,000-token system prompt three times: the second job joins while the first decodes, and its
    free sequences hold nothing, so the first's stream is copied to it; the third comes after both finished and
    finds the prefix in a free sequence's own cache. Each answer must still be honest (a cache holding the
    wrong cells or positions would not be)."""
    batched, verifier = engines
    scheduler = batched._scheduler
    first, second, third = (request(k, long=True, max_tokens=n) for k, n in ((0, 96), (1, 24), (2, 24)))
    results: dict[str, Finished] = {}
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            decoding = trio.Event()

            async def lead() -> None:
                async with batched.stream_chat(*first) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            decoding.set()
                        if isinstance(event, Finished):
                            results["first"] = event

            nursery.start_soon(lead)
            await decoding.wait()
            copies, reused = scheduler.copies, scheduler.reused_tokens
            results["second"] = await run(batched, *second)
            assert "first" not in results or results["first"].usage.completion_tokens > 8
            assert scheduler.copies == copies + 1
            shared = scheduler.reused_tokens - reused
            assert 1000 < shared < results["second"].usage.prompt_tokens
        copies, reused = scheduler.copies, scheduler.reused_tokens
        results["third"] = await run(batched, *third)
        assert scheduler.copies == copies  # a free sequence's own cache held it
        assert scheduler.reused_tokens - reused == shared
        for name, (messages, params) in (("first", first), ("second", second), ("third", third)):
            await honest(verifier, messages, params, results[name])


@pytest.mark.long
async def test_jobs_arriving_together_with_one_system_prompt_compute_it_once(engines):
    """Four jobs at once, one ~1,000-token system prompt: the first to be admitted computes it, the others wait
    for it and copy it (``Scheduler._place``), instead of all four prefilling it side by side."""
    batched, verifier = engines
    scheduler = batched._scheduler
    jobs = [request(k, long=True, max_tokens=16) for k in range(4)]
    with trio.fail_after(600):
        reused, copies = scheduler.reused_tokens, scheduler.copies
        results = await gather(*(lambda k=k: run(batched, *jobs[k]) for k in range(4)))
        prompt = results[0].usage.prompt_tokens
        assert scheduler.copies - copies == 3
        assert scheduler.reused_tokens - reused > 3 * (prompt - 20)  # all but each one's own question
        for k in range(4):
            await honest(verifier, *jobs[k], results[k])
