"""The batched engine (node/inference/batched.py) with the real model: jobs of different lengths joining at different
times, cancellation mid-batch, per-sequence sampling, a long prompt admitted while others decode, prompt
prefixes found in a sequence's cache (its own or another's) instead of computed again. Every answer
must pass verification against the model (node/verify/local.py, a one-thread per-slot verifier): greedy answers are
the argmax at each token up to near-ties, sampled ones the seeded draws of their own parameters. Bitwise
equality with a solo run is not asserted: a prompt prefilled beside other sequences is computed in other
ubatch shapes, and whether the floats then agree depends on the CPU (docs/benchmarks.md).

The engine's own faults (issue 19, section 4): a llama.cpp failure fails every job, running or queued, instead of
finishing it; a verification pass lets the running jobs decode between its batches; what one slot's check
computed is what every slot sees."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import trio

from node.inference.batched import EngineFailed, Scheduler, _Call
from node.inference.engine import open_engine
from node.inference.fingerprints import pack
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
        text=done.text, finish_reason=done.finish_reason, prompt_tokens=done.usage.prompt_tokens,
        completion_tokens=done.usage.completion_tokens,
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


# ------------------------------------------------------------------ the engine's own faults (issue 19, section 4)


class FailingDecode:
    """llama_cpp as the scheduler sees it (``Scheduler._c``), with ``llama_decode`` failing once ``armed`` is set.

    ``before_failing``, when given, runs on the scheduler's thread inside the failing call (``failing`` is set
    then), just before it fails."""

    def __init__(self, real, before_failing=None) -> None:
        self._real, self._before = real, before_failing
        self.armed, self.failing = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._real, name)

    def llama_decode(self, ctx, batch) -> int:
        if not self.armed.is_set():
            return self._real.llama_decode(ctx, batch)
        self.failing.set()
        if self._before is not None:
            self._before()
        return -1  # what llama.cpp returns when it cannot place a batch in the cache


async def events_until_error(engine, messages, params, *, after: int | None = None, then=None):
    """A job's events, and what its stream raised (None if nothing); ``then()`` runs after ``after`` events."""
    seen: list = []
    try:
        async with engine.stream_chat(messages, params) as events:
            async for event in events:
                seen.append(event)
                if after is not None and len(seen) == after:
                    then()
    except Exception as err:  # noqa: BLE001  (what the consumer gets is what is asserted)
        return seen, err
    return seen, None


async def test_a_llama_cpp_failure_mid_job_fails_the_job_instead_of_finishing_it(default_model_file, monkeypatch):
    """A job cut short by llama.cpp must not end with a ``Finished``: the worker would sign a ``JobDone`` and
    bill the truncated answer. Its stream raises instead, and the dead engine refuses the next job."""
    async with open_engine(default_model_file, slots=2, kind="batched") as engine:
        scheduler = engine._scheduler
        failing = FailingDecode(scheduler._c)
        monkeypatch.setattr(scheduler, "_c", failing)
        with trio.fail_after(120):
            seen, err = await events_until_error(engine, *request(0, max_tokens=64), after=2, then=failing.armed.set)
            assert len(seen) >= 2 and not any(isinstance(e, Finished) for e in seen), seen[-1]
            assert isinstance(err, RuntimeError) and "llama.cpp failed" in str(err), repr(err)
            with pytest.raises(RuntimeError, match="llama.cpp failed"):  # one error, not a group with "no Finished"
                await engine.complete_chat(*request(1))


async def test_a_job_queued_as_the_engine_dies_fails_instead_of_waiting_forever(default_model_file, monkeypatch):
    """Job B is queued while the scheduler is inside the decode that fails (deterministically: that decode
    waits until B is queued). B must end with the error; it used to wait in a shielded wait forever."""
    async with open_engine(default_model_file, slots=2, kind="batched") as engine:
        scheduler = engine._scheduler
        queued = threading.Event()
        failing = FailingDecode(scheduler._c, before_failing=lambda: queued.wait(60))
        monkeypatch.setattr(scheduler, "_c", failing)
        submitted = []
        submit = scheduler.submit

        def submit_and_tell(job) -> None:
            submit(job)
            submitted.append(job)
            if len(submitted) == 2:
                queued.set()

        monkeypatch.setattr(scheduler, "submit", submit_and_tell)
        outcome: dict = {}
        b_done = trio.Event()

        async def job_a() -> None:
            outcome["a"] = await events_until_error(engine, *request(0, max_tokens=64), after=1, then=failing.armed.set)

        async def job_b() -> None:
            await trio.to_thread.run_sync(failing.failing.wait)  # the scheduler is in the decode that fails
            outcome["b"] = await events_until_error(engine, *request(1))
            b_done.set()

        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(job_a)
                nursery.start_soon(job_b)
                with trio.move_on_after(60):  # only a regression waits this long
                    await b_done.wait()
                if not b_done.is_set():
                    submitted[1].done()  # release B's shielded wait, or this test would hang instead of failing
                    await b_done.wait()
                    pytest.fail("job B, queued as the engine died, was never ended")
        for name in ("a", "b"):
            seen, err = outcome[name]
            assert not any(isinstance(e, Finished) for e in seen), name
            assert isinstance(err, RuntimeError) and "llama.cpp failed" in str(err), (name, repr(err))


