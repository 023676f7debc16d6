"""The inference engine: llama.cpp (llama-cpp-python) driven from trio; ``open_engine`` builds one.

Two engines share one type (``Engine``, node/inference/base.py): ``kind="contexts"`` loads
one llama.cpp context per slot (node/inference/contexts.py), ``kind="batched"`` decodes
every slot's sequence in one context (node/inference/batched.py, serve's default). Both
sample with the shared leaves: the sampler chain (sampler.py), grammars (grammar.py), the
text stream (stream.py), the numerics probe (numerics.py); ``observe`` re-runs an answer
for verification (observe.py).

Token accounting is exact: ``prompt_tokens`` is the length of the tokenized
prompt (after the chat template) and ``completion_tokens`` the number of
tokens sampled, the end-of-generation token excluded.

Logprobs (``SamplingParams.logprobs``) are read from the logits the token was
sampled from, in the generation thread, only when asked for; grammars
(``json_schema``/``grammar``) are converted and checked by llama.cpp's parser in
a thread before a slot is taken, then constrain llama.cpp's own sampler chain.

The names of node/inference/sampling.py are re-exported here, their first home.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from node.errors import InvalidRequest, ModelError
from node.inference.base import Engine
from node.inference.batched import BatchedEngine, Scheduler, batched_context
from node.inference.contexts import ContextsEngine
from node.inference.hardware import HardwareProfile, SlotPlan, plan_slots, probe_hardware
from node.inference.numerics import PROBE_TOKENS, probe_numerics  # noqa: F401  (PROBE_TOKENS: re-exported)
from node.inference.sampling import (  # noqa: F401  (re-exported: node.inference.engine was their home)
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    Delta,
    Finished,
    SamplingParams,
    TokenLogprob,
    Usage,
    validate_messages,
    validate_prompt,
)
from node.inference.slot import Cache, Slot
from node.models.store import check_gguf

log = logging.getLogger("node.inference.engine")


def _check_fits(path: Path, gpu_layers: int, slots: int, n_ctx: int, profile: HardwareProfile) -> None:
    size = path.stat().st_size
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


def _plan(
    model_path: Path, slots: int, n_ctx: int, threads: int | None, gpu_layers: int | None, shared: bool = False
) -> tuple[HardwareProfile, int, int]:
    """Check the file and the machine, once: (hardware profile, gpu_layers, threads). Blocking (NVML, files).
    ``shared``: the slots share one context (batched), which gets every core; else each slot gets its share."""
    check_gguf(model_path)
    profile = probe_hardware()
    if gpu_layers is None:
        gpu_layers = -1 if profile.gpu_offload and profile.gpus else 0
    threads = threads or (profile.cpu_cores if shared else max(1, (profile.cpu_cores + slots - 1) // slots))
    _check_fits(model_path, gpu_layers, slots, n_ctx, profile)
    return profile, gpu_layers, threads


def kv_bytes_per_token(llama: Any) -> int:
    """Bytes of f16 KV cache one token takes in ``llama``'s model (keys and values, every layer), from its
    GGUF metadata; 0 when the metadata does not say."""
    meta = llama.metadata
    arch = meta.get("general.architecture", "")
    number = lambda key, default=0: int(meta.get(f"{arch}.{key}", default) or default)  # noqa: E731
    layers, heads, embedding = number("block_count"), number("attention.head_count"), number("embedding_length")
    kv_heads = number("attention.head_count_kv", heads)
    head = embedding // heads if heads else 0
    return 2 * layers * kv_heads * (number("attention.key_length", head) + number("attention.value_length", head))


def slot_plan(engine: Engine) -> SlotPlan:
    """What ``open_engine(slots=None)`` plans for ``engine``'s model and machine (its hardware profile, probed
    when it opened): the same plan it chose ``engine.slots`` by, with the reason, for the start-up line."""
    return plan_slots(
        engine.hardware,
        batched=isinstance(engine, BatchedEngine),
        on_gpu=engine.gpu_layers != 0,
        n_ctx=engine.n_ctx,
        model_bytes=engine.model_path.stat().st_size,
        kv_bytes_per_token=kv_bytes_per_token(engine._llamas[0]),
    )


@asynccontextmanager
async def open_engine(
    model_path: Path,
    *,
    slots: int | None = 1,
    n_ctx: int = 2048,
    threads: int | None = None,
    gpu_layers: int | None = None,
    fingerprints: bool = True,
    kind: str = "contexts",
    reuse_prefixes: bool = True,
) -> AsyncIterator[Engine]:
    """Load ``model_path`` into ``slots`` contexts (``kind="contexts"``), or into one context that decodes
    ``slots`` sequences together (``kind="batched"``: node/inference/batched.py); unload on exit.

    The hardware is probed once, in a thread (NVML and the file checks block),
    and kept as ``engine.hardware``.

    Args:
        slots: jobs at once; None chooses from the machine (``plan_slots``: as many sequences as the KV
            cache has room for, up to 8, with the batched engine; 1 with the per-slot one).
        gpu_layers: layers to offload; None means all of them when llama.cpp
            has a GPU backend and a GPU is present, else 0.
        reuse_prefixes: batched only: a prompt's prefix already in a sequence's
            cache is not computed again (``Scheduler._place``); off for benchmarks.

    Raises:
        ModelError: the file is not GGUF, will not fit in RAM/VRAM, or llama.cpp cannot load it.
    """
    model_path = Path(model_path)
    if slots is not None and slots < 1:
        raise InvalidRequest("--slots must be at least 1")
    if kind not in ("contexts", "batched"):
        raise InvalidRequest(f"unknown engine {kind!r}: use batched or contexts")
    batched = kind == "batched"
    auto = slots is None
    if auto and not batched:
        slots = 1  # plan_slots: the per-slot engine splits the cores between slots
    profile, gpu_layers, threads = await trio.to_thread.run_sync(
        _plan, model_path, slots or 1, n_ctx, threads, gpu_layers, batched
    )  # batched with slots=None: the model checked with one sequence; the plan below fits the rest

    def load() -> Any:
        from llama_cpp import Llama

        try:
            # Flash attention computes each position's attention on its own, so a position's logits do not
            # depend on what else was in its batch (on CPUs, for most quantizations: docs/verification.md):
            # a verifier's batched pass then sees exactly the logits the worker sampled from, token by token.
            return Llama(
                str(model_path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_gpu_layers=gpu_layers,
                flash_attn=True,
                n_ubatch=PROBE_TOKENS,  # under 64 rows: flash attention's row-at-a-time path, the batched engine's
                verbose=False,
                seed=0,
            )
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"llama.cpp could not load {model_path}: {err}") from None

    llamas: list[Any] = []
    scheduler = ctx = None
    compute = trio.to_thread.run_sync  # blocking llama.cpp work, in a worker thread
    if batched:  # all of it on the scheduler's one thread (batched.py: OpenMP teams belong to a thread)
        scheduler = Scheduler(512, reuse_prefixes=reuse_prefixes)
        scheduler.start()

        async def compute(fn, *args):
            return await trio.to_thread.run_sync(scheduler.call, lambda: fn(*args))

    try:
        for _ in range(1 if batched else slots):
            llamas.append(await compute(load))
        batch_numerics = await compute(probe_numerics, llamas[0], gpu_layers)
        if auto:
            plan = plan_slots(
                profile, batched=batched, on_gpu=gpu_layers != 0, n_ctx=n_ctx,
                model_bytes=model_path.stat().st_size, kv_bytes_per_token=kv_bytes_per_token(llamas[0]),
            )  # fmt: skip
            slots = plan.slots
            log.info("%s", plan.reason)
        free_send, free_recv = trio.open_memory_channel(slots)
        shared = Cache()  # batched: every slot is a sequence of the one context, tokenized and checked with llamas[0]
        for index in range(slots):
            free_send.send_nowait(Slot(llamas[0], index, shared) if batched else Slot(llamas[index], index))
        extra: dict[str, Any] = {}
        if batched:
            ctx = await compute(lambda: batched_context(llamas[0], slots=slots, n_ctx=n_ctx, threads=threads))
            scheduler.attach(llamas[0], ctx, slots)
            extra["_scheduler"] = scheduler
        engine = (BatchedEngine if batched else ContextsEngine)(
            model_path=model_path,
            n_ctx=n_ctx,
            gpu_layers=gpu_layers,
            threads=threads,
            slots=slots,
            chat_template=llamas[0].metadata.get("tokenizer.chat_template"),
            hardware=profile,
            fingerprints=fingerprints,
            batch_numerics=batch_numerics,
            _free_send=free_send,
            _free_recv=free_recv,
            _limiter=trio.CapacityLimiter(slots),
            _grammar_limiter=trio.CapacityLimiter(1),
            _llamas=llamas,
            **extra,
        )
        yield engine
    finally:
        if scheduler is not None:
            await trio.to_thread.run_sync(scheduler.stop)
        if ctx is not None:
            import llama_cpp

            llama_cpp.llama_free(ctx)
        for llama in llamas:
            llama.close()
