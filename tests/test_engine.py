"""The inference engine with the real default model (SmolLM2-135M-Instruct) through llama.cpp."""

from __future__ import annotations

import time

import pytest
import trio

from node.engine import FINISH_LENGTH, FINISH_STOP, Finished, SamplingParams, open_engine
from node.errors import InvalidRequest, ModelError

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Name three colors."}]
GREEDY = SamplingParams(max_tokens=48, temperature=0.0)


@pytest.fixture
async def engine(default_model_file):
    async with open_engine(default_model_file, slots=2, n_ctx=1024) as engine:
        yield engine


async def collect(stream) -> tuple[list[str], Finished]:
    deltas = []
    async with stream as events:
        async for event in events:
            if isinstance(event, Finished):
                return deltas, event
            deltas.append(event.text)
    raise AssertionError("no Finished event")


async def test_greedy_output_is_identical_across_runs(engine):
    with trio.fail_after(30):
        first = await engine.complete_chat(QUESTION, GREEDY)
        second = await engine.complete_chat(QUESTION, GREEDY)
    assert first.text and first.text == second.text
    assert first.usage == second.usage


async def test_streamed_deltas_add_up_to_the_text_and_the_tokens(engine):
    with trio.fail_after(30):
        async with engine.stream_chat(QUESTION, GREEDY) as events:
            stream = [event async for event in events]
    *deltas, done = stream
    assert len(deltas) > 1 and "".join(d.text for d in deltas) == done.text
    assert sum(d.tokens for d in deltas) == done.usage.completion_tokens


async def test_an_answer_continues_after_a_prefix(engine):
    with trio.fail_after(30):
        whole = await engine.complete_chat(QUESTION, GREEDY)
        cut = whole.text.index("\n") + 1  # a cut between tokens, as a worker's streamed chunks are
        async with engine.stream_chat(QUESTION, GREEDY, assistant_prefix=whole.text[:cut]) as events:
            rest = "".join([e.text async for e in events if not isinstance(e, Finished)])
    # greedy decoding from the same context continues with the same words
    assert whole.text[:cut] + rest == whole.text


async def test_a_seed_makes_sampling_repeatable(engine):
    sampled = SamplingParams(max_tokens=32, temperature=1.0, seed=1234)
    with trio.fail_after(30):
        a = await engine.complete_chat(QUESTION, sampled)
        b = await engine.complete_chat(QUESTION, sampled)
    assert a.text == b.text


async def test_max_tokens_is_honoured(engine):
    with trio.fail_after(30):
        done = await engine.complete_chat(
            [{"role": "user", "content": "Write a long story about a dragon."}],
            SamplingParams(max_tokens=7, temperature=0),
        )
    assert done.finish_reason == FINISH_LENGTH and done.usage.completion_tokens == 7


async def test_stop_sequences_are_honoured(engine):
    prompt = [{"role": "user", "content": "Write a long story about a dragon."}]
    with trio.fail_after(30):
        full = await engine.complete_chat(prompt, SamplingParams(max_tokens=40, temperature=0))
        stop = full.text[20:24]
        cut = full.text.find(stop)
        deltas, stopped = await collect(
            engine.stream_chat(prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))
        )
    assert stopped.finish_reason == FINISH_STOP
    assert stopped.text == full.text[:cut] and "".join(deltas) == stopped.text
    assert stopped.usage.completion_tokens < full.usage.completion_tokens


async def test_usage_equals_the_tokenizers_count(engine, default_model_file):
    from llama_cpp import Llama

    prompt = "The three primary colors are"
    with trio.fail_after(30):
        _, done = await collect(engine.stream_completion(prompt, SamplingParams(max_tokens=16, temperature=0)))
    tokenizer = Llama(str(default_model_file), vocab_only=True, verbose=False)
    try:
        assert done.usage.prompt_tokens == len(tokenizer.tokenize(prompt.encode(), add_bos=True))
        assert done.usage.completion_tokens == 16 == len(tokenizer.tokenize(done.text.encode(), add_bos=False))
    finally:
        tokenizer.close()


async def test_cancelling_mid_stream_frees_the_slot_at_once(engine):
    long_job = [{"role": "user", "content": "Write a very long story about the sea."}]
    with trio.fail_after(30):
        async with engine.stream_chat(long_job, SamplingParams(max_tokens=900)) as events:
            seen = 0
            async for _ in events:
                seen += 1
                if seen == 3:
                    break
            assert engine.free_slots == 1
            left = time.perf_counter()
        freed_after = time.perf_counter() - left
        assert engine.free_slots == 2 and freed_after < 0.1

        with trio.move_on_after(0.3) as scope:  # cancelled from outside, by a deadline
            async with engine.stream_chat(long_job, SamplingParams(max_tokens=900)) as events:
                async for _ in events:
                    pass
        assert scope.cancelled_caught and engine.free_slots == 2


async def test_two_slots_run_two_jobs_at_once_correctly(engine):
    prompts = [QUESTION, [{"role": "user", "content": "What is 2 + 2?"}]]
    with trio.fail_after(60):
        alone = [await engine.complete_chat(p, GREEDY) for p in prompts]
        together: list[Finished | None] = [None, None]
        busy = []

        async def run(i):
            async with engine.stream_chat(prompts[i], GREEDY) as events:
                async for event in events:
                    busy.append(engine.free_slots)
                    if isinstance(event, Finished):
                        together[i] = event

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, 0)
            nursery.start_soon(run, 1)
    assert [t.text for t in together] == [a.text for a in alone]
    assert 0 in busy  # at some point both slots were in use


async def test_bad_requests_are_refused(engine):
    with pytest.raises(InvalidRequest, match="temperature"):
        await engine.complete_chat(QUESTION, SamplingParams(temperature=-1))
    with pytest.raises(InvalidRequest, match="role"):
        await engine.complete_chat([{"role": "wizard", "content": "hi"}], GREEDY)
    with pytest.raises(InvalidRequest, match="exceeds the context size 1024"):
        await engine.complete_chat(QUESTION, SamplingParams(max_tokens=1000))
    assert engine.free_slots == 2


async def test_non_gguf_files_are_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ModelError, match="is not a GGUF model"):
        async with open_engine(fake):
            pass
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(ModelError, match="llama.cpp could not load"):
        async with open_engine(broken):
            pass
