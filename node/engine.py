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
"""

from __future__ import annotations

import codecs
import math
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
from node.errors import InvalidRequest, ModelError
from node.hardware import llama_gpu_offload, nvml_gpus, probe_hardware
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
)

_ROLES = ("system", "user", "assistant", "tool")

def validate_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content}")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InvalidRequest(f"messages[{i}] needs a string 'content'")
        if message.get("role") not in _ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(_ROLES)}")
        clean.append({"role": message["role"], "content": message["content"]})
    return clean


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


@dataclass
class _Slot:
    llama: Any  # llama_cpp.Llama
    index: int


@dataclass
class Engine:
    """A loaded model with ``slots`` independent contexts. Build it with ``open_engine``."""

    model_path: Path
    n_ctx: int
    gpu_layers: int
    threads: int
    slots: int
    chat_template: str | None
    _free_send: trio.MemorySendChannel = field(repr=False)
    _free_recv: trio.MemoryReceiveChannel = field(repr=False)
    _limiter: trio.CapacityLimiter = field(repr=False)
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
        a worker that died mid-answer): generation continues right after it.
        """
        clean = validate_messages(messages)

        def tokenize(llama: Any) -> list[int]:
            tokens = self._chat_tokens(llama, clean)
            if assistant_prefix:
                tokens += llama.tokenize(assistant_prefix.encode(), add_bos=False, special=False)
            return tokens

        return self.stream(tokenize, params)

    def stream_completion(self, prompt: str, params: SamplingParams):
        """``async with engine.stream_completion(prompt, params) as events:`` — see ``stream``."""
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest("prompt must be a non-empty string")
        return self.stream(lambda llama: self._text_tokens(llama, prompt), params)

    @asynccontextmanager
    async def stream(
        self, tokenize: Callable[[Any], list[int]], params: SamplingParams
    ) -> AsyncIterator[trio.MemoryReceiveChannel]:
        """Run one job on a free slot (waiting for one if all are busy).

        Yields a channel of events: ``Delta`` text deltas, then one ``Finished``.
        Leaving the block early cancels the job; the slot is free again when
        the block exits.

        Raises:
            InvalidRequest: bad parameters, or prompt + max_tokens over the context size.
        """
        params.validate()
        slot = await self._free_recv.receive()
        try:
            tokens = await trio.to_thread.run_sync(tokenize, slot.llama, limiter=self._limiter)
            if len(tokens) + params.max_tokens > self.n_ctx:
                raise InvalidRequest(
                    f"prompt ({len(tokens)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                    f"context size {self.n_ctx}; shorten the prompt or lower max_tokens"
                )
            send, recv = trio.open_memory_channel(math.inf)
            cancelled = threading.Event()
            async with open_service_nursery() as nursery:
                nursery.start_soon(self._run, slot, tokens, params, send, cancelled)
                try:
                    async with recv:
                        yield recv
                finally:
                    cancelled.set()
        finally:
            self._free_send.send_nowait(slot)

    async def _run(self, slot: _Slot, tokens: list[int], params: SamplingParams, send, cancelled) -> None:
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
                self._generate_blocking, slot.llama, tokens, params, emit, cancelled, limiter=self._limiter
            )

    @staticmethod
    def _generate_blocking(llama: Any, prompt: list[int], params: SamplingParams, emit, cancelled) -> None:
        import llama_cpp

        started = time.perf_counter()
        llama.set_seed(params.seed if params.seed is not None else secrets.randbits(31))
        vocab = llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        longest_stop = max((len(s) for s in params.stop), default=0)
        text, sent, produced, reported, first_token_s = "", 0, 0, 0, None
        reason = FINISH_LENGTH
        generator = llama.generate(
            prompt,
            temp=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            repeat_penalty=params.repeat_penalty,
        )
        try:
            for token in generator:
                if first_token_s is None:
                    first_token_s = time.perf_counter() - started
                if cancelled.is_set():
                    reason = FINISH_CANCELLED
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = FINISH_STOP
                    break
                produced += 1
                text += decoder.decode(llama.detokenize([token]))
                hit = _find_stop(text, params.stop, max(0, sent - longest_stop)) if params.stop else None
                if hit is not None:
                    text = text[:hit]
                    reason = FINISH_STOP
                    break
                ready = len(text) - _holdback(text, params.stop)
                if ready > sent:
                    emit(Delta(text[sent:ready], produced - reported, len(prompt)))
                    sent, reported = ready, produced
                if produced >= params.max_tokens:
                    break
        finally:
            generator.close()
        if reason == FINISH_LENGTH:
            text += decoder.decode(b"", final=True)
        if (len(text) > sent or produced > reported) and reason != FINISH_CANCELLED:
            emit(Delta(text[sent:], produced - reported, len(prompt)))
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


def _check_fits(path: Path, gpu_layers: int, slots: int, n_ctx: int) -> None:
    size = path.stat().st_size
    profile = probe_hardware()
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

    Args:
        gpu_layers: layers to offload; None means all of them when llama.cpp
            has a GPU backend and a GPU is present, else 0.

    Raises:
        ModelError: the file is not GGUF, will not fit in RAM/VRAM, or llama.cpp cannot load it.
    """
    model_path = Path(model_path)
    if slots < 1:
        raise InvalidRequest("--slots must be at least 1")
    check_gguf(model_path)
    if gpu_layers is None:
        gpu_layers = -1 if llama_gpu_offload() and nvml_gpus() else 0
    threads = threads or max(1, (probe_hardware().cpu_cores + slots - 1) // slots)
    _check_fits(model_path, gpu_layers, slots, n_ctx)

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
            _free_send=free_send,
            _free_recv=free_recv,
            _limiter=trio.CapacityLimiter(slots),
            _llamas=llamas,
        )
        yield engine
    finally:
        for llama in llamas:
            llama.close()
