"""``llmarket hardware``: what this machine offers, and optionally how fast a model runs on it."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import trio

from node.cli.common import engine_flags, ipfs_flag, json_flag, model_flag, model_store
from node.models.resolve import resolve_model
from node.progress import TerminalProgress


def register(commands: argparse._SubParsersAction) -> None:
    hw = commands.add_parser(
        "hardware",
        help="show CPU, RAM, GPUs and GPU offload; --bench measures a model's speed",
        description="Show the hardware profile a worker advertises. With --bench, load the model and measure "
        "tokens/s and time to first token, as `llmarket serve` does at start-up.",
    )
    hw.add_argument("--bench", action="store_true", help="load --model and measure its speed")
    model_flag(hw)
    engine_flags(hw)
    ipfs_flag(hw)
    json_flag(hw)
    hw.set_defaults(handler=_hardware)


def _hardware(args: argparse.Namespace) -> None:
    from node.inference.engine import open_engine  # llama.cpp only for the commands that run a model
    from node.inference.hardware import probe_hardware, self_benchmark

    profile = probe_hardware()
    info = {"hardware": asdict(profile)}
    if args.bench:
        entry = resolve_model(model_store(args), args.model, progress=TerminalProgress())

        async def bench():
            async with open_engine(
                entry.path, n_ctx=args.ctx_size, threads=args.threads, gpu_layers=args.gpu_layers, kind=args.engine
            ) as engine:
                return engine.gpu_layers, await self_benchmark(engine)

        gpu_layers, speed = trio.run(bench)
        info["model"] = {"cid": entry.cid, "name": entry.name, "gpu_layers": gpu_layers, **asdict(speed)}
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(profile.summary())
    print(f"llama.cpp GPU offload: {'yes' if profile.gpu_offload else 'no (CPU build)'}")
    if "model" in info:
        m = info["model"]
        print(
            f"{m['name']}: {m['tokens_per_s']:.1f} tokens/s, first token {1000 * m['first_token_s']:.0f} ms "
            f"(gpu layers: {m['gpu_layers']})"
        )
