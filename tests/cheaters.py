"""Cheating workers' engines, built from the embedded model (no download), for the verification tests.

Each wraps a real ``node.inference.engine.Engine`` and implements the ``JobEngine``
protocol, so it can stand in a real ``WorkerService`` or be called directly.
A cheater's answer is self-consistent (its text is what its tokens spell, its
token count matches its records), so what catches it is the check against the
model, not a bookkeeping slip:

- ``requantize``: the default model requantized (Q4_0, Q2_K) with
  ``llama_model_quantize``; served as is by a real engine, under the
  original's CID.
- ``HiddenPrompt``: prepends a system prompt the requester never sent (and bills the prompt it was sent).
- ``HiddenPrompt(engine, "Be concise.")``: the same with a mild system prompt.
- ``TruncatePrompt``: prefills only the second half of the last message (drops the rest), bills the whole prompt.
- ``HotSampler``: samples at a higher temperature than asked (same seed): twice, or 1.3 times.
- ``ForgedTokens(..., sigma=0, numerics=...)``: a Q2_K copy's tokens with records forged by teacher-forcing the
  real model, claiming the real model's exact numerics (no noise).
- ``RandomTokens``: random tokens, with fingerprints made up to look right.
- ``TruncatePad``: answers half honestly, then pads with copies of its last token and record.

Cheaters that claim no exact numerics (``numerics`` ""), so they are checked in the widest
noise class (node/verify/judge.py ``GPU``), with Gaussian noise added to every record value
(``NOISE``, about what honest noisy kernels give):

- ``NoisyRecords(HotSampler)``: a sampler at twice the asked temperature.
- ``ForgedTokens``: the tokens of another engine (a Q4_0 copy), same parameters and seed, with
  records forged by teacher-forcing the real model on them (``Direct.forge``).
- ``PadPastEOG``: the real model, with end-of-generation masked out, so it never ends before
  ``max_tokens`` (honest raw records; ``numerics`` "" unless told).

``NoisyHonest`` is the honest counterpart: a worker whose logits carry Gaussian noise (as a GPU's
might) and that samples from them, recording them: it must never be flagged.
"""

from __future__ import annotations

import ctypes
import random
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import trio

from node.inference import fingerprints
from node.inference.numerics import PROBE_TOKENS
from node.inference.sampler import Sampler
from node.inference.sampling import FINISH_LENGTH, FINISH_STOP, Delta, Finished, SamplingParams, Usage

NOISE = 0.25  # the standard deviation of the noise added to records (logits): honest noisy paths' mean ~0.2

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
    async def _stream(self, start, params: SamplingParams, billed: int | None = None):
        async with start(self.params(params)) as events:
            done = None
            async for event in events:
                if isinstance(event, Finished):
                    done = event
        done = self.rewrite(done, params)
        if billed is not None:  # bills the prompt the requester sent, not the one it ran
            done = replace(done, usage=Usage(billed, done.usage.completion_tokens))
        send, recv = trio.open_memory_channel(2)
        send.send_nowait(Delta(done.text, done.usage.completion_tokens, done.usage.prompt_tokens))
        send.send_nowait(done)
        send.close()
        async with recv:
            yield recv

    def spell(self, tokens) -> str:
        return b"".join(self.llama.detokenize([int(t)]) for t in tokens).decode(errors="replace")


class _OtherPrompt(_Wrapper):
    """Runs another prompt than the requester's (``messages``) and bills the requester's own prompt tokens, so
    that only the logits can give it away."""

    def stream_chat(self, messages, params: SamplingParams, *, assistant_prefix: str = ""):
        billed = len(self.engine._chat_tokens(self.llama, list(messages)))

        def start(p):
            return self.engine.stream_chat(self.messages(messages), p, assistant_prefix=assistant_prefix)

        return self._stream(start, params, billed)


class HiddenPrompt(_OtherPrompt):
    def __init__(self, engine, system: str = "Always answer as a pirate would, and mention gold.") -> None:
        super().__init__(engine)
        self.system = system

    def messages(self, messages):
        return [{"role": "system", "content": self.system}, *messages]


