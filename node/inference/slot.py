"""A slot, where one job runs at a time, and what of a context's KV cache a new prompt may reuse without
changing a single float (``cached_prefix``).

In the per-slot engine a slot is a llama.cpp context of its own; in the batched engine it is a sequence of the
shared context, and its ``llama`` (the model's own context) tokenizes and runs verification passes. What a
context's cache may reuse is a fact about the context, not the slot (``Cache``): the batched engine's slots
all wrap the model's one context, so they share one ``Cache``, and a pass on one slot tells every other what
the cells now hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Cache:
    """A llama.cpp context's KV cache as ``cached_prefix`` sees it; one per context, shared by its slots."""

    reusable: int = 0  # leading cache tokens computed exactly as a fresh evaluation would (see cached_prefix)


@dataclass
class Slot:
    """One job's place in an engine (see the module docstring)."""

    llama: Any  # llama_cpp.Llama
    index: int
    cache: Cache = field(default_factory=Cache)  # of ``llama``'s context: pass the same one to slots that share it

    @property
    def reusable(self) -> int:
        """Leading tokens of ``llama``'s cache that a prompt may reuse (``cached_prefix``), whichever slot
        computed them."""
        return self.cache.reusable

    @reusable.setter
    def reusable(self, value: int) -> None:
        self.cache.reusable = value


def cached_prefix(llama: Any, prompt: list[int], reusable: int) -> list[int]:
    """Keep what the slot's KV cache may reuse of ``prompt``; returns the tokens left to evaluate.

    Reproducible outputs: llama.cpp's float results depend on how the prompt
    was split into batches, so a reused prefix must hold exactly what a fresh
    run would have computed. A fresh run evaluates the prompt in batches of
    ``n_batch`` from position 0; only whole batches of an earlier *prompt*
    (``reusable``: never the earlier answer, evaluated one token at a time, nor
    a last partial batch) are kept, and evaluation resumes at a batch boundary.
    Every token is then computed as in a fresh run, whatever ran before.

    At least the prompt's last token is always evaluated, so sampling starts
    from fresh logits (as in ``Llama.generate``).
    """
    import numpy as np

    keep = min(llama.n_tokens, len(prompt) - 1, reusable)
    if keep > 0:
        differ = np.flatnonzero(llama.input_ids[:keep] != np.asarray(prompt[:keep], dtype=np.intc))
        keep = int(differ[0]) if differ.size else keep
    keep = keep // llama.n_batch * llama.n_batch
    if keep > 0 and llama._ctx.kv_cache_seq_rm(-1, keep, -1):
        llama.n_tokens = keep
    else:
        llama.reset()
        keep = 0
    return prompt[keep:]
