"""One shared context with a queue, or one context per slot? Measured with concurrent jobs.

    .venv/bin/python bench/slots.py [--jobs 4] [--tokens 128]

Starts --jobs chat jobs at once (greedy, up to --tokens each) on the default model
with slots=1 (jobs queue for one context that uses every core) and with
slots=cores (one context per slot, the cores split between them), each in a fresh
process, and prints aggregate tokens/s and time to first token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.inference.engine import Finished, SamplingParams, open_engine  # noqa: E402
from node.inference.hardware import probe_hardware  # noqa: E402
from node.models.default import default_model_file  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and the sea."}]


async def measure(slots: int, jobs: int, tokens: int) -> dict:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, repeat_penalty=1.0)
    async with open_engine(default_model_file(), slots=slots) as engine:
        first_tokens: list[float] = []
        produced = 0

        async def job() -> None:
            nonlocal produced
            start = time.perf_counter()
            first = None
            async with engine.stream_chat(MESSAGES, params) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        produced += event.usage.completion_tokens
                    elif first is None:
                        first = time.perf_counter() - start
            first_tokens.append(first)

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(jobs):
                nursery.start_soon(job)
        wall = time.perf_counter() - began
        return {
            "slots": slots,
            "threads": engine.threads,
            "tokens_per_s": produced / wall,
            "ttft_median_ms": 1000 * statistics.median(first_tokens),
            "ttft_max_ms": 1000 * max(first_tokens),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, help=argparse.SUPPRESS)  # internal: one configuration, JSON out
    args = parser.parse_args()
    if args.slots:
        print(json.dumps(trio.run(measure, args.slots, args.jobs, args.tokens)))
        return
    cores = probe_hardware().cpu_cores
    print(f"{probe_hardware().summary()}; {args.jobs} concurrent jobs of up to {args.tokens} tokens")
    print("| slots | threads per slot | aggregate tokens/s | TTFT median (ms) | TTFT max (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for slots in sorted({1, cores}):
        out = subprocess.run(
            [sys.executable, __file__, "--slots", str(slots), "--jobs", str(args.jobs), "--tokens", str(args.tokens)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        r = json.loads(out)
        print(
            f"| {r['slots']} | {r['threads']} | {r['tokens_per_s']:.0f} "
            f"| {r['ttft_median_ms']:.0f} | {r['ttft_max_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
