"""What the market adds on top of the engine: `request` to one loopback worker vs the engine directly.

    .venv/bin/python bench/overhead.py [--runs 5] [--rounds 2] [--tokens 256]

Same model (the default SmolLM2), same greedy parameters, the same sequence of
prompts (each run's prompt differs, so no run answers from a cache the other side
lacks). Each side runs in fresh processes, alternating:

- direct: `Engine.stream_chat` in the measuring process;
- market: a real `llmarket serve` process on 127.0.0.1, and `run_job` (the code behind
  `llmarket request`) in the measuring process, over libp2p (Noise, yamux).

Per run: time to first token (from the call to the first text) and decode tokens/s
(tokens after the first over the time after the first). Medians over all runs.
Targets: market decode ≥ 97% of direct, and ≤ 15 ms added to time to first token.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.app.requester import open_requester  # noqa: E402
from node.inference.engine import Delta, Finished, SamplingParams, open_engine  # noqa: E402
from node.inference.hardware import probe_hardware  # noqa: E402
from node.market.requester import JobObserver, JobSpec, run_job  # noqa: E402
from node.market.routing import Reputation, RouteQuery  # noqa: E402
from node.models.default import DEFAULT_MODEL_CID, default_model_file  # noqa: E402

logging.getLogger("libp2p").setLevel(logging.CRITICAL)


class TextTimes(JobObserver):
    """Notes when (``time.perf_counter()``) each piece of a job's text arrives, in ``stamps``."""

    def __init__(self, stamps: list[float]) -> None:
        self.stamps = stamps

    def on_text(self, piece: str) -> None:
        self.stamps.append(time.perf_counter())


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Story {i}: write a long, detailed tale about a lighthouse keeper."}]


async def direct(runs: int, params: SamplingParams, threads: int | None) -> list[tuple[float, float, int]]:
    out = []
    async with open_engine(default_model_file(), n_ctx=2048, threads=threads) as engine:
        for i in range(runs):
            started = time.perf_counter()
            first = last = None
            async with engine.stream_chat(prompt(i), params) as events:
                async for event in events:
                    if isinstance(event, Delta) and event.text:
                        last = time.perf_counter()
                        first = first or last
                    elif isinstance(event, Finished):
                        tokens = event.usage.completion_tokens
            out.append((first - started, (tokens - 1) / (last - first), tokens))
    return out


async def market(runs: int, params: SamplingParams, threads: int | None) -> list[tuple[float, float, int]]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--threads", str(threads)] if threads else []
        worker = subprocess.Popen(
            [sys.executable, "-m", "node", "--data-dir", f"{tmp}/w", "serve", "--ctx-size", "2048", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            addr = worker.stdout.readline().strip()
            async with open_requester(Path(tmp) / "r", (addr,)) as requester:
                await requester.wait_for_model(DEFAULT_MODEL_CID, 30)
                for i in range(runs):
                    stamps: list[float] = []
                    spec = JobSpec(model=DEFAULT_MODEL_CID, params=params, messages=prompt(i))
                    started = time.perf_counter()
                    result = await run_job(
                        requester.host, requester.offers, RouteQuery(model=DEFAULT_MODEL_CID, free_only=True), spec,
                        reputation=Reputation(), observer=TextTimes(stamps),
                    )  # fmt: skip
                    tokens = result.completion_tokens
                    out.append((stamps[0] - started, (tokens - 1) / (stamps[-1] - stamps[0]), tokens))
        finally:
            worker.terminate()
            worker.wait()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, help="llama.cpp threads on both sides (default: all cores)")
    parser.add_argument("--side", choices=("direct", "market"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, repeat_penalty=1.0)
    if args.side:
        print(json.dumps(trio.run(direct if args.side == "direct" else market, args.runs, params, args.threads)))
        return
    results: dict[str, list] = {"direct": [], "market": []}
    for _ in range(args.rounds):
        for side in results:
            out = subprocess.run(
                [sys.executable, __file__, "--side", side, "--runs", str(args.runs), "--tokens", str(args.tokens),
                 *(["--threads", str(args.threads)] if args.threads else [])],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            results[side] += json.loads(out.strip().splitlines()[-1])
    med = {side: [statistics.median(r[k] for r in rows) for k in range(3)] for side, rows in results.items()}
    threads = args.threads or probe_hardware().cpu_cores
    print(f"{probe_hardware().summary()}; llama.cpp threads {threads}; {args.runs * args.rounds} runs per side, "
          f"up to {args.tokens} tokens, greedy")  # fmt: skip
    print("| path | TTFT (ms) | decode tokens/s | tokens |")
    print("|---|---:|---:|---:|")
    for side, (ttft, rate, tokens) in med.items():
        print(f"| {side} | {1000 * ttft:.1f} | {rate:.1f} | {tokens:.0f} |")
    added = 1000 * (med["market"][0] - med["direct"][0])
    ratio = med["market"][1] / med["direct"][1]
    print(f"\nmarket decode = {ratio:.1%} of direct (target ≥ 97%); TTFT added = {added:+.1f} ms (target ≤ 15 ms)")


if __name__ == "__main__":
    main()
