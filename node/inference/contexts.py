"""The per-slot engine (``kind="contexts"``): each slot is a llama.cpp context of its own.

The GGUF is loaded once per slot: each slot has its own KV cache, so ``slots`` jobs run
at the same time. The weights are memory-mapped, so extra slots cost their context, not
another copy of the model. (One shared context with a queue would serialise jobs;
separate contexts let a short job finish while a long one runs.)

Generation runs in a worker thread (``trio.to_thread.run_sync`` under a
``CapacityLimiter`` of ``slots``) and streams text to trio through a memory
channel; the thread hands each event over with ``run_sync_soon`` and never
waits for trio (bench/engine.py measures no cost against llama-cpp-python). Between
two tokens the thread checks a cancel flag, so leaving the ``stream`` block,
or cancelling it, stops generation within one token and frees the slot.
A slot's prompt reuses only the cache it may without changing a float (``cached_prefix``).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from node.inference.base import Engine
from node.inference.sampler import Sampler
from node.inference.sampling import SamplingParams
from node.inference.slot import Slot, cached_prefix
from node.inference.stream import TokenStream


@dataclass
class ContextsEngine(Engine):
    """``Engine`` with one llama.cpp context per slot (built by ``open_engine``)."""

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
        slot: Slot,
        prompt: list[int],
        said: list[int],
        params: SamplingParams,
        grammar: str | None,
        emit: Callable[[object], None],
        cancelled: threading.Event,
        record: bool = True,
    ) -> None:
        llama = slot.llama
        started = time.perf_counter()
        seed = params.seed if params.seed is not None else secrets.randbits(31)
        sampler = Sampler(llama, params, grammar, seed, said)
        try:
            stream = TokenStream(
                llama, params, sampler, emit, prompt_tokens=len(prompt), cancelled=cancelled, record=record,
                started=started,
            )  # fmt: skip
            pending = cached_prefix(llama, prompt, slot.reusable)
            slot.reusable = 0  # until the prompt is in the cache
            llama.eval(pending)
            slot.reusable = len(prompt) // llama.n_batch * llama.n_batch
            while (token := stream.next()) is not None:
                llama.eval([token])
        finally:
            sampler.close()
        stream.finish(stream.reason)

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, which computes with llama.cpp, in a worker thread (one per slot at a time)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
