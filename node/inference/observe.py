"""The verification pass: an answer re-run in one batched prefill, with the job's sampler chain replayed.

``Engine.observe`` runs ``observe_answer`` on a free slot: the prompt is evaluated exactly
as a generating slot evaluates it, so the first position's logits are the worker's
own; the answer's tokens then go in batches of ``PROBE_TOKENS`` with logits at every
position, and at each the job's sampler (same parameters, same seed) is replayed
(``Sampler.replay``). node/verify/judge.py judges the ``Observations``.
"""

from __future__ import annotations

import ctypes
import secrets
from collections.abc import Callable
from typing import Any

from node.errors import ContextTooLong, InvalidRequest
from node.inference.fingerprints import Observations
from node.inference.numerics import PROBE_TOKENS
from node.inference.sampler import Sampler
from node.inference.sampling import SamplingParams
from node.inference.slot import Slot, cached_prefix


def observe_answer(
    slot: Slot,
    tokenize: Callable[[Any], tuple[list[int], list[int]]],
    params: SamplingParams,
    grammar: str | None,
    records: Any,
    n_ctx: int,
) -> Observations:
    """Re-run the answer ``records`` (unpacked fingerprints) to ``tokenize``'s prompt on ``slot``; blocking.

    ``tokenize(llama)`` returns the prompt's tokens and those of answer text already said (resuming);
    ``grammar`` is the job's checked GBNF, or None.

    Raises:
        InvalidRequest: an empty prompt; ContextTooLong: prompt + answer over ``n_ctx``.
    """
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
    is_eog = eog_mask(llama)
    stop_p = np.zeros(n)
    seeded = params.seed is not None or params.temperature == 0
    sampler = Sampler(llama, params, grammar, params.seed if seeded else secrets.randbits(31), said)
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
        stop_p[i] = _stop_probability(sampler, is_eog, pick[i])
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
        pending = cached_prefix(llama, prompt, slot.reusable)
        slot.reusable = 0
        llama.eval(pending)
        slot.reusable = len(prompt) // llama.n_batch * llama.n_batch
        row = lambda j: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, j), shape=(n_vocab,))  # noqa: E731
        going = visit(0, row(-1))  # the prompt's last position: exactly the worker's first logits
        answer = [int(t) for t in records.tokens[: n - 1]]
        for start in range(0, len(answer), PROBE_TOKENS):  # the batch shapes probe_numerics probed
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
    tokens = records.tokens
    token_eog = np.zeros(n, dtype=bool)
    known = (tokens >= 0) & (tokens < n_vocab)
    token_eog[known] = is_eog[tokens[known]]
    eog = bool(token_eog[-1])
    answer = [int(t) for t in tokens[: n - 1 if eog else n] if 0 <= t < n_vocab]
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
        eog=token_eog,
        pick_eog=np.where(pick >= 0, is_eog[np.clip(pick, 0, n_vocab - 1)], False),
        stop_p=stop_p,
        **columns,
    )


def eog_mask(llama: Any) -> Any:
    """A bool per token id: end-of-generation or not. Computed once per ``Llama`` (a pass over the vocabulary
    takes ~50 ms) and kept on it; read-only afterwards."""
    import llama_cpp
    import numpy as np

    mask = getattr(llama, "_llmarket_eog", None)
    if mask is None:
        vocab, n_vocab = llama._model.vocab, llama.n_vocab()
        mask = np.fromiter((llama_cpp.llama_vocab_is_eog(vocab, t) for t in range(n_vocab)), bool, count=n_vocab)
        mask.flags.writeable = False
        llama._llmarket_eog = mask
    return mask


def _stop_probability(sampler: Sampler, is_eog: Any, pick: int) -> float:
    """The probability that the chain, as ``sampler.replay`` just ran it, ends the answer here: its final
    candidates' probability on end-of-generation tokens (greedy: 1 when its pick is one, else 0)."""
    import numpy as np

    if sampler._greedy:
        return 1.0 if pick >= 0 and is_eog[pick] else 0.0
    array = sampler._array  # the final candidates, where replay left them (read as replay reads them)
    base = ctypes.cast(array.data, ctypes.c_void_p).value
    if base == sampler._candidates.ctypes.data:
        final = sampler._candidates[: array.size]
    else:  # a sampler moved the candidates (llama.cpp may): read them where they are
        final = np.frombuffer((sampler._c.llama_token_data * array.size).from_address(base), sampler._candidates.dtype)
    return float(final["p"][is_eog[final["id"]]].astype(np.float64).sum()) if array.size else 0.0
