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
from node.errors import ContextTooLong, InvalidRequest, ModelError, one_line
from node.inference.fingerprints import Observations, Recorder, unpack
from node.inference.hardware import HardwareProfile, probe_hardware
from node.models.store import check_gguf
from node.inference.sampling import (  # noqa: F401  (re-exported: node.inference.engine was their home)
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
            raise InvalidRequest(f"json_schema is not valid JSON: {one_line(err)}") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("json_schema must be a JSON object (a JSON Schema)")
        if (problem := _schema_problem(schema)) is not None:
            raise InvalidRequest(f"json_schema: {problem}")
        try:
            gbnf = json_schema_to_gbnf(params.json_schema)
        except Exception as err:  # the converter raises whatever it trips on: KeyError, ValueError, TypeError, ...
            raise InvalidRequest(f"json_schema cannot be turned into a grammar: {one_line(err)}") from None
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


def _logprob_reader(llama: Any, k: int, ctx: Any = None) -> Callable[..., TokenLogprob]:
    """A function that describes the token just sampled by ``llama`` (before the next decode).

    It reads the raw logits the token was sampled from (the context's last
    output row, or the batch row it is given) and returns the token's
    log-softmax and the ``k`` best alternatives'. Token texts are cached for
    the job. ``ctx``: the context sampled from (default: ``llama``'s own).
    """
    import llama_cpp
    import numpy as np

    n_vocab = llama.n_vocab()
    ctx = ctx or llama.ctx
    texts: dict[int, str] = {}

    def text(token: int) -> str:
        piece = texts.get(token)
        if piece is None:
            piece = texts[token] = llama.detokenize([token], special=True).decode(errors="replace")
        return piece

    def read(token: int, row: int = -1) -> TokenLogprob:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
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

    def __init__(
        self, llama: Any, params: SamplingParams, grammar: str | None, seed: int, said: list[int], *, ctx: Any = None
    ) -> None:
        """``said``: tokens of answer text already produced (resuming), taken as if sampled here. ``ctx``: the
        context whose logits it samples from (default: ``llama``'s own)."""
        import llama_cpp
        import numpy as np

        self._c, self._np = llama_cpp, np
        self._ctx = ctx or llama.ctx
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
            self._n_vocab = n_vocab
            self._greedy = params.temperature == 0
            if grammar is not None:
                self._grammar = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, grammar.encode(), b"root")
                if not self._grammar:  # checked before the job took its slot, so only if llama.cpp changed its mind
                    raise InvalidRequest("grammar: llama.cpp cannot use this grammar")
                self._make_candidates()
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

    def _make_candidates(self) -> None:
        c, np = self._c, self._np
        entry = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        self._candidates = np.zeros(self._n_vocab, dtype=entry)
        self._ids = np.arange(self._n_vocab, dtype=np.intc)
        self._array = c.llama_token_data_array(data=self._candidates.ctypes.data_as(c.llama_token_data_p), size=0)

    def replay(self, logits: Any, token: int) -> tuple[int, bool, float, float, float, float, float, bool]:
        """Verification: what this chain picks from ``logits`` (another run's raw logits for this position),
        and how ``token`` (the pick being checked) stands in the chain's final candidates; then ``token`` is
        accepted, as ``sample`` would have accepted its own pick.

        The seeded draw advances exactly as it did in ``sample`` (one draw per chain pass, two when a
        grammar masks), so with the same seed and the same logits the pick is the same token.

        Returns (pick, allowed, gap, between, p, entropy, spread, accepted):

        - ``allowed``: ``token`` is among the chain's final candidates (and the grammar allows it);
        - ``gap``: the pick's logit minus ``token``'s, after the chain's transforms (penalty, temperature);
        - ``between``: the probability strictly between them in the draw's order;
        - ``p``: ``token``'s own probability there (0 if it is not a candidate);
        - ``entropy``, ``spread``: the final distribution's entropy and a draw's surprisal variance
          (0 for greedy);
        - ``accepted``: False when the grammar forbids ``token``, which is then not accepted (llama.cpp
          would abort): replay must stop.
        """
        if not hasattr(self, "_candidates"):
            self._make_candidates()
        pick = self._pick(logits, masked=False)
        if self._grammar is not None and (pick is None or not self._allows(pick)):
            pick = self._pick(logits, masked=True)
        array, np = self._array, self._np
        base = ctypes.cast(array.data, ctypes.c_void_p).value
        if base == self._candidates.ctypes.data:
            final = self._candidates[: array.size]
        else:  # a sampler moved the candidates (llama.cpp may): read them where they are
            raw = (self._c.llama_token_data * array.size).from_address(base)
            final = np.frombuffer(raw, dtype=self._candidates.dtype)
        ids = final["id"]
        where = np.flatnonzero(ids == token)
        grammar_ok = self._grammar is None or self._allows(token)
        allowed = bool(where.size) and grammar_ok and not math.isinf(final["logit"][where[0]])
        if pick is None or not allowed:
            gap = between = math.inf
            p = 0.0
        else:
            at, picked = int(where[0]), int(np.flatnonzero(ids == pick)[0])
            gap = float(final["logit"][picked] - final["logit"][at])
            lo, hi = sorted((at, picked))
            between = float(final["p"][lo + 1 : hi].sum()) if hi - lo > 1 else 0.0
            p = float(final["p"][at])
        entropy = spread = 0.0
        probs = final["p"].astype(np.float64)
        if not self._greedy and probs.size:
            probs = probs[probs > 0]
            surprise = -np.log(probs)
            entropy = float((probs * surprise).sum())
            spread = float((probs * surprise**2).sum() - entropy**2)
        if grammar_ok:
            if self._grammar is not None:
                self._c.llama_sampler_accept(self._grammar, token)
            self._c.llama_sampler_accept(self._chain, token)
        return (-1 if pick is None else pick), allowed, gap, between, p, entropy, spread, grammar_ok

    def sample(self, row: int = -1) -> int:
        """The next token, from the logits of batch row ``row`` (default: the last evaluated position); accepted
        into the sampler's state."""
        c = self._c
        if self._grammar is None:
            return c.llama_sampler_sample(self._chain, self._ctx, row)
        logits = self._np.ctypeslib.as_array(c.llama_get_logits_ith(self._ctx, row), shape=(len(self._ids),))
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
    fingerprints: bool  # record per-token fingerprints (node/fingerprints.py); off only to measure their cost
    batch_numerics: str  # the class this engine's verification pass reproduces (``_numerics``), whatever its threads
    _free_send: trio.MemorySendChannel = field(repr=False)
    _free_recv: trio.MemoryReceiveChannel = field(repr=False)
    _limiter: trio.CapacityLimiter = field(repr=False)  # generation threads, one per slot
    _grammar_limiter: trio.CapacityLimiter = field(repr=False)  # schema/grammar checks, before a slot is taken
    _llamas: list[Any] = field(repr=False)

    @property
    def free_slots(self) -> int:
        return self._free_recv.statistics().current_buffer_used

    @property
    def numerics(self) -> str:
        """What receipts claim: "" or the class of machines whose batched pass gives these very logits.

        With more than one thread, ggml splits a single token's attention over the KV cells among the threads
        once the cache view reaches 512 cells (ggml-cpu ops.cpp, ``use_split_kv_path``): the partial sums are
        reduced in another order than a batched pass computes them, and logits move by up to ~0.5. Only a
        one-thread decoder's answers are therefore claimed exact (docs/verification.md).
        """
        return self.batch_numerics if self.threads == 1 else ""

    @property
    def reproducible(self) -> bool:
        """Whether the same request gives byte-identical tokens whatever ran before: true on CPUs, where the
        cache is reused only in whole batches and the kernels are deterministic (docs/verification.md); not
        claimed with GPU offload, where it has not been measured."""
        return self.gpu_layers == 0

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

    async def _grammar(self, params: SamplingParams) -> str | None:
        """The checked GBNF that constrains ``params``' output, or None (in a thread, before a slot is taken)."""
        if params.json_schema is None and params.grammar is None:
            return None
        vocab = self._llamas[0]._model.vocab
        return await trio.to_thread.run_sync(_checked_grammar, vocab, params, limiter=self._grammar_limiter)

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
        grammar = await self._grammar(params)
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
                nursery.start_soon(self._run, slot, tokens, said, params, grammar, send, cancelled, self.fingerprints)
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
        record: bool,
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
                record,
                limiter=self._limiter,
            )

    @staticmethod
    def _generate_blocking(
        slot: _Slot,
        prompt: list[int],
        said: list[int],
        params: SamplingParams,
        grammar: str | None,
        emit,
        cancelled,
        record: bool = True,
    ) -> None:
        import llama_cpp
        import numpy as np

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
        recorder = Recorder()
        n_vocab = llama.n_vocab()
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
                if record:
                    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, -1), shape=(n_vocab,))
                    recorder.add(logits, token)
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
        emit(Finished(text, usage, reason, first_token_s, time.perf_counter() - started, recorder.packed()))

    # ------------------------------------------------------ verification

    def observe_chat(
        self, messages: Sequence[dict[str, str]], params: SamplingParams, fingerprints: bytes, *, assistant_prefix=""
    ):
        """``observe`` for a chat job, as ``stream_chat`` ran it (an awaitable)."""
        clean = validate_messages(messages)

        def tokenize(llama: Any) -> tuple[list[int], list[int]]:
            said = llama.tokenize(assistant_prefix.encode(), add_bos=False, special=False) if assistant_prefix else []
            return self._chat_tokens(llama, clean) + said, said

        return self.observe(tokenize, params, fingerprints)

    def observe_completion(self, prompt: str, params: SamplingParams, fingerprints: bytes, *, resume_text: str = ""):
        """``observe`` for a plain completion, as ``stream_completion`` ran it (an awaitable)."""
        validate_prompt(prompt)

        def tokenize(llama: Any) -> tuple[list[int], list[int]]:
            said = llama.tokenize(resume_text.encode(), add_bos=False, special=False) if resume_text else []
            return self._text_tokens(llama, prompt + resume_text), said

        return self.observe(tokenize, params, fingerprints)

    async def observe(
        self, tokenize: Callable[[Any], tuple[list[int], list[int]]], params: SamplingParams, fingerprints: bytes
    ) -> Observations:
        """Re-run an answer for verification: one batched prefill over prompt + answer on a free slot.

        ``tokenize`` is as in ``stream``; ``fingerprints`` are the worker's
        records (node/fingerprints.py), whose tokens are the answer. The prompt
        is evaluated exactly as a generating slot evaluates it, so the first
        position's logits are the worker's own; the answer's tokens then go in
        batches of ``n_batch`` with logits at every position. At each position
        the job's sampler chain (same parameters, same seed) is replayed on
        these logits (``_Sampler.replay``). node/verify.py judges the result.

        Raises:
            InvalidRequest: bad parameters or records; ContextTooLong: it does not fit.
        """
        params.validate()
        try:
            records = unpack(fingerprints)
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
        if not len(records):
            raise InvalidRequest("there are no fingerprints to check")
        grammar = await self._grammar(params)
        slot = await self._free_recv.receive()
        try:
            return await self._blocking(self._observe_blocking, slot, tokenize, params, grammar, records, self.n_ctx)
        finally:
            self._free_send.send_nowait(slot)

    async def _blocking(self, fn, *args):
        """``fn(*args)``, which computes with llama.cpp, in a worker thread (one per slot at a time)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    @staticmethod
    def _observe_blocking(
        slot: _Slot, tokenize, params: SamplingParams, grammar: str | None, records: Any, n_ctx: int
    ) -> Observations:
        import llama_cpp
        import numpy as np

        llama = slot.llama
        prompt, said = tokenize(llama)
        n = len(records)
        if not prompt:
            raise InvalidRequest("the prompt is empty once tokenized")
        if len(prompt) + n > n_ctx:
            raise ContextTooLong(f"prompt ({len(prompt)}) + answer ({n} tokens) exceeds the context size {n_ctx}")
        n_vocab = llama.n_vocab()
        columns = {name: np.zeros(n, dtype=np.float32) for name in ("top", "at_top1", "at_top2", "at_token")}
        columns.update(gap=np.full(n, np.inf), between=np.full(n, np.inf), p=np.zeros(n))
        columns.update(entropy=np.zeros(n), spread=np.zeros(n))
        pick, allowed = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
        seeded = params.seed is not None or params.temperature == 0
        sampler = _Sampler(llama, params, grammar, params.seed if seeded else secrets.randbits(31), said)
        replayed, broken = 0, ""

        def visit(i: int, row: Any) -> bool:
            nonlocal replayed, broken
            ids = (int(records.tokens[i]), int(records.top1[i]), int(records.top2[i]))
            if max(ids) >= n_vocab:
                broken = f"token {i} names id {max(ids)}, outside the vocabulary of {n_vocab}"
                return False
            columns["top"][i] = row.max()
            for name, token in zip(("at_token", "at_top1", "at_top2"), ids, strict=True):
                columns[name][i] = row[token]
            (pick[i], allowed[i], *measures, accepted) = sampler.replay(row, ids[0])
            for name, value in zip(("gap", "between", "p", "entropy", "spread"), measures, strict=True):
                columns[name][i] = value
            replayed = i + 1
            if not accepted:
                broken = f"token {i} is not allowed by the grammar"
            return accepted

        # A single-token decode (a prompt's or an answer's last batch may hold one token) runs on one thread,
        # as a worker that claims exact numerics decodes: ggml splits one token's attention among threads.
        llama._ctx.set_n_threads(1, llama.n_threads_batch)
        try:
            pending = _cached_prefix(llama, prompt, slot.reusable)
            slot.reusable = 0
            llama.eval(pending)
            slot.reusable = len(prompt) // llama.n_batch * llama.n_batch
            row = lambda j: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, j), shape=(n_vocab,))  # noqa: E731
            going = visit(0, row(-1))  # the prompt's last position: exactly the worker's first logits
            answer = [int(t) for t in records.tokens[: n - 1]]
            for start in range(0, len(answer), PROBE_TOKENS):  # the batch shapes _numerics probed
                if not going:
                    break
                batch = answer[start : start + PROBE_TOKENS]
                llama._ctx.kv_cache_seq_rm(-1, llama.n_tokens, -1)
                llama._batch.set_batch(batch=batch, n_past=llama.n_tokens, logits_all=True)
                llama._ctx.decode(llama._batch)
                llama.input_ids[llama.n_tokens : llama.n_tokens + len(batch)] = batch
                llama.n_tokens += len(batch)
                for j in range(len(batch)):
                    if not visit(start + j + 1, row(j)):
                        going = False
                        break
        finally:
            sampler.close()
            llama._ctx.set_n_threads(llama.n_threads, llama.n_threads_batch)
        eog = bool(llama_cpp.llama_vocab_is_eog(llama._model.vocab, int(records.tokens[-1])))
        answer = [int(t) for t in records.tokens[: n - 1 if eog else n] if 0 <= t < n_vocab]
        text = b"".join(llama.detokenize([t]) for t in answer).decode(errors="replace")  # as the worker builds it
        return Observations(
            replayed=replayed,
            broken=broken,
            prompt_tokens=len(prompt),
            pick=pick,
            allowed=allowed,
            seeded=seeded,
            text=text,
            ends_on_eog=eog,
            **columns,
        )

    # ---------------------------------------------------------- helpers

    async def complete_chat(self, messages: Sequence[dict[str, str]], params: SamplingParams) -> Finished:
        """Run a chat job to the end and return its ``Finished`` event."""
        async with self.stream_chat(messages, params) as events:
            async for event in events:
                if isinstance(event, Finished):
                    return event
        raise AssertionError("stream ended without a Finished event")


PROBE_TOKENS = 48  # over 32, where llama.cpp's CPU matrix kernels may switch to a batched path; also the
# size of the batches in which ``observe`` evaluates an answer, so that the probe covers what it runs


def _numerics(llama: Any, gpu_layers: int) -> str:
    """The class of machines on which this model's logits are bit-identical batched or token by token, or "".

    A CPU engine probes it: ``PROBE_TOKENS`` positions decoded one at a time, then in batches of that size
    and of 7 (``observe`` checks an answer in batches of at most ``PROBE_TOKENS``). When every
    logit matches, a verifier with the same string (the same llama.cpp build and CPU features, which the
    string hashes) is expected to see exactly the worker's logits (node/verify.py: the exact regime). A model
    whose kernels take another path for batches (K-quants, measured), or a GPU, gives "". Blocking: ~0.5 s.
    """
    import hashlib

    import llama_cpp
    import numpy as np

    if gpu_layers != 0:
        return ""
    n_vocab = llama.n_vocab()
    text = b"The harbour master counted boats at dawn, and wrote each one down in a ledger. " * 4
    tokens = llama.tokenize(text, add_bos=True)[: PROBE_TOKENS + 1]

    def row(j: int) -> Any:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, j), shape=(n_vocab,)).copy()

    try:
        llama.reset()
        singly = []
        for token in tokens[:-1]:
            llama.eval([token])
            singly.append(row(-1))
        same = True
        for size in (len(singly), 7):  # a full verification batch, and a short last one
            llama.reset()
            llama._ctx.kv_cache_seq_rm(-1, 0, -1)
            llama._batch.set_batch(batch=tokens[:size], n_past=0, logits_all=True)
            llama._ctx.decode(llama._batch)
            same = same and all(np.array_equal(singly[j], row(j)) for j in range(size))
    finally:
        llama.reset()
        llama._ctx.kv_cache_seq_rm(-1, 0, -1)
    if not same:
        return ""
    build = llama_cpp.llama_print_system_info() + llama_cpp.__version__.encode()
    return hashlib.sha256(build).hexdigest()[:16]


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
    model_path: Path, slots: int, n_ctx: int, threads: int | None, gpu_layers: int | None, shared: bool = False
) -> tuple[HardwareProfile, int, int]:
    """Check the file and the machine, once: (hardware profile, gpu_layers, threads). Blocking (NVML, files).
    ``shared``: the slots share one context (batched), which gets every core; else each slot gets its share."""
    check_gguf(model_path)
    profile = probe_hardware()
    if gpu_layers is None:
        gpu_layers = -1 if profile.gpu_offload and profile.gpus else 0
    threads = threads or (profile.cpu_cores if shared else max(1, (profile.cpu_cores + slots - 1) // slots))
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
    fingerprints: bool = True,
    kind: str = "contexts",
    reuse_prefixes: bool = True,
) -> AsyncIterator[Engine]:
    """Load ``model_path`` into ``slots`` contexts (``kind="contexts"``), or into one context that decodes
    ``slots`` sequences together (``kind="batched"``: node/batched.py); unload on exit.

    The hardware is probed once, in a thread (NVML and the file checks block),
    and kept as ``engine.hardware``.

    Args:
        gpu_layers: layers to offload; None means all of them when llama.cpp
            has a GPU backend and a GPU is present, else 0.
        reuse_prefixes: batched only: a prompt's prefix already in a sequence's
            cache is not computed again (``_Scheduler._place``); off for benchmarks.

    Raises:
        ModelError: the file is not GGUF, will not fit in RAM/VRAM, or llama.cpp cannot load it.
    """
    model_path = Path(model_path)
    if slots < 1:
        raise InvalidRequest("--slots must be at least 1")
    if kind not in ("contexts", "batched"):
        raise InvalidRequest(f"unknown engine {kind!r}: use batched or contexts")
    batched = kind == "batched"
    profile, gpu_layers, threads = await trio.to_thread.run_sync(
        _plan, model_path, slots, n_ctx, threads, gpu_layers, batched
    )

    def load() -> Any:
        from llama_cpp import Llama

        try:
            # Flash attention computes each position's attention on its own, so a position's logits do not
            # depend on what else was in its batch (on CPUs, for most quantizations: docs/verification.md):
            # a verifier's batched pass then sees exactly the logits the worker sampled from, token by token.
            return Llama(
                str(model_path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_gpu_layers=gpu_layers,
                flash_attn=True,
                verbose=False,
                seed=0,
            )
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"llama.cpp could not load {model_path}: {err}") from None

    llamas: list[Any] = []
    scheduler = ctx = None
    compute = trio.to_thread.run_sync  # blocking llama.cpp work, in a worker thread
    if batched:  # all of it on the scheduler's one thread (node/batched.py: OpenMP teams belong to a thread)
        from node.inference.batched import BatchedEngine, _Scheduler, batched_context

        scheduler = _Scheduler(512, reuse_prefixes=reuse_prefixes)
        scheduler.start()

        async def compute(fn, *args):
            return await trio.to_thread.run_sync(scheduler.call, lambda: fn(*args))

    try:
        for _ in range(1 if batched else slots):
            llamas.append(await compute(load))
        batch_numerics = await compute(_numerics, llamas[0], gpu_layers)
        free_send, free_recv = trio.open_memory_channel(slots)
        for index in range(slots):  # batched: every slot is a sequence of the one context, tokenized with llamas[0]
            free_send.send_nowait(_Slot(llamas[0 if batched else index], index))
        extra: dict[str, Any] = {}
        if batched:
            ctx = await compute(lambda: batched_context(llamas[0], slots=slots, n_ctx=n_ctx, threads=threads))
            scheduler.attach(llamas[0], ctx, slots)
            extra["_scheduler"] = scheduler
        engine = (BatchedEngine if batched else Engine)(
            model_path=model_path,
            n_ctx=n_ctx,
            gpu_layers=gpu_layers,
            threads=threads,
            slots=slots,
            chat_template=llamas[0].metadata.get("tokenizer.chat_template"),
            hardware=profile,
            fingerprints=fingerprints,
            batch_numerics=batch_numerics,
            _free_send=free_send,
            _free_recv=free_recv,
            _limiter=trio.CapacityLimiter(slots),
            _grammar_limiter=trio.CapacityLimiter(1),
            _llamas=llamas,
            **extra,
        )
        yield engine
    finally:
        if scheduler is not None:
            await trio.to_thread.run_sync(scheduler.stop)
        if ctx is not None:
            import llama_cpp

            llama_cpp.llama_free(ctx)
        for llama in llamas:
            llama.close()
