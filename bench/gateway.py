"""The gateway against llama-cpp-python's own OpenAI-compatible server, same model, same run.

    .venv/bin/python bench/gateway.py [--runs 5] [--tokens 256]

Baseline: `python -m llama_cpp.server` on the default SmolLM2 model. It needs
`llama-cpp-python[server]`, whose dependencies conflict with brownie's exact pins
(python-dotenv), so it runs from its own virtualenv, `.venv-bench`, which this
script creates on first use (pip, from PyPI; the llama.cpp wheel comes from pip's
cache). Market: a free `llmarket serve` worker and `llmarket gateway`, all on
127.0.0.1. Both are driven by the official `openai` client with the same streaming
greedy chat requests (a different prompt per run, the same sequence on both sides),
alternating rounds; medians of time to first token and decode tokens/s (tokens
after the first over the time after the first, counted by the server's usage).
Both use all cores for llama.cpp (llama_cpp.server's own default is half of them).
Target: the gateway ≥ 95% of the baseline's tokens/s.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.inference.hardware import probe_hardware  # noqa: E402
from node.models.default import default_model_file  # noqa: E402

BENCH_VENV = ROOT / ".venv-bench"


def bench_python() -> str:
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        print("creating .venv-bench with llama-cpp-python[server] (once)…", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "llama-cpp-python[server]==0.3.36"], check=True)
    return str(python)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling interval
    raise RuntimeError(f"{url} did not come up")


def measure(base_url: str, model: str, runs: int, tokens: int, offset: int) -> list[tuple[float, float]]:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    out = []
    for i in range(runs):
        messages = [
            {"role": "user", "content": f"Story {offset + i}: write a long, detailed tale about a lighthouse keeper."}
        ]
        started = time.perf_counter()
        stamps, usage = [], None
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
        n = usage.completion_tokens if usage else len(stamps)
        out.append((stamps[0] - started, (n - 1) / (stamps[-1] - stamps[0])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    model = default_model_file()
    python = bench_python()
    results: dict[str, list] = {"llama_cpp.server": [], "llmarket gateway": []}
    cores = probe_hardware().cpu_cores  # the same threads as the worker's default (its server defaults to half)
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            port = free_port()
            server = subprocess.Popen(
                [python, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", "2048",
                 "--n_threads", str(cores), "--n_threads_batch", str(cores),
                 "--host", "127.0.0.1", "--port", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                wait_http(f"http://127.0.0.1:{port}/v1/models", server)
                results["llama_cpp.server"] += measure(
                    f"http://127.0.0.1:{port}/v1", "default", args.runs, args.tokens, rnd * args.runs
                )
            finally:
                server.terminate()
                server.wait()
            worker = subprocess.Popen(
                [sys.executable, "-m", "node", "--data-dir", f"{tmp}/w{rnd}", "serve", "--ctx-size", "2048"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            gateway = None
            try:
                addr = worker.stdout.readline().strip()
                gateway = subprocess.Popen(
                    [sys.executable, "-m", "node", "--data-dir", f"{tmp}/g{rnd}", "gateway", "--listen", "127.0.0.1:0",
                     "--bootstrap", addr],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                )  # fmt: skip
                base = gateway.stdout.readline().strip().split(" at ", 1)[1]
                results["llmarket gateway"] += measure(base, "default", args.runs, args.tokens, rnd * args.runs)
            finally:
                for proc in (gateway, worker):
                    if proc is not None:
                        proc.terminate()
                        proc.wait()
    print(
        f"{probe_hardware().summary()}; {args.runs * args.rounds} streamed chats per side, up to {args.tokens} tokens"
    )
    print("| server | TTFT (ms) | decode tokens/s |")
    print("|---|---:|---:|")
    for name, rows in results.items():
        ttft = 1000 * statistics.median(r[0] for r in rows)
        print(f"| {name} | {ttft:.0f} | {statistics.median(r[1] for r in rows):.1f} |")
    base, ours = (statistics.median(r[1] for r in rows) for rows in results.values())
    print(f"\ngateway = {ours / base:.1%} of llama_cpp.server's tokens/s (target ≥ 95%)")


if __name__ == "__main__":
    main()
