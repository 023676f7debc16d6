"""The inference engine with the real default model (SmolLM2-135M-Instruct) through llama.cpp."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import trio

from node.errors import InvalidRequest, ModelError
from node.inference.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    Delta,
    Finished,
    SamplingParams,
    kv_bytes_per_token,
    open_engine,
    slot_plan,
)
from node.inference.grammar import MAX_SCHEMA_REPEAT, schema_problem
from node.inference.hardware import MAX_AUTO_SLOTS, Gpu, HardwareProfile, plan_slots
from tests.factories import gather

slow = pytest.mark.slow  # the real model through llama.cpp

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


@slow
async def test_greedy_output_is_identical_across_runs(engine):
    with trio.fail_after(30):
        first = await engine.complete_chat(QUESTION, GREEDY)
        second = await engine.complete_chat(QUESTION, GREEDY)
    assert first.text and first.text == second.text
    assert first.usage == second.usage


@slow
async def test_streamed_deltas_add_up_to_the_text_and_the_tokens(engine):
    with trio.fail_after(30):
        async with engine.stream_chat(QUESTION, GREEDY) as events:
            stream = [event async for event in events]
    *deltas, done = stream
    assert len(deltas) > 1 and "".join(d.text for d in deltas) == done.text
    assert sum(d.tokens for d in deltas) == done.usage.completion_tokens


@slow
async def test_an_answer_continues_after_a_prefix(engine):
    with trio.fail_after(30):
        whole = await engine.complete_chat(QUESTION, GREEDY)
        cut = whole.text.index("\n") + 1  # a cut between tokens, as a worker's streamed chunks are
        async with engine.stream_chat(QUESTION, GREEDY, assistant_prefix=whole.text[:cut]) as events:
            rest = "".join([e.text async for e in events if not isinstance(e, Finished)])
    # greedy decoding from the same context continues with the same words
    assert whole.text[:cut] + rest == whole.text


@slow
async def test_a_seed_makes_sampling_repeatable(engine):
    sampled = SamplingParams(max_tokens=32, temperature=1.0, seed=1234)
    with trio.fail_after(30):
        a = await engine.complete_chat(QUESTION, sampled)
        b = await engine.complete_chat(QUESTION, sampled)
    assert a.text == b.text


@slow
async def test_max_tokens_is_honoured(engine):
    with trio.fail_after(30):
        done = await engine.complete_chat(
            [{"role": "user", "content": "Write a long story about a dragon."}],
            SamplingParams(max_tokens=7, temperature=0),
        )
    assert done.finish_reason == FINISH_LENGTH and done.usage.completion_tokens == 7


@slow
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


@slow
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


@slow
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


@slow
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


@slow
async def test_bad_requests_are_refused(engine):
    with pytest.raises(InvalidRequest, match="temperature"):
        await engine.complete_chat(QUESTION, SamplingParams(temperature=-1))
    with pytest.raises(InvalidRequest, match="role"):
        await engine.complete_chat([{"role": "wizard", "content": "hi"}], GREEDY)
    with pytest.raises(InvalidRequest, match="exceeds the context size 1024"):
        await engine.complete_chat(QUESTION, SamplingParams(max_tokens=1000))
    assert engine.free_slots == 2


@slow
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


# ------------------------------------------------------------------ logprobs


async def stream_events(stream) -> tuple[list[Delta], Finished]:
    async with stream as events:
        *deltas, done = [event async for event in events]
    assert isinstance(done, Finished)
    return deltas, done


def assert_logprobs_line_up(deltas: list[Delta], done: Finished, k: int) -> None:
    """One TokenLogprob per counted token, in every delta; each a log-probability with k alternatives, best first."""
    for d in deltas:
        assert len(d.logprobs) == d.tokens
    entries = [entry for d in deltas for entry in d.logprobs]
    assert len(entries) == done.usage.completion_tokens > 0
    for entry in entries:
        assert isinstance(entry.token, str) and math.isfinite(entry.logprob) and entry.logprob <= 0
        assert len(entry.top) == k
        values = [logprob for _, logprob in entry.top]
        assert all(v <= 0 for v in values) and values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        if entry.top:
            assert entry.logprob <= entry.top[0][1] + 1e-9  # nothing beats the best alternative
    joined = "".join(entry.token for entry in entries)
    if "\ufffd" not in joined:  # no token split a UTF-8 character: the token texts spell the answer
        assert joined.startswith(done.text)


@slow
async def test_greedy_logprobs_describe_each_sampled_token(engine):
    # repeat_penalty 1: greedy then picks the raw logits' best token, the top-1 entry
    params = SamplingParams(max_tokens=32, temperature=0.0, repeat_penalty=1.0, logprobs=5)
    with trio.fail_after(30):
        deltas, done = await stream_events(engine.stream_chat(QUESTION, params))
    assert_logprobs_line_up(deltas, done, k=5)
    for entry in (e for d in deltas for e in d.logprobs):
        assert entry.logprob == pytest.approx(entry.top[0][1], abs=1e-6)
    assert "".join(d.text for d in deltas) == done.text


@slow
async def test_logprobs_cover_held_back_and_flushed_tokens(engine):
    """Tokens held back for a possible stop string, and the final flush, still get their logprobs, in order."""
    prompt = [{"role": "user", "content": "Write a long story about a dragon."}]
    with trio.fail_after(60):
        full = await engine.complete_chat(prompt, SamplingParams(max_tokens=40, temperature=0))
        stop = full.text[20:24]
        stopped = SamplingParams(max_tokens=40, temperature=0, stop=(stop, "\n\n\n"), logprobs=3)
        deltas, done = await stream_events(engine.stream_chat(prompt, stopped))
        assert_logprobs_line_up(deltas, done, k=3)
        sampled = SamplingParams(max_tokens=7, temperature=1.0, seed=7, logprobs=0)
        deltas, done = await stream_events(engine.stream_chat(prompt, sampled))
        assert_logprobs_line_up(deltas, done, k=0)
        assert done.finish_reason == FINISH_LENGTH or done.usage.completion_tokens < 7


@slow
async def test_logprobs_off_adds_nothing(engine):
    with trio.fail_after(30):
        deltas, done = await stream_events(engine.stream_chat(QUESTION, GREEDY))
    assert deltas and all(d.logprobs == () for d in deltas)


def test_logprobs_values_are_checked():
    for bad in (-1, 21, True, 2.0):
        with pytest.raises(InvalidRequest, match="logprobs"):
            SamplingParams(logprobs=bad).validate()
    SamplingParams(logprobs=0).validate()
    SamplingParams(logprobs=20).validate()


# ------------------------------------------------------------------ grammars

ANSWER_SCHEMA = '{"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}'


@slow
async def test_json_schema_output_parses_and_matches(engine):
    question = [{"role": "user", "content": "What is 6 times 7? Reply in JSON."}]
    for params in (
        SamplingParams(max_tokens=64, temperature=0, json_schema=ANSWER_SCHEMA),
        SamplingParams(max_tokens=64, temperature=1.0, seed=3, json_schema=ANSWER_SCHEMA, logprobs=2),
    ):
        with trio.fail_after(60):
            deltas, done = await stream_events(engine.stream_chat(question, params))
        assert done.finish_reason == FINISH_STOP, done.text
        answer = json.loads(done.text)
        assert isinstance(answer, dict) and type(answer["answer"]) is int
        if params.logprobs is not None:
            assert_logprobs_line_up(deltas, done, k=2)


@slow
async def test_a_resumed_constrained_answer_stays_valid(engine):
    """After failover the grammar continues from the text already said, in chat and in plain completion."""
    question = [{"role": "user", "content": "What is 6 times 7? Reply in JSON."}]
    params = SamplingParams(max_tokens=64, temperature=0, json_schema=ANSWER_SCHEMA)
    with trio.fail_after(90):
        said = '{"answer'  # cut mid-key, as a dying worker might leave it
        _, done = await stream_events(engine.stream_chat(question, params, assistant_prefix=said))
        assert type(json.loads(said + done.text)["answer"]) is int
        prompt = "Q: What is 6 times 7? Answer in JSON.\nA: "
        _, done = await stream_events(engine.stream_completion(prompt, params, resume_text='{ "answer":'))
        assert type(json.loads('{ "answer":' + done.text)["answer"]) is int
        with pytest.raises(InvalidRequest, match="does not match the grammar"):
            await stream_events(engine.stream_chat(question, params, assistant_prefix="Sure! "))
    assert engine.free_slots == 2


@slow
async def test_a_gbnf_grammar_constrains_the_output(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=11, grammar='root ::= ("yes" | "no") "."')
    with trio.fail_after(30):
        for _ in range(3):
            done = await engine.complete_chat([{"role": "user", "content": "Is the sea blue?"}], params)
            assert done.text in ("yes.", "no.") and done.finish_reason == FINISH_STOP


BAD_GRAMMARS = [
    (dict(grammar='root ::= ("a"'), "grammar: llama.cpp cannot use"),  # syntax
    (dict(grammar="root ::= thing"), "grammar: llama.cpp cannot use"),  # undefined rule
    (dict(grammar='start ::= "a"'), "grammar: llama.cpp cannot use"),  # no root
    (dict(grammar='root ::= root "a" | "a"'), "grammar: llama.cpp cannot use"),  # left recursion
    (dict(grammar='root ::= "a"{5000}'), "grammar: llama.cpp cannot use"),  # over llama.cpp's repetitions
    (dict(grammar='root ::= "\ud800"'), "grammar is not valid Unicode"),
    (dict(grammar='root ::= "a\x00"'), "grammar must not contain NUL"),
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(json_schema="[1, 2]"), "json_schema must be a JSON object"),
    (dict(json_schema='{"type": "string", "maxLength": 1000000000}'), "maxLength 1000000000 is over"),
    (dict(json_schema='{"type": "string", "pattern": "^a{2,99999999}$"}'), "pattern's"),
    (dict(json_schema='{"$ref": "https://example.com/schema.json"}'), "only local"),
    (dict(json_schema='{"type": "wat"}'), "json_schema cannot be turned into a grammar: Unrecognized schema"),
    (dict(json_schema=ANSWER_SCHEMA, grammar='root ::= "a"'), "not both"),
]


@slow
async def test_bad_grammars_are_refused_before_taking_a_slot(engine):
    long_job = [{"role": "user", "content": "Write a very long story about the sea."}]
    with trio.fail_after(60):
        async with engine.stream_chat(long_job, SamplingParams(max_tokens=900)) as a:
            async with engine.stream_chat(long_job, SamplingParams(max_tokens=900)) as b:
                await a.receive(), await b.receive()
                assert engine.free_slots == 0  # every slot busy: a refusal must not wait for one
                for fields, message in BAD_GRAMMARS:
                    with trio.fail_after(5), pytest.raises(InvalidRequest, match=message) as caught:
                        await engine.complete_chat(QUESTION, SamplingParams(max_tokens=8, **fields))
                    assert "\n" not in str(caught.value)
    assert engine.free_slots == 2


@slow
async def test_a_grammar_that_reaches_a_dead_end_fails_the_job_not_the_process(engine):
    """No token can produce a NUL character: llama.cpp itself would abort the process here."""
    for temperature in (0.0, 0.8):
        params = SamplingParams(max_tokens=8, temperature=temperature, grammar=r'root ::= "ok" [\x00]')
        with trio.fail_after(30), pytest.raises(InvalidRequest, match="the grammar allows no token here"):
            await engine.complete_chat(QUESTION, params)
    assert engine.free_slots == 2
    with trio.fail_after(30):
        assert (await engine.complete_chat(QUESTION, GREEDY)).text  # the slots still work


def test_schema_problems_are_found_anywhere():
    assert schema_problem({"type": "array", "maxItems": MAX_SCHEMA_REPEAT}) is None
    assert schema_problem({"properties": {"pattern": {"type": "string", "pattern": "a{3}"}}}) is None
    assert schema_problem({"$defs": {"a": {"type": "integer"}}, "items": {"$ref": "#/$defs/a"}}) is None
    nested = {"properties": {"x": {"type": "array", "items": [{"type": "string", "minLength": 10**6}]}}}
    assert schema_problem(nested).startswith("minLength 1000000 is over")
    assert schema_problem({"anyOf": [{"pattern": "x{1," + "9" * 5000 + "}"}]}).startswith("the pattern's {1,999")
    assert schema_problem({"items": {"$ref": "https://example.com/s.json"}}) == "only local $refs (#/...) are supported"


# ------------------------------------------------------------------ the leaf module


def test_sampling_is_a_leaf_module():
    """The requester, gateway and CLI import node.inference.sampling without llama.cpp, the hardware probe or web3."""
    heavy = ("node.inference.engine", "node.inference.hardware", "llama_cpp", "web3", "numpy", "trio")
    code = f"import sys, node.inference.sampling; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
    import node.inference.engine
    import node.inference.sampling

    for name in ("SamplingParams", "Delta", "Finished", "Usage", "TokenLogprob", "validate_messages"):
        assert getattr(node.inference.engine, name) is getattr(node.inference.sampling, name)


@slow
async def test_the_same_request_gives_the_same_tokens_cold_warm_and_beside_another_job(engine):
    """Reproducibility (for one build and backend): the slots' caches hold other prompts, or this very one, and
    another job runs at the same time: the text and token count are byte-identical to a cold run.

    A long prompt (over one 512-token batch) exercises the reused-prefix path too."""
    document = " ".join(f"Line {i}: the harbour of town {i % 7} counted {i * 3} boats." for i in range(45))
    long = [{"role": "system", "content": document}, {"role": "user", "content": "How many towns are there?"}]
    short = [{"role": "user", "content": "What is 2 + 2?"}]
    seeded = SamplingParams(max_tokens=24, temperature=0.9, seed=7)
    with trio.fail_after(240):
        for llama in engine._llamas:
            llama.reset()
        cold = {name: await engine.complete_chat(m, p) for name, m, p in
                (("long", long, GREEDY), ("short", short, GREEDY), ("seeded", short, seeded))}  # fmt: skip
        assert cold["long"].usage.prompt_tokens > 512
        for _ in range(2):  # warm: every slot has now seen these prompts (and their answers) before
            for name, m, p in (("long", long, GREEDY), ("short", short, GREEDY), ("seeded", short, seeded)):
                again = await engine.complete_chat(m, p)
                assert (again.text, again.usage) == (cold[name].text, cold[name].usage), name
        beside: list = [None, None]

        async def run(i, messages, params):
            beside[i] = await engine.complete_chat(messages, params)

        async with trio.open_nursery() as nursery:  # next to a concurrent job on the other slot
            nursery.start_soon(run, 0, long, GREEDY)
            nursery.start_soon(run, 1, short, seeded)
    assert (beside[0].text, beside[0].usage) == (cold["long"].text, cold["long"].usage)
    assert (beside[1].text, beside[1].usage) == (cold["seeded"].text, cold["seeded"].usage)


# ------------------------------------------------------------------ the default number of slots

MIB = 2**20
SMOLLM_KV = 23_040  # bytes of f16 KV a token takes in SmolLM2-135M: 30 layers × 3 KV heads × (64 + 64) × 2


def machine(ram_mib: int, vram_mib: int | None = None) -> HardwareProfile:
    gpus = () if vram_mib is None else (Gpu("a GPU", 80 * 1024 * MIB, vram_mib * MIB),)
    return HardwareProfile("a CPU", 2, 64 * 1024 * MIB, ram_mib * MIB, gpus, vram_mib is not None)


def test_the_default_slots_follow_the_room_for_the_kv_cache():
    """A 2,048-token sequence of SmolLM2 takes 45 MiB of KV; half the memory beside a 100 MiB model is the budget."""
    plan = lambda profile, **kw: plan_slots(  # noqa: E731
        profile, **{"batched": True, "on_gpu": False, "n_ctx": 2048, "model_bytes": 100 * MIB,
                    "kv_bytes_per_token": SMOLLM_KV, **kw}
    )  # fmt: skip
    roomy = plan(machine(8192))
    assert roomy.slots == MAX_AUTO_SLOTS == 8 and "at most 8" in roomy.reason and "45 MiB" in roomy.reason
    assert plan(machine(300)).slots == 2  # (300 - 100) / 2 = 100 MiB: two sequences
    tight = plan(machine(150))
    assert tight.slots == 1 and "one all the same" in tight.reason
    assert plan(machine(8192), n_ctx=16384).slots == 8  # 360 MiB a sequence: 11 fit in 4 GiB
    assert plan(machine(8192), n_ctx=65536).slots == 2  # 1,440 MiB a sequence
    # offloaded: the GPU's free memory decides, not the RAM
    assert plan(machine(8192, vram_mib=300), on_gpu=True).slots == 2
    assert "GPU" in plan(machine(8192, vram_mib=300), on_gpu=True).reason
    assert plan(machine(150, vram_mib=8192), on_gpu=True).slots == 8
    # the per-slot engine splits the cores between its contexts: one unless asked
    assert plan(machine(8192), batched=False).slots == 1


@slow
async def test_a_batched_engine_without_slots_chooses_them_from_the_machine(default_model_file):
    async with open_engine(default_model_file, slots=None, n_ctx=1024, kind="batched") as engine:
        assert kv_bytes_per_token(engine._llamas[0]) == SMOLLM_KV
        plan = slot_plan(engine)
        assert engine.slots == plan.slots == engine.free_slots
        assert engine.slots >= 2, plan.reason  # any machine that runs the tests has room for two 22 MiB caches
        with trio.fail_after(60):  # every sequence serves
            results = await gather(*(lambda: engine.complete_chat(QUESTION, GREEDY) for _ in range(engine.slots)))
        assert all(r.usage.completion_tokens > 0 for r in results)
    async with open_engine(default_model_file, slots=None, n_ctx=1024, kind="contexts") as engine:
        assert engine.slots == 1