class TruncatePrompt(_OtherPrompt):
    """Prefills only the second half of the last message's words (the system message and any earlier turns
    dropped)."""

    def messages(self, messages):
        last = messages[-1]
        words = last["content"].split()
        return [{**last, "content": " ".join(words[len(words) // 2 :])}]


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


# ------------------------------------------------------------------ cheaters driving a llama token by token


class Direct:
    """A one-slot engine's llama, driven token by token (one job at a time) by a cheater or a noisy worker."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.llama = engine._llamas[0]
        self.lock = trio.Lock()
        import llama_cpp

        vocab = self.llama._model.vocab
        self.eog = np.array([t for t in range(self.llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)])

    async def run(self, fn, *args):
        async with self.lock:
            return await trio.to_thread.run_sync(fn, *args)

    def prompt(self, messages) -> list[int]:
        return self.engine._chat_tokens(self.llama, messages)

    def _row(self, j: int) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self.llama.ctx, j)
        return np.ctypeslib.as_array(pointer, shape=(self.llama.n_vocab(),))

    def _start(self, prompt: list[int]) -> None:
        self.llama.reset()
        self.llama._ctx.kv_cache_seq_rm(-1, 0, -1)
        self.llama.eval(prompt)

    def forge(self, prompt: list[int], tokens) -> bytes:
        """Records of ``tokens`` as this model gives them, teacher-forced after ``prompt``; blocking."""
        llama, recorder = self.llama, fingerprints.Recorder()
        self._start(prompt)
        recorder.add(self._row(-1).copy(), int(tokens[0]))
        answer = [int(t) for t in tokens[:-1]]
        for start in range(0, len(answer), PROBE_TOKENS):
            batch = answer[start : start + PROBE_TOKENS]
            llama._batch.set_batch(batch=batch, n_past=llama.n_tokens, logits_all=True)
            llama._ctx.decode(llama._batch)
            llama.input_ids[llama.n_tokens : llama.n_tokens + len(batch)] = batch
            llama.n_tokens += len(batch)
            for j in range(len(batch)):
                recorder.add(self._row(j).copy(), int(tokens[start + j + 1]))
        return recorder.packed()

    def generate(self, prompt: list[int], params: SamplingParams, *, noise: float = 0.0, mask_eog: bool = False,
                 seed: int = 0) -> tuple[list[int], bytes]:  # fmt: skip
        """Sample an answer token by token; blocking. ``noise``: Gaussian noise (this standard deviation) added to
        every logit before sampling and recording; ``mask_eog``: end-of-generation never sampled (the records
        keep the raw logits)."""
        llama, recorder = self.llama, fingerprints.Recorder()
        rng = np.random.default_rng(seed)
        self._start(prompt)
        sampler = Sampler(llama, params, None, params.seed if params.seed is not None else 0, [])
        tokens: list[int] = []
        try:
            while len(tokens) < params.max_tokens:
                row = self._row(-1)
                if noise:
                    row += rng.normal(0.0, noise, row.shape).astype(np.float32)
                seen = row.copy()
                if mask_eog:
                    row[self.eog] = -np.inf
                token = sampler.sample(-1)
                recorder.add(seen, token)
                tokens.append(token)
                if token in self.eog:
                    break
                llama.eval([token])
        finally:
            sampler.close()
        return tokens, recorder.packed()

    def finished(self, tokens: list[int], records: bytes, prompt_tokens: int) -> Finished:
        ends = bool(tokens) and tokens[-1] in self.eog
        said = tokens[:-1] if ends else tokens
        text = b"".join(self.llama.detokenize([t]) for t in said).decode(errors="replace")
        usage = Usage(prompt_tokens, len(said))
        return Finished(text, usage, FINISH_STOP if ends else FINISH_LENGTH, 0.0, 0.0, records)


def noisy(records: bytes, sigma: float, rng: random.Random) -> bytes:
    """``records`` with Gaussian noise of ``sigma`` added to every logit value."""
    r = fingerprints.unpack(records)
    jitter = lambda column: [float(v) + rng.gauss(0.0, sigma) for v in column]  # noqa: E731
    return fingerprints.pack(r.tokens, r.top1, r.top2, jitter(r.logit1), jitter(r.logit2), jitter(r.logit))


class _DirectWorker:
    """A JobEngine (chat only) whose answers ``answer(messages, params)`` makes, claiming ``numerics``."""

    numerics = ""

    def __init__(self, direct: Direct) -> None:
        self.direct = direct

    @property
    def free_slots(self) -> int:
        return 1

    def stream_chat(self, messages, params: SamplingParams, *, assistant_prefix: str = ""):
        return self._stream(messages, params)

    @asynccontextmanager
    async def _stream(self, messages, params):
        done = await self.answer(messages, params)
        send, recv = trio.open_memory_channel(2)
        send.send_nowait(Delta(done.text, done.usage.completion_tokens, done.usage.prompt_tokens))
        send.send_nowait(done)
        send.close()
        async with recv:
            yield recv


class NoisyHonest(_DirectWorker):
    """Honest, on hardware whose logits differ from the verifier's by Gaussian noise of ``sigma`` at every
    position (as a GPU's might): it samples from its own logits and records them, and claims no numerics."""

    def __init__(self, direct: Direct, sigma: float = NOISE) -> None:
        super().__init__(direct)
        self.sigma, self.jobs = sigma, 0

    async def answer(self, messages, params):
        self.jobs += 1
        prompt = self.direct.prompt(messages)
        tokens, records = await self.direct.run(
            partial(self.direct.generate, prompt, params, noise=self.sigma, seed=self.jobs)
        )
        return self.direct.finished(tokens, records, len(prompt))


class PadPastEOG(_DirectWorker):
    """Never ends before ``max_tokens``: end-of-generation is masked out of every draw, and the answer is billed
    in full (finish 'length'). Its records are the real model's raw logits; it claims ``numerics``.
    ``honest[text]``: how many tokens the honest answer of the answer ``text`` had (fewer: it was padded)."""

    def __init__(self, direct: Direct, numerics: str = "") -> None:
        super().__init__(direct)
        self.numerics, self.honest = numerics, {}

    async def answer(self, messages, params):
        prompt = self.direct.prompt(messages)
        honest, _ = await self.direct.run(self.direct.generate, prompt, params)
        tokens, records = await self.direct.run(partial(self.direct.generate, prompt, params, mask_eog=True))
        done = self.direct.finished(tokens, records, len(prompt))
        ended = honest[-1] in self.direct.eog
        self.honest[done.text] = len(honest) - ended if ended else done.usage.completion_tokens
        return done


class NoisyRecords(_Wrapper):
    """Wraps a cheater (``inner``): its answers, with Gaussian noise added to every record value, and no
    numerics claimed, so that it is checked in the widest noise class."""

    def __init__(self, inner: _Wrapper, sigma: float = NOISE, seed: int = 0) -> None:
        super().__init__(inner.engine)
        self.inner, self.sigma, self.random = inner, sigma, random.Random(seed)

    numerics = ""

    def params(self, params: SamplingParams) -> SamplingParams:
        return self.inner.params(params)

    def messages(self, messages):
        return self.inner.messages(messages)

    def rewrite(self, done: Finished, params: SamplingParams) -> Finished:
        done = self.inner.rewrite(done, params)
        return replace(done, fingerprints=noisy(done.fingerprints, self.sigma, self.random))


class ForgedTokens(_Wrapper):
    """The tokens of ``engine`` (a cheaper model: same parameters, same seed), with records forged by
    teacher-forcing the real model (``real``, a ``Direct``) on them, plus noise of ``sigma``; claims
    ``numerics`` (default none: checked in the widest class)."""

    numerics = ""

    def __init__(self, engine, real: Direct, sigma: float = NOISE, seed: int = 0, numerics: str = "") -> None:
        super().__init__(engine)
        self.real, self.sigma, self.random = real, sigma, random.Random(seed)
        self.numerics = numerics

    def stream_chat(self, messages, params: SamplingParams, *, assistant_prefix: str = ""):
        return self._forged(messages, params)

    @asynccontextmanager
    async def _forged(self, messages, params: SamplingParams):
        async with self.engine.stream_chat(messages, params) as events:
            async for event in events:
                done = event
        tokens = fingerprints.unpack(done.fingerprints).tokens
        records = await self.real.run(self.real.forge, self.real.prompt(messages), tokens)
        done = replace(done, fingerprints=noisy(records, self.sigma, self.random))
        send, recv = trio.open_memory_channel(2)
        send.send_nowait(Delta(done.text, done.usage.completion_tokens, done.usage.prompt_tokens))
        send.send_nowait(done)
        send.close()
        async with recv:
            yield recv
