"""Inference speed on the default model: llama-cpp-python directly, and through llmarket's Engine.

    .venv/bin/python bench/engine.py [--runs 5] [--tokens 256] [--top-logprobs 20] [--threads N]

Both sides: SmolLM2-135M-Instruct Q4_1, greedy (temperature 0), repeat penalty 1.0,
one chat prompt through the model's own template, n_ctx 2048, all cores, CPU
unless llama.cpp offloads to a GPU. Per run:

- time to first token (TTFT): from the request to the first streamed text;
- decode tokens/s: tokens after the first, divided by the time after the first.

The direct side is `Llama.create_chat_completion(stream=True)`, the usual
llama-cpp-python path: the baseline every later overhead (engine, market,
gateway) is measured against. The prompt cache is reset before every run, so
TTFT includes prompt processing each time. Medians over all runs are printed.

A third side is the Engine with logprobs on (``SamplingParams.logprobs`` =
--top-logprobs): each token's logprob and its top alternatives are computed
from the logits in the generation thread, so this row shows what they cost;
the plain Engine row is logprobs off.

Each side runs in a fresh process, alternating (direct, engine, direct, engine
for --rounds 2): in one process, a llama.cpp model loaded after another was
closed decodes ~35% slower (measured; llama.cpp state we do not control), and
a worker loads its model once, so fresh processes are what production sees.
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


def direct(path: Path, runs: int, tokens: int, threads: int) -> list[tuple[float, float, int]]:
    from llama_cpp import Llama

    llama = Llama(str(path), n_ctx=2048, n_threads=threads, verbose=False)
    results = []
    for _ in range(runs):
        llama.reset()
        start = time.perf_counter()
        first = last = None
        count = 0
        for chunk in llama.create_chat_completion(
            MESSAGES, max_tokens=tokens, temperature=0.0, repeat_penalty=1.0, stream=True
        ):
            if chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                count += 1
        results.append((first - start, (count - 1) / (last - first), count))
    llama.close()
    return results


async def engine(
    path: Path, runs: int, tokens: int, threads: int, logprobs: int | None = None
) -> list[tuple[float, float, int]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, repeat_penalty=1.0, logprobs=logprobs)
    results = []
    async with open_engine(path, n_ctx=2048, threads=threads) as eng:
        for _ in range(runs):
            eng._llamas[0].reset()
            start = time.perf_counter()
            first = last = None
            async with eng.stream_chat(MESSAGES, params) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        done = event
                        continue
                    now = time.perf_counter()
                    first = first or now
                    last = now
            n = done.usage.completion_tokens
            results.append((first - start, (n - 1) / (last - first), n))
    return results


SIDES = {
    "direct": "llama-cpp-python, direct",
    "engine": "llmarket Engine",
    "logprobs": "llmarket Engine, logprobs on (top {k})",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per process")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per side, alternating")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--top-logprobs", type=int, default=20, help="k for the logprobs side")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: every core)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side, JSON out
    args = parser.parse_args()
    path = default_model_file()
    hw = probe_hardware()
    threads = args.threads or hw.cpu_cores
    if args.side:
        if args.side == "direct":
            run = direct(path, args.runs, args.tokens, threads)
        else:
            logprobs = args.top_logprobs if args.side == "logprobs" else None
            run = trio.run(engine, path, args.runs, args.tokens, threads, logprobs)
        print(json.dumps(run))
        return
    names = {side: name.format(k=args.top_logprobs) for side, name in SIDES.items()}
    rows: dict[str, list] = {name: [] for name in names.values()}
    for _ in range(args.rounds):
        for side, name in names.items():
            out = subprocess.run(
                [sys.executable, __file__, "--side", side, "--runs", str(args.runs), "--tokens", str(args.tokens),
                 "--top-logprobs", str(args.top_logprobs), "--threads", str(threads)],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            rows[name] += json.loads(out)
    runs = args.runs * args.rounds
    print(
        f"{hw.summary()}; llama.cpp GPU offload: {hw.gpu_offload}; {threads} threads; "
        f"{runs} runs per side of up to {args.tokens} tokens"
    )
    print("| path | TTFT (ms) | decode tokens/s | tokens |")
    print("|---|---:|---:|---:|")
    for name, results in rows.items():
        ttft = statistics.median(r[0] for r in results) * 1000
        rate = statistics.median(r[1] for r in results)
        count = statistics.median(r[2] for r in results)
        print(f"| {name} | {ttft:.0f} | {rate:.1f} | {count:.0f} |")


if __name__ == "__main__":
    main()
