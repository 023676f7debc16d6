"""``Engine``: what both engines are to their callers, built on the shared leaves.

A loaded model with ``slots`` places for jobs: prompts tokenized (chat template or
plain text), grammars checked before a slot is taken, ``stream`` handing a job's
events to trio, ``observe`` running the verification pass (node/inference/observe.py).
How a job is generated is each engine's own: ``ContextsEngine`` (node/inference/contexts.py)
gives each slot a llama.cpp context, ``BatchedEngine`` (node/inference/batched.py) makes
slots sequences of one context. ``open_engine`` (node/inference/engine.py) builds either.
"""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from node.concurrency import open_service_nursery
from node.errors import ContextTooLong, InvalidRequest
from node.inference.fingerprints import Observations, unpack
from node.inference.grammar import checked_grammar
from node.inference.hardware import HardwareProfile
from node.inference.numerics import CPU_CLAIM
from node.inference.observe import observe_answer
from node.inference.prompt import chat_prompt, chat_tokens, completion_prompt, text_tokens
from node.inference.sampling import Finished, SamplingParams, validate_messages, validate_prompt
from node.inference.slot import Slot


@dataclass
class Engine:
    """A loaded model with ``slots`` places for jobs (see the module docstring). Build it with ``open_engine``."""

    model_path: Path
    n_ctx: int
    gpu_layers: int
    threads: int
    slots: int
    chat_template: str | None
    hardware: HardwareProfile  # probed once, when the engine was opened
    fingerprints: bool  # record per-token fingerprints (node/inference/fingerprints.py); off only to measure their cost
    batch_numerics: str  # the class its verification pass reproduces (``probe_numerics``), whatever its threads
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
        """What receipts claim: the class of machines whose batched pass gives these very logits; else "cpu" on
        CPUs (a verifier checks it in its cpu noise class, node/verify/judge.py), "" with GPU offload (the
        widest class).

        With more than one thread, ggml splits a single token's attention over the KV cells among the threads
        once the cache view reaches 512 cells (ggml-cpu ops.cpp, ``use_split_kv_path``): the partial sums are
        reduced in another order than a batched pass computes them, and logits move by up to ~0.5. So a
        per-slot engine's answers are claimed exact only with one thread; the batched engine avoids the split
        (node/inference/batched.py) and is exact at any thread count (docs/verification.md).
        """
        return self._claim(self.batch_numerics if self.threads == 1 else "")

    def _claim(self, exact: str) -> str:
        return exact or (CPU_CLAIM if self.gpu_layers == 0 else "")

    @property
    def reproducible(self) -> bool:
        """Whether the same request gives byte-identical tokens whatever ran before: true on CPUs, where the
        cache is reused only in whole batches and the kernels are deterministic (docs/verification.md); not
        claimed with GPU offload, where it has not been measured."""
        return self.gpu_layers == 0

    # ------------------------------------------------------------ prompts

    def _chat_tokens(self, llama: Any, messages: list[dict[str, str]]) -> list[int]:
        if not self.chat_template:
            raise InvalidRequest(f"{self.model_path.name} has no chat template; send a plain prompt instead")
        return chat_tokens(llama, self.chat_template, messages)

    @staticmethod
    def _text_tokens(llama: Any, prompt: str) -> list[int]:
        return text_tokens(llama, prompt)

    def _chat_prompt(
        self, messages: list[dict[str, str]], assistant_prefix: str
    ) -> Callable[[Any], tuple[list[int], list[int]]]:
        """``tokenize`` for ``stream``/``observe``: a chat as node/inference/prompt.py tokenizes it."""

        def tokenize(llama: Any) -> tuple[list[int], list[int]]:
            if not self.chat_template:
                raise InvalidRequest(f"{self.model_path.name} has no chat template; send a plain prompt instead")
            return chat_prompt(llama, self.chat_template, messages, assistant_prefix)

        return tokenize

    # ---------------------------------------------------------- streaming

    def stream_chat(self, messages: Sequence[dict[str, str]], params: SamplingParams, *, assistant_prefix: str = ""):
        """``async with engine.stream_chat(messages, params) as events:`` — see ``stream``.

        ``assistant_prefix`` is text the assistant already said in this turn (from
        a worker that died mid-answer): generation continues right after it, with
        the repeat penalty and any grammar already past it.
        """
        return self.stream(self._chat_prompt(validate_messages(messages), assistant_prefix), params)

    def stream_completion(self, prompt: str, params: SamplingParams, *, resume_text: str = ""):
        """``async with engine.stream_completion(prompt, params) as events:`` — see ``stream``.

        ``resume_text`` is completion text already produced (by a worker that died
        mid-answer): generation continues right after ``prompt + resume_text``,
        with the repeat penalty and any grammar already past it.
        """
        validate_prompt(prompt)
        return self.stream(lambda llama: completion_prompt(llama, prompt, resume_text), params)

    async def _grammar(self, params: SamplingParams) -> str | None:
        """The checked GBNF that constrains ``params``' output, or None (in a thread, before a slot is taken)."""
        if params.json_schema is None and params.grammar is None:
            return None
        vocab = self._llamas[0]._model.vocab
        return await trio.to_thread.run_sync(checked_grammar, vocab, params, limiter=self._grammar_limiter)

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
        slot: Slot,
        tokens: list[int],
        said: list[int],
        params: SamplingParams,
        grammar: str | None,
        send: trio.MemorySendChannel,
        cancelled: threading.Event,
        record: bool,
    ) -> None:
        """Generate one job on ``slot`` (``tokens``: its prompt), sending its events on ``send``, which it closes
        once every event is delivered; stop within a token of ``cancelled`` being set. Each engine's own."""
        raise NotImplementedError

    # ------------------------------------------------------ verification

    def observe_chat(
        self, messages: Sequence[dict[str, str]], params: SamplingParams, fingerprints: bytes, *, assistant_prefix=""
    ):
        """``observe`` for a chat job, as ``stream_chat`` ran it (an awaitable)."""
        return self.observe(self._chat_prompt(validate_messages(messages), assistant_prefix), params, fingerprints)

    def observe_completion(self, prompt: str, params: SamplingParams, fingerprints: bytes, *, resume_text: str = ""):
        """``observe`` for a plain completion, as ``stream_completion`` ran it (an awaitable)."""
        validate_prompt(prompt)
        return self.observe(lambda llama: completion_prompt(llama, prompt, resume_text), params, fingerprints)

    async def observe(
        self, tokenize: Callable[[Any], tuple[list[int], list[int]]], params: SamplingParams, fingerprints: bytes
    ) -> Observations:
        """Re-run an answer for verification: one batched prefill over prompt + answer on a free slot.

        ``tokenize`` is as in ``stream``; ``fingerprints`` are the worker's
        records (node/inference/fingerprints.py), whose tokens are the answer. The prompt
        is evaluated exactly as a generating slot evaluates it, so the first
        position's logits are the worker's own; the answer's tokens then go in
        batches of ``PROBE_TOKENS`` with logits at every position. At each position
        the job's sampler chain (same parameters, same seed) is replayed on
        these logits (``Sampler.replay``). node/verify/judge.py judges the result.

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
            return await self._blocking(observe_answer, slot, tokenize, params, grammar, records, self.n_ctx)
        finally:
            self._free_send.send_nowait(slot)

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, which computes with llama.cpp, off the trio thread where this engine computes."""
        raise NotImplementedError

    # ---------------------------------------------------------- helpers

    async def complete_chat(self, messages: Sequence[dict[str, str]], params: SamplingParams) -> Finished:
        """Run a chat job to the end and return its ``Finished`` event."""
        async with self.stream_chat(messages, params) as events:
            async for event in events:
                if isinstance(event, Finished):
                    return event
        raise AssertionError("stream ended without a Finished event")
