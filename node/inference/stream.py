"""The text stream: one job's sampled tokens turned into ``Delta`` events and one ``Finished``.

Both engines run the same per-token step (``TokenStream.next``): sample, record the
fingerprint, stop at an end-of-generation token, a stop string or ``max_tokens``,
read logprobs when asked, and emit the text that can no longer become the start of a
stop string (``holdback``). Only how logits are computed and how events reach trio
differ between the engines.
"""

from __future__ import annotations

import codecs
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from node.inference.fingerprints import Recorder
from node.inference.sampler import Sampler
from node.inference.sampling import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    Delta,
    Finished,
    SamplingParams,
    TokenLogprob,
    Usage,
)


def holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Where the first stop string in ``text`` at or after ``start`` begins, or None."""
    hits = [i for stop in stops if (i := text.find(stop, start)) != -1]
    return min(hits) if hits else None


def logprob_reader(llama: Any, k: int, ctx: Any = None) -> Callable[..., TokenLogprob]:
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


class TokenStream:
    """One job's answer as its tokens are sampled, in the thread that decodes (not thread-safe).

    ``emit`` takes each event (it must not block); ``next`` samples and streams one token,
    ``finish`` emits what is left and the ``Finished`` event. ``started`` is when the job
    began, for the timings in ``Finished``.
    """

    def __init__(
        self,
        llama: Any,
        params: SamplingParams,
        sampler: Sampler,
        emit: Callable[[object], None],
        *,
        prompt_tokens: int,
        cancelled: threading.Event,
        record: bool,
        started: float,
        ctx: Any = None,
    ) -> None:
        """``llama``: the model (vocabulary, detokenizer); ``ctx``: the context sampled from (default:
        ``llama``'s own); ``record``: record fingerprints."""
        import llama_cpp
        import numpy as np

        self._c, self._np = llama_cpp, np
        self._llama, self._ctx = llama, ctx or llama.ctx
        self._vocab = llama._model.vocab
        self._n_vocab = llama.n_vocab()
        self._params, self._sampler, self._emit = params, sampler, emit
        self._cancelled, self._record = cancelled, record
        self._prompt_tokens, self._started = prompt_tokens, started
        self._describe = logprob_reader(llama, params.logprobs, ctx) if params.logprobs is not None else None
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._logprobs: list[TokenLogprob] = []  # of the tokens produced but not yet reported
        self._recorder = Recorder()
        self.text, self.sent, self.produced, self.reported = "", 0, 0, 0
        self.first_token_s: float | None = None
        self.reason = FINISH_LENGTH  # why the job ended, once ``next`` returned None

    def _delta(self, chunk: str) -> Delta:
        records = self._recorder.packed(self.reported, self.produced) if self._record else b""
        event = Delta(chunk, self.produced - self.reported, self._prompt_tokens, tuple(self._logprobs), records)
        self.reported = self.produced
        self._logprobs.clear()
        return event

    def next(self, row: int = -1) -> int | None:
        """Sample a token from batch row ``row`` of the context's logits (default: the last evaluated
        position) and stream it; the token to feed next, or None when the job ends here (``reason``)."""
        token = self._sampler.sample(row)  # the context still holds the logits it was sampled from
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self._started
        if self._cancelled.is_set():
            self.reason = FINISH_CANCELLED
            return None
        if self._record:
            logits = self._np.ctypeslib.as_array(self._c.llama_get_logits_ith(self._ctx, row), shape=(self._n_vocab,))
            self._recorder.add(logits, token)
        if self._c.llama_vocab_is_eog(self._vocab, token):
            self.reason = FINISH_STOP
            return None
        self.produced += 1
        if self._describe is not None:
            self._logprobs.append(self._describe(token, row))
        self.text += self._decoder.decode(self._llama.detokenize([token]))
        stops = self._params.stop
        hit = find_stop(self.text, stops, max(0, self.sent - self._longest_stop)) if stops else None
        if hit is not None:
            self.text = self.text[:hit]
            self.reason = FINISH_STOP
            return None
        ready = len(self.text) - holdback(self.text, stops)
        if ready > self.sent:
            self._emit(self._delta(self.text[self.sent : ready]))
            self.sent = ready
        if self.produced >= self._params.max_tokens:
            self.reason = FINISH_LENGTH
            return None
        return token

    def finish(self, reason: str) -> None:
        """The job ended for ``reason``: emit the text not yet sent (unless cancelled), then ``Finished``."""
        if reason == FINISH_LENGTH:
            self.text += self._decoder.decode(b"", final=True)
        if reason != FINISH_CANCELLED and (len(self.text) > self.sent or self.produced > self.reported):
            self._emit(self._delta(self.text[self.sent :]))
        usage = Usage(prompt_tokens=self._prompt_tokens, completion_tokens=self.produced)
        elapsed = time.perf_counter() - self._started
        self._emit(Finished(self.text, usage, reason, self.first_token_s, elapsed, self._recorder.packed()))