def test_a_call_queued_behind_a_stop_fails_instead_of_waiting_forever():
    """A verification pass (a ``call``) queued just after ``stop`` used to wait forever in its trio thread, and
    with it the worker's shutdown on Ctrl-C. Both are queued before the loop starts, so the order is certain."""
    scheduler = Scheduler(64)
    scheduler._incoming.put(None)  # what ``stop`` queues
    queued = _Call(lambda: "computed")
    scheduler.submit(queued)
    scheduler.start()
    with pytest.raises(EngineFailed, match="was stopped"):
        queued.result.result(timeout=60)
    with pytest.raises(EngineFailed, match="was stopped"):  # and nothing is queued after that
        scheduler.call(lambda: "computed")
    scheduler.stop()


def document_tokens(llama, n: int) -> list[int]:
    """``n`` tokens of plain text (the records of DOCUMENT, repeated)."""
    tokens = llama.tokenize((DOCUMENT + " ").encode() * 3, add_bos=True, special=False)
    assert len(tokens) >= n
    return tokens[:n]


def records_of(tokens: list[int]) -> bytes:
    """Fingerprints that claim ``tokens`` as an answer (``observe`` re-runs any tokens it is given)."""
    zeros = [0.0] * len(tokens)
    return pack(tokens, tokens, tokens, zeros, zeros, zeros)


def same_observations(a, b) -> bool:
    """Bit for bit (NaN where the other has the same NaN)."""
    bits = lambda v: (v.dtype, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else v  # noqa: E731
    return all(bits(getattr(a, f.name)) == bits(getattr(b, f.name)) for f in dataclasses.fields(a))


def counting_evals(monkeypatch, llama, scheduler) -> list[tuple[int, int]]:
    """Each ``llama.eval`` (a verification pass's prompt) as (tokens evaluated, scheduler steps meanwhile)."""
    evals: list[tuple[int, int]] = []
    real = llama.eval

    def evaluate(tokens) -> None:
        steps = scheduler.steps
        real(tokens)
        evals.append((len(tokens), scheduler.steps - steps))

    monkeypatch.setattr(llama, "eval", evaluate)
    return evals


async def test_a_verification_pass_does_not_stall_the_running_jobs(default_model_file, monkeypatch):
    """A 1,200-token check is three 512-token batches on the model's own context; the running job decodes a
    step between them (counted with the scheduler's steps: no timing). What the check observes is bit for bit
    what the same check gives on an idle engine."""
    async with open_engine(default_model_file, slots=2, kind="batched") as engine:
        scheduler, llama = engine._scheduler, engine._llamas[0]
        prompt = document_tokens(llama, 1200)
        check = (lambda _llama: (prompt, []), SamplingParams(max_tokens=64, temperature=0), records_of(prompt[:40]))
        evals = counting_evals(monkeypatch, llama, scheduler)
        # a job that cannot end before 300 characters: it is still decoding when the check ends
        long = SamplingParams(max_tokens=400, temperature=0, grammar="root ::= [a-z ]{300}")
        with trio.fail_after(300):
            async with engine.stream_chat(request(0)[0], long) as events:
                await events.receive()  # decoding
                busy = await engine.observe(*check)
            assert len(evals) == 1 and evals[0][0] == 1200
            assert evals[0][1] >= 2, f"no step between the check's batches: {evals}"
            llama.reset()  # the same check again, from an empty cache, with nothing else running
            idle = await engine.observe(*check)
            assert evals[1] == (1200, 0)
        assert same_observations(busy, idle)


async def test_what_one_slot_computed_is_what_every_slot_sees(default_model_file, monkeypatch):
    """Every slot of the batched engine checks on the model's one context. Slot 0's check leaves 1,024 prompt
    tokens reusable; slot 1's check then rewrites those cells with a short prompt and an answer (computed in
    answer-sized batches, which a prompt may never reuse). Slot 0's next check must not trust its old value."""
    async with open_engine(default_model_file, slots=2, kind="batched") as engine:
        scheduler, llama = engine._scheduler, engine._llamas[0]
        text = document_tokens(llama, 1100)
        greedy = SamplingParams(max_tokens=64, temperature=0)

        async def check(prompt: list[int], answer: list[int]):
            return await engine.observe(lambda _llama: (prompt, []), greedy, records_of(answer))

        evals = counting_evals(monkeypatch, llama, scheduler)
        with trio.fail_after(300):
            first = await check(text, text[:8])  # slot 0 (slots are taken in turn)
            await check(text[:300], text[300:900])  # slot 1: the cache now holds text[:900], 600 of it as an answer
            again = await check(text, text[:8])  # slot 0 again
        assert [n for n, _ in evals] == [1100, 300, 1100], evals  # a fresh prompt pass, not 588 tokens on stale cells
        assert same_observations(first, again)
