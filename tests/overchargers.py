"""Workers that bill more than they used, for the billing tests (tests/test_billing.py).

Each wraps a real engine. The ones that lie about counts rewrite the engine's
events before the worker's job service sees them, so the worker's meter, its
chunks and its signed receipt all carry the lie, as a patched ``serve`` would.
``padding`` generates for real past the model's end-of-generation token, up to
``max_tokens``, and bills every token.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
from contextlib import asynccontextmanager, contextmanager

import trio

from node.inference.sampling import Delta, Finished, Usage
from node.models.default import DEFAULT_MODEL_CID
from node.payments.policy import prompt_token_bound
from node.protocol.messages import JobRequest


class Overcharging:
    """A ``JobEngine`` that bills ``prompt(p, request)`` prompt tokens and ``completion(n)`` tokens per chunk of
    ``n`` (and, with ``receipt_only``, honest chunks but an inflated final count)."""

    def __init__(self, engine, *, prompt=lambda p, request: p, completion=lambda n: n, receipt_only=False) -> None:
        self.engine, self.prompt, self.completion, self.receipt_only = engine, prompt, completion, receipt_only

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    @property
    def numerics(self) -> str:
        return self.engine.numerics

    def stream_chat(self, messages, params, *, assistant_prefix=""):
        request = JobRequest("x", DEFAULT_MODEL_CID, {}, messages=list(messages), resume_text=assistant_prefix)
        return self._lying(self.engine.stream_chat(messages, params, assistant_prefix=assistant_prefix), request)

    def stream_completion(self, prompt, params, *, resume_text=""):
        request = JobRequest("x", DEFAULT_MODEL_CID, {}, prompt=prompt, resume_text=resume_text)
        return self._lying(self.engine.stream_completion(prompt, params, resume_text=resume_text), request)

    @asynccontextmanager
    async def _lying(self, generation, request: JobRequest):
        send, recv = trio.open_memory_channel(math.inf)
        billed = 0

        def lie(event):
            nonlocal billed
            if isinstance(event, Delta):
                tokens = event.tokens if self.receipt_only else self.completion(event.tokens)
                billed += self.completion(event.tokens) if self.receipt_only else tokens
                return dataclasses.replace(
                    event, prompt_tokens=self.prompt(event.prompt_tokens, request), tokens=tokens
                )
            if isinstance(event, Finished):
                usage = Usage(self.prompt(event.usage.prompt_tokens, request), billed)
                return dataclasses.replace(event, usage=usage)
            return event

        async with generation as events:
            async with trio.open_nursery() as nursery:

                async def pump():
                    async with send:
                        async for event in events:
                            await send.send(lie(event))

                nursery.start_soon(pump)
                yield recv
                nursery.cancel_scope.cancel()


def one_more(p: int, request: JobRequest) -> int:
    return p + 1


def thirty_percent(p: int, request: JobRequest) -> int:
    return math.ceil(p * 1.3)


def byte_bound(p: int, request: JobRequest) -> int:
    """The most the requester's old check allowed: one token per prompt byte, plus the template's overhead."""
    return prompt_token_bound(request)


def inflated(n: int) -> int:
    return math.ceil(n * 1.3)


@contextmanager
def padding(engine):
    """``engine`` (its own, loaded for this) never sees end-of-generation: it goes on to ``max_tokens``."""
    import llama_cpp

    vocab = ctypes.cast(engine._llamas[0]._model.vocab, ctypes.c_void_p).value
    original = llama_cpp.llama_vocab_is_eog

    def is_eog(v, token):
        return False if ctypes.cast(v, ctypes.c_void_p).value == vocab else original(v, token)

    llama_cpp.llama_vocab_is_eog = is_eog
    try:
        yield engine
    finally:
        llama_cpp.llama_vocab_is_eog = original
