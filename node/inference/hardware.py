"""What a worker runs on: CPU, RAM, GPUs, and whether llama.cpp offloads to a GPU.

GPU facts come from NVML (``libnvidia-ml.so.1``, loaded with ctypes) when the
NVIDIA driver is present; without it the GPU list is empty. Nothing here
needs root or extra packages. ``self_benchmark`` measures the loaded model's
real speed, which offers advertise.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

from node.inference.sampling import SamplingParams


@dataclass(frozen=True)
class Gpu:
    name: str
    vram_total: int  # bytes
    vram_free: int  # bytes


@dataclass(frozen=True)
class HardwareProfile:
    cpu_model: str
    cpu_cores: int
    ram_total: int  # bytes
    ram_available: int  # bytes
    gpus: tuple[Gpu, ...]
    gpu_offload: bool  # llama.cpp was built with a GPU backend

    def summary(self) -> str:
        gpu = ", ".join(f"{g.name} ({g.vram_total / 2**30:.0f} GiB)" for g in self.gpus) or "no GPU"
        return f"{self.cpu_model} × {self.cpu_cores} cores, {self.ram_total / 2**30:.0f} GiB RAM, {gpu}"


def _meminfo() -> tuple[int, int]:
    values = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, rest = line.split(":", 1)
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml_gpus() -> tuple[Gpu, ...]:
    """NVIDIA GPUs as NVML reports them; empty when there is no driver."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return ()
    if nvml.nvmlInit_v2() != 0:
        return ()
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return ()
        gpus = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                continue
            name = ctypes.create_string_buffer(96)
            memory = _NvmlMemory()
            nvml.nvmlDeviceGetName(handle, name, ctypes.c_uint(96))
            nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory))
            gpus.append(Gpu(name.value.decode(errors="replace"), memory.total, memory.free))
        return tuple(gpus)
    finally:
        nvml.nvmlShutdown()


def llama_gpu_offload() -> bool:
    """Whether this llama-cpp-python build can offload layers to a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def probe_hardware() -> HardwareProfile:
    """This machine's profile. Blocking (NVML can take a while): from trio, call it in a thread."""
    total, available = _meminfo()
    return HardwareProfile(
        cpu_model=_cpu_model(),
        cpu_cores=os.cpu_count() or 1,
        ram_total=total,
        ram_available=available,
        gpus=nvml_gpus(),
        gpu_offload=llama_gpu_offload(),
    )


MAX_AUTO_SLOTS = 8  # the batched engine's default ceiling (docs/benchmarks.md, "How many slots by default")
KV_SHARE = 0.5  # of the memory left beside the model, what the default lets the KV cache take


@dataclass(frozen=True)
class SlotPlan:
    """How many jobs an engine serves at once when ``--slots`` is not given, and why (printed at start)."""

    slots: int
    reason: str


def plan_slots(
    profile: HardwareProfile,
    *,
    batched: bool,
    on_gpu: bool,
    n_ctx: int,
    model_bytes: int,
    kv_bytes_per_token: int,
) -> SlotPlan:
    """The default number of slots for this machine; pure.

    The batched engine takes as many sequences as the KV cache has room for, up to ``MAX_AUTO_SLOTS``: each
    sequence owns ``n_ctx`` cells of ``kv_bytes_per_token`` (its stream is allocated when the engine opens),
    and the cache may take ``KV_SHARE`` of the memory the model leaves free (VRAM when layers are offloaded,
    else RAM), the rest staying for compute buffers and everything else on the machine. More sequences cost
    a single stream nothing measurable and add aggregate throughput under load (docs/benchmarks.md, "How many
    slots by default"). The per-slot engine gives every slot its own context and a share of the cores, so it
    defaults to one. ``kv_bytes_per_token`` 0 (unknown) counts 64 KiB a token, as ``open_engine``'s fit check.
    """
    if not batched:
        return SlotPlan(1, "1 slot: --engine contexts splits the cores between its slots (--slots N for more)")
    per_sequence = n_ctx * (kv_bytes_per_token or 64 * 1024)  # unknown: the engine's rough 64 KiB a token
    if on_gpu and profile.gpus:
        where, free = "the GPU's free memory", max(g.vram_free for g in profile.gpus)
    else:
        where, free = "free RAM", profile.ram_available
    room = int(max(0, free - model_bytes) * KV_SHARE)
    fits = room // per_sequence
    slots = max(1, min(MAX_AUTO_SLOTS, fits))
    why = (
        f"{slots} slot(s): a sequence of {n_ctx} tokens takes {per_sequence / 2**20:.0f} MiB of KV cache, and "
        f"{KV_SHARE:.0%} of {where} beside the model ({room / 2**20:,.0f} MiB) holds {fits}"
    )
    if fits > MAX_AUTO_SLOTS:
        why += f"; at most {MAX_AUTO_SLOTS} by default"
    elif fits < 1:
        why += "; one all the same"
    return SlotPlan(slots, why + " (--slots N to choose)")


@dataclass(frozen=True)
class SpeedProfile:
    """The loaded model's measured speed on this machine (what an offer advertises)."""

    tokens_per_s: float  # decode speed, greedy, one slot
    first_token_s: float  # time to first token for a short chat prompt, cold


BENCH_MESSAGES = ({"role": "user", "content": "Write a short paragraph about the sea."},)


async def self_benchmark(engine, *, tokens: int = 32) -> SpeedProfile:
    """Measure ``engine``'s tokens/s and time to first token with one short greedy job.

    Decode speed excludes the first token (prompt processing), so it is the
    steady-state rate a long answer streams at.
    """
    result = await engine.complete_chat(list(BENCH_MESSAGES), SamplingParams(max_tokens=tokens, temperature=0.0))
    first = result.first_token_s or 0.0
    decoded = max(result.usage.completion_tokens - 1, 1)
    decode_s = max(result.elapsed_s - first, 1e-6)
    return SpeedProfile(tokens_per_s=decoded / decode_s, first_token_s=first)
