"""The inference engine: llama.cpp (llama-cpp-python) driven from trio.

``open_engine`` loads a GGUF once per *slot*: each slot is its own llama
context (its own KV cache), so ``slots`` jobs run at the same time. The weights
are memory-mapped, so extra slots cost their context, not another copy of the
model. (One shared context with a queue would serialise jobs; separate
contexts let a short job finish while a long one runs.)

Generation runs in a worker thread (``trio.to_thread.run_sync`` under a
``CapacityLimiter`` of ``slots``) and streams text to trio through a memory
channel; the thread hands each event over with ``run_sync_soon`` and never
waits for trio (bench/engine.py measures no cost against llama-cpp-python). Between
two tokens the thread checks a cancel flag, so leaving the ``stream`` block,
or cancelling it, stops generation within one token and frees the slot.

Token accounting is exact: ``prompt_tokens`` is the length of the tokenized
prompt (after the chat template) and ``completion_tokens`` the number of
tokens sampled, the end-of-generation token excluded.

Logprobs (``SamplingParams.logprobs``) are read from the logits the token was
sampled from, in the generation thread, only when asked for; grammars
(``json_schema``/``grammar``) are converted and checked by llama.cpp's parser in
a thread before a slot is taken, then constrain llama.cpp's own sampler chain.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import math
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from node.concurrency import open_service_nursery
from node.errors import ContextTooLong, InvalidRequest, ModelError
from node.hardware import HardwareProfile, probe_hardware
from node.models.store import check_gguf
from node.sampling import (  # noqa: F401  (re-exported: node.engine was their home)
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    Delta,
    Finished,
    SamplingParams,
    TokenLogprob,
    Usage,
    validate_messages,
    validate_prompt,
)

# JSON Schema repetition bounds (minLength, maxItems, {m,n} in a pattern) above this
# are refused: llama-cpp-python's converter spells a bound n out n times, so one
# number could make it build gigabytes, and llama.cpp refuses over 2,000 anyway.
MAX_SCHEMA_REPEAT = 1000
MAX_COMPILED_GRAMMAR_CHARS = 1 << 20
_REPEAT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_PATTERN_BOUNDS = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def _holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    hits = [i for stop in stops if (i := text.find(stop, start)) != -1]
    return min(hits) if hits else None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def _schema_problem(schema: Any) -> str | None:
    """Why llmarket will not convert ``schema``, in a few words; None when it may.

    Two things are refused before llama-cpp-python's converter sees them: a
    repetition bound over ``MAX_SCHEMA_REPEAT`` (the converter writes a bound n
    out n times) and a ``$ref`` to anything but this document (the converter
    would fetch an ``https://`` one when Python runs with ``-O``).
    """
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in _REPEAT_KEYS and isinstance(value, (int, float)) and value > MAX_SCHEMA_REPEAT:
                    return f"{key} {value} is over {MAX_SCHEMA_REPEAT}, the most repetitions supported"
                if key == "pattern" and isinstance(value, str):
                    for match in _PATTERN_BOUNDS.finditer(value):
                        if any(n and (len(n) > 9 or int(n) > MAX_SCHEMA_REPEAT) for n in match.groups()):
                            return (
                                f"the pattern's {match.group(0)[:20]} is over {MAX_SCHEMA_REPEAT}, "
                                "the most repetitions supported"
                            )
                if key == "$ref" and not (isinstance(value, str) and value.startswith("#/")):
                    return "only local $refs (#/...) are supported"
                todo.append(value)
    return None


def _checked_grammar(vocab: Any, params: SamplingParams) -> str | None:
    """The GBNF text that constrains ``params``' output, accepted by llama.cpp's parser; None if unconstrained.

    Blocking (a schema conversion and a grammar parse): call it from a thread.
    ``vocab`` is any slot's ``llama_vocab`` (read only, so safe while that slot decodes).

    Raises:
        InvalidRequest: a schema or grammar llama.cpp cannot use, in one line.
    """
    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if params.json_schema is not None:
        what = "json_schema"
        try:
            schema = json.loads(params.json_schema)
        except (ValueError, RecursionError) as err:
            raise InvalidRequest(f"json_schema is not valid JSON: {_one_line(err)}") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("json_schema must be a JSON object (a JSON Schema)")
        if (problem := _schema_problem(schema)) is not None:
            raise InvalidRequest(f"json_schema: {problem}")
        try:
            gbnf = json_schema_to_gbnf(params.json_schema)
        except Exception as err:  # the converter raises whatever it trips on: KeyError, ValueError, TypeError, ...
            raise InvalidRequest(f"json_schema cannot be turned into a grammar: {_one_line(err)}") from None
        if len(gbnf) > MAX_COMPILED_GRAMMAR_CHARS:
            raise InvalidRequest("json_schema makes a grammar too large to use; simplify the schema")
    elif params.grammar is not None:
        what, gbnf = "grammar", params.grammar
    else:
        return None
    try:
        encoded = gbnf.encode()
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid Unicode text") from None
    if b"\x00" in encoded:
        raise InvalidRequest(f"{what} must not contain NUL characters")
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, encoded, b"root")
    if not sampler:
        raise InvalidRequest(
            f"{what}: llama.cpp cannot use this grammar (a GBNF syntax error, an undefined rule, no 'root' rule, "
            "left recursion, or too many repetitions)"
        )
    llama_cpp.llama_sampler_free(sampler)
    return gbnf


def _logprob_reader(llama: Any, k: int) -> Callable[[int], TokenLogprob]:
    """A function that describes the token just sampled by ``llama`` (before the next decode).

    It reads the raw logits the token was sampled from (the context's last
    output row) and returns the token's log-softmax and the ``k`` best
    alternatives'. Token texts are cached for the job.
    """
    import llama_cpp
    import numpy as np

    n_vocab = llama.n_vocab()
    ctx = llama.ctx
    texts: dict[int, str] = {}

    def text(token: int) -> str:
        piece = texts.get(token)
        if piece is None:
            piece = texts[token] = llama.detokenize([token], special=True).decode(errors="replace")
        return piece

    def read(token: int) -> TokenLogprob:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        peak = float(logits.max())
        # log-sum-exp; the sum is ≥ 1 (the peak's term), so log_total ≥ peak and every logprob ≤ 0
        log_total = peak + math.log(float(np.exp(logits - peak).sum(dtype=np.float64)))
        top: tuple[tuple[str, float], ...] = ()
        if k:
            best = np.argpartition(logits, n_vocab - k)[n_vocab - k :]
            best = best[np.argsort(-logits[best], kind="stable")]
            top = tuple((text(int(t)), float(logits[t]) - log_total) for t in best)
        return TokenLogprob(text(token), float(logits[token]) - log_total, top)

    return read


class _Sampler:
    """One job's sampling on one slot, built as llama-cpp-python's ``Llama.generate`` builds it.

    The chain is repeat penalty, then greedy (temperature 0) or top-k, typical
    (off), top-p, min-p, temperature and a seeded draw. A grammar is kept out of
    the chain, for two reasons:

    - llama.cpp aborts the whole process when a grammar reaches a dead end (no
      token can continue it, e.g. ``root ::= [\\x00]``): the token it is then
      forced to pick throws when accepted, through the C API. Here a pick the
      grammar forbids is an ``InvalidRequest`` instead.
    - Masking the whole vocabulary costs milliseconds per token, so (as
      llama.cpp's own server does) the chain first picks from the raw logits,
      and only when the grammar rejects that token is the vocabulary masked and
      the pick made again. Greedy picks the same token either way; a seeded
      draw keeps the masked distribution (a rejected draw is redrawn among the
      allowed tokens), up to where top-k/top-p cut it.

    Unconstrained jobs take llama.cpp's one-call path (``llama_sampler_sample``).
    """

    def __init__(self, llama: Any, params: SamplingParams, grammar: str | None, seed: int, said: list[int]) -> None:
        """``said``: tokens of answer text already produced (resuming), taken as if sampled here."""
        import llama_cpp
        import numpy as np

        self._c, self._np = llama_cpp, np
        self._ctx = llama.ctx
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._grammar = None
        add = lambda sampler: llama_cpp.llama_sampler_chain_add(self._chain, sampler)  # noqa: E731
        try:
            n_vocab = llama.n_vocab()
            add(llama_cpp.llama_sampler_init_penalties(n_vocab, llama.last_n_tokens_size, params.repeat_penalty, 0, 0))
            if params.temperature == 0:
                add(llama_cpp.llama_sampler_init_greedy())
            else:
                add(llama_cpp.llama_sampler_init_top_k(params.top_k))
                add(llama_cpp.llama_sampler_init_typical(1.0, 1))
                add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
                add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
                add(llama_cpp.llama_sampler_init_temp(params.temperature))
                add(llama_cpp.llama_sampler_init_dist(seed))
            if grammar is not None:
                self._grammar = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, grammar.encode(), b"root")
                if not self._grammar:  # checked before the job took its slot, so only if llama.cpp changed its mind
                    raise InvalidRequest("grammar: llama.cpp cannot use this grammar")
                entry = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
                self._candidates = np.zeros(n_vocab, dtype=entry)
                self._ids = np.arange(n_vocab, dtype=np.intc)
                self._array = llama_cpp.llama_token_data_array(
                    data=self._candidates.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab
                )
                self._one_entry = (llama_cpp.llama_token_data * 1)()
                self._one = llama_cpp.llama_token_data_array(data=self._one_entry, size=1)
            for token in said:
                if self._grammar is not None:
                    if not self._allows(token):
                        raise InvalidRequest("the text already said does not match the grammar")
                    llama_cpp.llama_sampler_accept(self._grammar, token)
                llama_cpp.llama_sampler_accept(self._chain, token)
        except BaseException:
            self.close()
            raise

    def sample(self) -> int:
        """The next token, from the logits of the last evaluated position; accepted into the sampler's state."""
        c = self._c
        if self._grammar is None:
            return c.llama_sampler_sample(self._chain, self._ctx, -1)
        logits = self._np.ctypeslib.as_array(c.llama_get_logits_ith(self._ctx, -1), shape=(len(self._ids),))
        token = self._pick(logits, masked=False)
        if token is None or not self._allows(token):
            token = self._pick(logits, masked=True)
            if token is None:
                raise InvalidRequest(
                    "the grammar allows no token here: it needs text this model cannot produce (e.g. a NUL character)"
                )
        c.llama_sampler_accept(self._grammar, token)
        c.llama_sampler_accept(self._chain, token)
        return token

    def _pick(self, logits: Any, *, masked: bool) -> int | None:
        """The chain's pick over the whole vocabulary (first masked by the grammar); None if it is a forbidden one."""
        candidates, array = self._candidates, self._array
        candidates["id"] = self._ids
        candidates["logit"] = logits
        candidates["p"] = 0
        array.size, array.selected, array.sorted = len(self._ids), -1, False
        if masked:
            self._c.llama_sampler_apply(self._grammar, ctypes.byref(array))
        self._c.llama_sampler_apply(self._chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            return None
        picked = array.data[array.selected]
        return None if math.isinf(picked.logit) else picked.id

    def _allows(self, token: int) -> bool:
        """Whether the grammar, in its current state, accepts ``token`` next (one candidate: microseconds)."""
        one = self._one
        one.data[0].id, one.data[0].logit, one.data[0].p = token, 0.0, 0.0
        one.size, one.selected, one.sorted = 1, -1, False
        self._c.llama_sampler_apply(self._grammar, ctypes.byref(one))
        return not math.isinf(one.data[0].logit)

    def close(self) -> None:
        for sampler in (self._chain, self._grammar):
            if sampler:
                self._c.llama_sampler_free(sampler)
        self._chain = self._grammar = None


def _cached_prefix(llama: Any, prompt: list[int], reusable: int) -> list[int]:
    """Keep what the slot's KV cache may reuse of ``prompt``; returns the tokens left to evaluate.

    Reproducible outputs: llama.cpp's float results depend on how the prompt
    was split into batches, so a reused prefix must hold exactly what a fresh
    run would have computed. A fresh run evaluates the prompt in batches of
    ``n_batch`` from position 0; only whole batches of an earlier *prompt*
    (``reusable``: never the earlier answer, evaluated one token at a time, nor
    a last partial batch) are kept, and evaluation resumes at a batch boundary.
    Every token is then computed as in a fresh run, whatever ran before.

    At least the prompt's last token is always evaluated, so sampling starts
    from fresh logits (as in ``Llama.generate``).
    """
    import numpy as np

    keep = min(llama.n_tokens, len(prompt) - 1, reusable)
    if keep > 0:
        differ = np.flatnonzero(llama.input_ids[:keep] != np.asarray(prompt[:keep], dtype=np.intc))
        keep = int(differ[0]) if differ.size else keep
    keep = keep // llama.n_batch * llama.n_batch
    if keep > 0 and llama._ctx.kv_cache_seq_rm(-1, keep, -1):
        llama.n_tokens = keep
    else:
        llama.reset()
        keep = 0
    return prompt[keep:]


@dataclass
class _Slot:
    llama: Any  # llama_cpp.Llama
    index: int
    reusable: int = 0  # leading cache tokens computed exactly as a fresh evaluation would (see _cached_prefix)


@dataclass
class Engine:
    """A loaded model with ``slots`` independent contexts. Build it with ``open_engine``."""

    model_path: Path
    n_ctx: int
    gpu_layers: int
    threads: int
    slots: int
    chat_template: str | None
    hardware: HardwareProfile  # probed once, when the engine was opened
    _free_send: trio.MemorySendChannel = field(repr=False)
    _free_recv: trio.MemoryReceiveChannel = field(repr=False)
    _limiter: trio.CapacityLimiter = field(repr=False)  # generation threads, one per slot
    _grammar_limiter: trio.CapacityLimiter = field(repr=False)  # schema/grammar checks, before a slot is taken
    _llamas: list[Any] = field(repr=False)

    @property
    def free_slots(self) -> int:
        return self._free_recv.statistics().current_buffer_used

    # ------------------------------------------------------------ prompts

    def _chat_tokens(self, llama: Any, messages: list[dict[str, str]]) -> list[int]:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self.chat_template:
            raise InvalidRequest(f"{self.model_path.name} has no chat template; send a plain prompt instead")
        special = lambda token: llama.detokenize([token], special=True).decode(errors="replace")  # noqa: E731
        formatter = Jinja2ChatFormatter(
            template=self.chat_template, eos_token=special(llama.token_eos()), bos_token=special(llama.token_bos())
        )
        formatted = formatter(messages=messages)
        return llama.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)

    @staticmethod
    def _text_tokens(llama: Any, prompt: str) -> list[int]:
        return llama.tokenize(prompt.encode(), add_bos=True, special=False)

    # ---------------------------------------------------------- streaming

    def stream_chat(self, messages: Sequence[dict[str, str]], params: SamplingParams, *, assistant_prefix: str = ""):
        """``async with engine.stream_chat(messages, params) as events:`` — see ``stream``.

        ``assistant_prefix`` is text the assistant already said in this turn (from
        a worker that died mid-answer): generation continues right after it, with
        the repeat penalty and any grammar already past it.
        """
        clean = validate_messages(messages)

        def tokenize(llama: Any) -> tuple[list[int], list[int]]:
            said = llama.tokenize(assistant_prefix.encode(), add_bos=False, special=False) if assistant_prefix else []
            return self._chat_tokens(llama, clean) + said, said

        return self.stream(tokenize, params)

    def stream_completion(self, prompt: str, params: SamplingParams, *, resume_text: str = ""):
        """``async with engine.stream_completion(prompt, params) as events:`` — see ``stream``.

        ``resume_text`` is completion text already produced (by a worker that died
        mid-answer): generation continues right after ``prompt + resume_text``,
        with the repeat penalty and any grammar already past it.
        """
        validate_prompt(prompt)

        def tokenize(llama: Any) -> tuple[list[int], list[int]]:
            said = llama.tokenize(resume_text.encode(), add_bos=False, special=False) if resume_text else []
            return self._text_tokens(llama, prompt + resume_text), said

        return self.stream(tokenize, params)

    @asynccontextmanager
    async def stream(
        self, tokenize: Callable[[Any], tuple[list[int], list[int]]], params: SamplingParams
    ) -> AsyncIterator[trio.MemoryReceiveChannel]:
        """Run one job on a free slot (waiting for one if all are busy).

        ``tokenize(llama)`` returns the prompt's tokens and the tokens of answer
        text already said at its end (resuming), which the sampler takes as its own.

        Yields a channel of events: ``Delta`` text deltas, then one ``Finished``.
        Leaving the block early cancels the job; the slot is free again when
        the block exits. With ``params.logprobs`` set, each ``Delta`` carries
        one ``TokenLogprob`` per token it counts; with ``json_schema`` or
        ``grammar``, sampling is constrained by a llama.cpp grammar.

        Raises:
            InvalidRequest: bad parameters, or a schema or grammar llama.cpp
                cannot use (checked before a slot is taken); or, mid-stream, a
                grammar that no token can continue.
            ContextTooLong: prompt + max_tokens over the context size.
        """
        params.validate()
        grammar = None
        if params.json_schema is not None or params.grammar is not None:
            vocab = self._llamas[0]._model.vocab
            grammar = await trio.to_thread.run_sync(_checked_grammar, vocab, params, limiter=self._grammar_limiter)
        slot = await self._free_recv.receive()
        try:
            tokens, said = await trio.to_thread.run_sync(tokenize, slot.llama, limiter=self._limiter)
            if not tokens:
                raise InvalidRequest("the prompt is empty once tokenized")
            if len(tokens) + params.max_tokens > self.n_ctx:
                raise ContextTooLong(
                    f"prompt ({len(tokens)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                    f"context size {self.n_ctx}; shorten the prompt or lower max_tokens"
                )
            send, recv = trio.open_memory_channel(math.inf)
            cancelled = threading.Event()
            async with open_service_nursery() as nursery:
                nursery.start_soon(self._run, slot, tokens, said, params, grammar, send, cancelled)
                try:
                    async with recv:
                        yield recv
                finally:
                    cancelled.set()
        finally:
            self._free_send.send_nowait(slot)

    async def _run(
        self,
        slot: _Slot,
        tokens: list[int],
        said: list[int],
        params: SamplingParams,
        grammar: str | None,
        send,
        cancelled,
    ) -> None:
        token = trio.lowlevel.current_trio_token()

        def deliver(event: object) -> None:  # runs in trio, in order
            try:
                send.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                cancelled.set()  # nobody is listening any more

        def emit(event: object) -> None:  # called from the generation thread; never blocks it
            token.run_sync_soon(deliver, event)

        # run_sync_soon callbacks run in order, and to_thread reports the
        # thread's return through the same queue, so every event has been
        # delivered by the time the channel closes.
        async with send:
            await trio.to_thread.run_sync(
                self._generate_blocking,
                slot,
                tokens,
                said,
                params,
                grammar,
                emit,
                cancelled,
                limiter=self._limiter,
            )

    @staticmethod
    def _generate_blocking(
        slot: _Slot, prompt: list[int], said: list[int], params: SamplingParams, grammar: str | None, emit, cancelled
    ) -> None:
        import llama_cpp

        llama = slot.llama
        started = time.perf_counter()
        vocab = llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        longest_stop = max((len(s) for s in params.stop), default=0)
        describe = _logprob_reader(llama, params.logprobs) if params.logprobs is not None else None
        logprobs: list[TokenLogprob] = []  # of the tokens produced but not yet reported
        text, sent, produced, reported, first_token_s = "", 0, 0, 0, None
        reason = FINISH_LENGTH

        def delta(chunk: str) -> Delta:
            nonlocal reported
            event = Delta(chunk, produced - reported, len(prompt), tuple(logprobs))
            reported = produced
            logprobs.clear()
            return event

        seed = params.seed if params.seed is not None else secrets.randbits(31)
        sampler = _Sampler(llama, params, grammar, seed, said)
        try:
            pending = _cached_prefix(llama, prompt, slot.reusable)
            slot.reusable = 0  # until the prompt is in the cache
            llama.eval(pending)
            slot.reusable = len(prompt) // llama.n_batch * llama.n_batch
            while True:
                if produced:
                    llama.eval(pending)
                token = sampler.sample()  # the context still holds the logits it was sampled from
                if first_token_s is None:
                    first_token_s = time.perf_counter() - started
                if cancelled.is_set():
                    reason = FINISH_CANCELLED
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = FINISH_STOP
                    break
                produced += 1
                if describe is not None:
                    logprobs.append(describe(token))
                text += decoder.decode(llama.detokenize([token]))
                hit = _find_stop(text, params.stop, max(0, sent - longest_stop)) if params.stop else None
                if hit is not None:
                    text = text[:hit]
                    reason = FINISH_STOP
                    break
                ready = len(text) - _holdback(text, params.stop)
                if ready > sent:
                    emit(delta(text[sent:ready]))
                    sent = ready
                if produced >= params.max_tokens:
                    break
                pending = [token]
        finally:
            sampler.close()
        if reason == FINISH_LENGTH:
            text += decoder.decode(b"", final=True)
        if (len(text) > sent or produced > reported) and reason != FINISH_CANCELLED:
            emit(delta(text[sent:]))
        usage = Usage(prompt_tokens=len(prompt), completion_tokens=produced)
        emit(Finished(text, usage, reason, first_token_s, time.perf_counter() - started))

    # ---------------------------------------------------------- helpers

    async def complete_chat(self, messages: Sequence[dict[str, str]], params: SamplingParams) -> Finished:
        """Run a chat job to the end and return its ``Finished`` event."""
        async with self.stream_chat(messages, params) as events:
            async for event in events:
                if isinstance(event, Finished):
                    return event
        raise AssertionError("stream ended without a Finished event")


def _check_fits(path: Path, gpu_layers: int, slots: int, n_ctx: int, profile: HardwareProfile) -> None:
    size = path.stat().st_size
    # A rough context cost: KV cache + compute buffers, per slot. Enough to refuse the hopeless cases.
    context_cost = slots * n_ctx * 64 * 1024
    if gpu_layers != 0 and profile.gpus:
        free = max(g.vram_free for g in profile.gpus)
        if size > free:
            raise ModelError(
                f"{path.name} ({size / 2**30:.1f} GiB) does not fit in the GPU's free memory "
                f"({free / 2**30:.1f} GiB); offload fewer layers with --gpu-layers N"
            )
        return
    if profile.ram_available and size + context_cost > profile.ram_available:
        raise ModelError(
            f"{path.name} ({size / 2**30:.1f} GiB) plus {slots} context(s) of {n_ctx} tokens does not fit in the "
            f"{profile.ram_available / 2**30:.1f} GiB of free RAM; "
            "use a smaller model, fewer --slots or a smaller --ctx-size"
        )


def _plan(
    model_path: Path, slots: int, n_ctx: int, threads: int | None, gpu_layers: int | None
) -> tuple[HardwareProfile, int, int]:
    """Check the file and the machine, once: (hardware profile, gpu_layers, threads). Blocking (NVML, files)."""
    check_gguf(model_path)
    profile = probe_hardware()
    if gpu_layers is None:
        gpu_layers = -1 if profile.gpu_offload and profile.gpus else 0
    threads = threads or max(1, (profile.cpu_cores + slots - 1) // slots)
    _check_fits(model_path, gpu_layers, slots, n_ctx, profile)
    return profile, gpu_layers, threads


@asynccontextmanager
async def open_engine(
    model_path: Path,
    *,
    slots: int = 1,
    n_ctx: int = 2048,
    threads: int | None = None,
    gpu_layers: int | None = None,
) -> AsyncIterator[Engine]:
    """Load ``model_path`` into ``slots`` contexts; unload on exit.

    The hardware is probed once, in a thread (NVML and the file checks block),
    and kept as ``engine.hardware``.

    Args:
        gpu_layers: layers to offload; None means all of them when llama.cpp
            has a GPU backend and a GPU is present, else 0.

    Raises:
        ModelError: the file is not GGUF, will not fit in RAM/VRAM, or llama.cpp cannot load it.
    """
    model_path = Path(model_path)
    if slots < 1:
        raise InvalidRequest("--slots must be at least 1")
    profile, gpu_layers, threads = await trio.to_thread.run_sync(_plan, model_path, slots, n_ctx, threads, gpu_layers)

    def load() -> Any:
        from llama_cpp import Llama

        try:
            return Llama(
                str(model_path), n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers, verbose=False, seed=0
            )
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"llama.cpp could not load {model_path}: {err}") from None

    llamas = []
    try:
        for _ in range(slots):
            llamas.append(await trio.to_thread.run_sync(load))
        free_send, free_recv = trio.open_memory_channel(slots)
        for index, llama in enumerate(llamas):
            free_send.send_nowait(_Slot(llama, index))
        engine = Engine(
            model_path=model_path,
            n_ctx=n_ctx,
            gpu_layers=gpu_layers,
            threads=threads,
            slots=slots,
            chat_template=llamas[0].metadata.get("tokenizer.chat_template"),
            hardware=profile,
            _free_send=free_send,
            _free_recv=free_recv,
            _limiter=trio.CapacityLimiter(slots),
            _grammar_limiter=trio.CapacityLimiter(1),
            _llamas=llamas,
        )
        yield engine
    finally:
        for llama in llamas:
            llama.close()
