"""The sampler chain: one job's sampling from llama.cpp logits, with or without a grammar.

Both engines sample with it (``Sampler.sample``, from a context's row of logits), and
the verification pass replays it on another run's logits (``Sampler.replay``).
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

from node.errors import InvalidRequest
from node.inference.sampling import SamplingParams


class Sampler:
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
