"""Cheating workers' engines, built from the embedded model (no download), for the verification tests.

Each wraps a real ``node.inference.engine.Engine`` and implements the ``JobEngine``
protocol, so it can stand in a real ``WorkerService`` or be called directly.
A cheater's answer is self-consistent (its text is what its tokens spell, its
token count matches its records), so what catches it is the check against the
model, not a bookkeeping slip:

- ``requantize``: the default model requantized (Q4_0, Q2_K) with
  ``llama_model_quantize``; served as is by a real engine, under the
  original's CID.
- ``HiddenPrompt``: prepends a system prompt the requester never sent.
- ``HotSampler``: samples at a higher temperature than asked (same seed).
- ``RandomTokens``: random tokens, with fingerprints made up to look right.
- ``TruncatePad``: answers half honestly, then pads with copies of its last token and record.
"""

from __future__ import annotations

import ctypes
import random
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import trio

from node.inference import fingerprints
from node.inference.sampling import FINISH_LENGTH, Delta, Finished, SamplingParams, Usage

QUANTIZATIONS = {"Q4_0": 2, "Q2_K": 10}  # llama_ftype values


def requantize(source: Path, target: Path, kind: str) -> Path:
    """``source`` requantized to ``kind`` (a key of QUANTIZATIONS) at ``target``; about a second."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZATIONS[kind]
    params.allow_requantize = True
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {kind}")
    return target


class _Wrapper:
    """A JobEngine that runs the real engine, then rewrites its answer (``rewrite``)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.llama = engine._llamas[0]  # for the tokenizer only

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    @property
    def numerics(self) -> str:  # a cheater runs the real engine on its own machine, and says so in its receipts
        return self.engine.numerics

    def stream_chat(self, messages, params: SamplingParams, *, assistant_prefix: str = ""):
        def start(p):
            return self.engine.stream_chat(self.messages(messages), p, assistant_prefix=assistant_prefix)

        return self._stream(start, params)

    def stream_completion(self, prompt: str, params: SamplingParams, *, resume_text: str = ""):
        return self._stream(lambda p: self.engine.stream_completion(prompt, p, resume_text=resume_text), params)

    def messages(self, messages):
        return messages

    def params(self, params: SamplingParams) -> SamplingParams:
        return params

    def rewrite(self, done: Finished, params: SamplingParams) -> Finished:
        return done

    @asynccontextmanager
    async def _stream(self, start, params: SamplingParams):
        async with start(self.params(params)) as events:
            done = None
            async for event in events:
                if isinstance(event, Finished):
                    done = event
        done = self.rewrite(done, params)
        send, recv = trio.open_memory_channel(2)
        send.send_nowait(Delta(done.text, done.usage.completion_tokens, done.usage.prompt_tokens))
        send.send_nowait(done)
        send.close()
        async with recv:
            yield recv

    def spell(self, tokens) -> str:
        return b"".join(self.llama.detokenize([int(t)]) for t in tokens).decode(errors="replace")


class HiddenPrompt(_Wrapper):
    def __init__(self, engine, system: str = "Always answer as a pirate would, and mention gold.") -> None:
        super().__init__(engine)
        self.system = system

    def messages(self, messages):
        return [{"role": "system", "content": self.system}, *messages]


class HotSampler(_Wrapper):
    def __init__(self, engine, factor: float = 2.0, greedy_becomes: float = 1.0) -> None:
        super().__init__(engine)
        self.factor, self.greedy_becomes = factor, greedy_becomes

    def params(self, params: SamplingParams) -> SamplingParams:
        hotter = params.temperature * self.factor if params.temperature else self.greedy_becomes
        return replace(params, temperature=min(hotter, 10.0))


class RandomTokens(_Wrapper):
    """Random tokens; records that claim each token is the top one, with typical-looking logits."""

    def __init__(self, engine, seed: int = 0) -> None:
        super().__init__(engine)
        self.random = random.Random(seed)

    def params(self, params: SamplingParams) -> SamplingParams:
        return replace(params, max_tokens=1)  # costs the cheater almost nothing

    def rewrite(self, done: Finished, params: SamplingParams) -> Finished:
        n_vocab = self.llama.n_vocab()
        eog = {self.llama.token_eos()}
        tokens = []
        while len(tokens) < params.max_tokens:
            token = self.random.randrange(n_vocab)
            if token not in eog and token not in (self.llama.token_bos(),):
                tokens.append(token)
        top = [self.random.uniform(12, 22) for _ in tokens]
        packed = fingerprints.pack(
            tokens,
            tokens,
            [self.random.randrange(n_vocab) for _ in tokens],
            top,
            [t - self.random.uniform(0.5, 3) for t in top],
            top,
        )
        usage = Usage(done.usage.prompt_tokens, len(tokens))
        return Finished(self.spell(tokens), usage, FINISH_LENGTH, done.first_token_s, done.elapsed_s, packed)


class TruncatePad(_Wrapper):
    """Generates half of what was asked, then repeats its last token (and that token's record) to the end."""

    def params(self, params: SamplingParams) -> SamplingParams:
        return replace(params, max_tokens=max(1, params.max_tokens // 2), stop=())

    def rewrite(self, done: Finished, params: SamplingParams) -> Finished:
        records = done.fingerprints
        size = fingerprints.RECORD_BYTES
        kept = fingerprints.unpack(records)
        eog = [i for i, t in enumerate(kept.tokens) if t == self.llama.token_eos()]
        records = records[: size * (eog[0] if eog else len(kept))]
        if not records:  # it stopped at once: claim one token
            records = fingerprints.pack([13], [13], [14], [15.0], [14.0], [15.0])
        last = records[-size:]
        count = len(records) // size
        records += last * (params.max_tokens - count)
        tokens = fingerprints.unpack(records).tokens
        usage = Usage(done.usage.prompt_tokens, len(tokens))
        return Finished(self.spell(tokens), usage, FINISH_LENGTH, done.first_token_s, done.elapsed_s, records)
