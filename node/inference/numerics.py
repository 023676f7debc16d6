"""The numerics probe: whether this model's logits are bit-identical decoded batched or token by token.

``open_engine`` probes once per engine (``Engine.batch_numerics``); ``PROBE_TOKENS`` is also the size of the
batches in which the verification pass (node/inference/observe.py) evaluates an answer.
"""

from __future__ import annotations

from typing import Any

PROBE_TOKENS = 48  # over 32, where llama.cpp's CPU matrix kernels may switch to a batched path; also the
# size of the batches in which ``observe`` evaluates an answer, so that the probe covers what it runs, and the
# most rows of one sequence in a ubatch (every engine's ``n_ubatch``, the batched engine's prefill chunk): under
# ggml's flash-attention tile (64 rows), so every row is computed one at a time, whatever was batched with it
PATHS = b"fa-rows-singly:ubatch<=48:single-token-ubatch-1-thread"  # part of the class: a change of path changes it

CPU_CLAIM = "cpu"  # what a CPU engine's receipts claim when its answers are not exactly reproducible


def claims_exact(numerics: str) -> bool:
    """Whether a receipt's or an offer's ``numerics`` names a class of exact numerics (a ``probe_numerics`` hash:
    16 hex digits), rather than "cpu" or "" (noisy: node/verify/judge.py's noise classes)."""
    return len(numerics) == 16 and all(c in "0123456789abcdef" for c in numerics)


def probe_numerics(llama: Any, gpu_layers: int) -> str:
    """The class of machines on which this model's logits are bit-identical batched or token by token, or "".

    A CPU engine probes it: ``PROBE_TOKENS`` positions decoded one at a time, then in batches of that size
    and of 7 (``observe`` checks an answer in batches of at most ``PROBE_TOKENS``). When every
    logit matches, a verifier with the same string (the same llama.cpp build and CPU features, which the
    string hashes) is expected to see exactly the worker's logits (node/verify/judge.py: the exact regime). A model
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
    build = llama_cpp.llama_print_system_info() + llama_cpp.__version__.encode() + PATHS
    return hashlib.sha256(build).hexdigest()[:16]
