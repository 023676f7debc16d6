"""Throughput under load: llmarket's engines and a real worker against llama.cpp's own llama-server.

    .venv/bin/python bench/throughput.py [--streams 1 2 4 8] [--tokens 128] [--rounds 3] [--skip-market]
    .venv/bin/python bench/throughput.py --prefix [--rounds 3]      # one shared system prompt, reuse on/off
    .venv/bin/python bench/throughput.py --chunks 64 128 256 512    # the prefill chunk's effect

The anchor is `llama-server` (continuous batching, `--parallel 8`), built once from
the llama.cpp that llama-cpp-python 0.3.36 vendors (the engine's own llama.cpp), into
`.bench/` (not a dependency of the node; no web UI, no downloads). Then, for each
number of concurrent streams of greedy chat answers of up to --tokens tokens (a
different prompt per stream):

- `llama-server`, over its OpenAI-compatible HTTP API;
- the batched engine in-process (`open_engine(kind="batched", slots=8)`, every core);
- today's per-slot engine in-process (`kind="contexts"`, one context per stream, cores split);
- a real `llmarket serve --engine batched --slots 8` behind `llmarket gateway`, through the
  market, over the same HTTP API (skip with --skip-market).

Each configuration runs in a fresh process. Reported: aggregate tokens/s (all
completion tokens over the wall time from the first request to the last answer),
TTFT p50/p95, and the resident set size of the serving process. A shared 2-core VM
moves from run to run by 20-30%, so every figure is the median of --rounds rounds,
the systems taking turns within each round; the spread (min-max) is printed beside it.

--prefix: 8 streams at once, each a ~1,400-token system prompt (the same for all)
and its own question, 32-token answers: TTFT and throughput with the batched
engine's prefix reuse on and off, the per-slot engine and llama-server.

--chunks: 4 streams decoding when a ~1,400-token prompt arrives; for each prefill
chunk size, the decoding streams' longest and p95 gap between tokens while it is
prefilled, and the long prompt's TTFT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_DIR = ROOT / ".bench"
LLAMA_CPP_PYTHON = "0.3.36"
TOPICS = ["a lighthouse keeper", "a market town", "a river barge", "a clockmaker", "a mountain pass",
          "a night train", "a beekeeper", "a harbour in winter"]  # fmt: skip
SLOTS = 8
CTX = 2048  # per sequence


WARM_UP = [{"role": "user", "content": "Say hello."}]  # not one of the measured prompts: no cache hit


# ~1,400 tokens: a shared system prompt (--prefix), a long prompt (--chunks)
DOCUMENT = " ".join(
    f"Record {k}: the cooperative shipped {k * 13} crates of apples and {k * 5} barrels of cider to the "
    f"{['northern', 'southern', 'eastern', 'western'][k % 4]} depot, and noted the weather as "
    f"{['fair', 'wet', 'windy', 'cold'][k % 3]}."
    for k in range(1, 40)
)


def messages(k: int, workload: str = "plain") -> list[dict]:
    if workload == "prefix":
        question = f"In one paragraph: what does the ledger say about {TOPICS[k % 8]}?"
        return [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": question}]
    if workload == "long":
        return [{"role": "user", "content": DOCUMENT + " Summarise the records."}]
    return [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[k % len(TOPICS)]}."}]


# ----------------------------------------------------------- the anchor


def llama_server(cuda: bool = False) -> Path:
    """Build llama-server from llama-cpp-python's sdist (vendor/llama.cpp) once, with CUDA where the engine
    offloads to a GPU (as scripts/setup builds llama-cpp-python); its path."""
    build = BENCH_DIR / ("llama.cpp-build-cuda" if cuda else "llama.cpp-build")
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    BENCH_DIR.mkdir(exist_ok=True)
    sdist = BENCH_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        print("downloading llama-cpp-python's sdist from PyPI (once)…", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(BENCH_DIR)], check=True)  # fmt: skip
    source = BENCH_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not source.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(BENCH_DIR, filter="data")
    print("building llama-server (once, ~10 min on 2 cores)…", file=sys.stderr)
    subprocess.run(
        ["cmake", "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
         f"-DGGML_CUDA={'ON' if cuda else 'OFF'}"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited early")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling interval
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s")


def drive_http(
    base_url: str, model: str, streams: int, tokens: int, *, warm_up: bool = False, workload: str = "plain"
) -> dict:
    """``streams`` concurrent streaming chat requests; aggregate tokens/s and TTFT percentiles."""
    import httpx

    ttft: list[float] = []
    produced: list[int] = []

    def one(k: int) -> None:
        body = {"model": model, "messages": WARM_UP if warm_up else messages(k, workload), "max_tokens": tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        start, first, usage, chunks = time.perf_counter(), None, None, 0
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    usage = data["usage"]["completion_tokens"]
                for choice in data.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        chunks += 1
                        first = first or time.perf_counter() - start
        ttft.append(first or float("nan"))
        produced.append(usage if usage is not None else chunks)

    began = time.perf_counter()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(sum(produced), time.perf_counter() - began, ttft)


def summary(tokens: int, wall: float, ttft: list[float]) -> dict:
    ordered = sorted(ttft)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50_ms": 1000 * statistics.median(ordered),
            "ttft_p95_ms": 1000 * p95}  # fmt: skip


def sweep_llama_server(
    model: Path, streams: list[int], tokens: int, threads: int, workload: str = "plain"
) -> tuple[list[dict], float]:
    from node.inference.hardware import probe_hardware

    port = free_port()
    profile = probe_hardware()
    gpu = bool(profile.gpu_offload and profile.gpus)  # then the engines offload every layer: so does the anchor
    cmd = [str(llama_server(gpu)), "-m", str(model), "--port", str(port), "--host", "127.0.0.1", "-c", str(CTX * SLOTS),
           "--parallel", str(SLOTS), "-t", str(threads), "-tb", str(threads), "-fa", "on",
           "-ngl", "999" if gpu else "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        drive_http(f"http://127.0.0.1:{port}", "default", 1, 8, warm_up=True)
        rows = [drive_http(f"http://127.0.0.1:{port}", "default", n, tokens, workload=workload) for n in streams]
        return rows, rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


# ------------------------------------------------------ llmarket's engines


def measure_engine(kind: str, streams: int, tokens: int, workload: str = "plain", option: int = 0) -> dict:
    """In this process: ``streams`` jobs at once on a fresh engine of ``kind`` (``option``: prefix reuse on
    for ``prefix``, the prefill chunk for ``chunk``)."""
    import trio

    from node.inference.engine import open_engine
    from node.inference.sampling import Delta, Finished, SamplingParams
    from node.models.default import default_model_file

    params = SamplingParams(max_tokens=tokens, temperature=0.0, repeat_penalty=1.0)
    slots = SLOTS if kind == "batched" else streams + (workload == "chunk")
    extra = {"reuse_prefixes": bool(option)} if kind == "batched" and workload == "prefix" else {}

    async def run() -> dict:
        async with open_engine(default_model_file(), slots=slots, n_ctx=CTX, kind=kind, **extra) as engine:
            if workload == "chunk":
                engine._scheduler.prefill_chunk = option
            await engine.complete_chat(WARM_UP, SamplingParams(max_tokens=8, temperature=0))
            ttft: list[float] = []
            gaps: list[float] = []  # between a decoding stream's tokens while the long prompt was prefilled
            produced = 0
            long_started = trio.Event()
            long_first: list[float] = []

            async def job(k: int, chat: list[dict], p: SamplingParams, *, long: bool = False) -> None:
                nonlocal produced
                start, first, last = time.perf_counter(), None, None
                async with engine.stream_chat(chat, p) as events:
                    async for event in events:
                        now = time.perf_counter()
                        if isinstance(event, Finished):
                            produced += event.usage.completion_tokens
                            continue
                        if not isinstance(event, Delta) or not event.tokens:
                            continue
                        if first is None:
                            first = now - start
                            if long:
                                long_first.append(first)
                        if last is not None and long_started.is_set() and not long_first:
                            gaps.append((now - last) / event.tokens)
                        last = now
                        if workload == "chunk" and not long and k == 0 and not long_started.is_set():
                            nursery.start_soon(long_job)
                            long_started.set()
                if not long:
                    ttft.append(first if first is not None else float("nan"))

            async def long_job() -> None:
                await job(-1, messages(0, "long"), SamplingParams(max_tokens=8, temperature=0.0), long=True)

            began = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for k in range(streams):
                    nursery.start_soon(job, k, messages(k, "prefix" if workload == "prefix" else "plain"), params)
            result = summary(produced, time.perf_counter() - began, ttft)
            if workload == "chunk":
                ordered = sorted(gaps)
                result.update(gap_max_ms=1000 * ordered[-1], gap_p95_ms=1000 * ordered[int(0.95 * (len(ordered) - 1))],
                              long_ttft_ms=1000 * long_first[0])  # fmt: skip
            if kind == "batched":
                result["reused_tokens"] = engine._scheduler.reused_tokens
            return {**result, "threads": engine.threads, "rss_mib": rss_mib(os.getpid())}

    return trio.run(run)


def sweep_engine(kind: str, streams: list[int], tokens: int, workload: str = "plain", option: int = 0) -> list[dict]:
    rows = []
    for n in streams:
        out = subprocess.run([sys.executable, __file__, "--internal", kind, str(n), str(tokens), workload, str(option)],
                             check=True, capture_output=True, text=True)  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


# ------------------------------------------------------------ the market


def sweep_market(streams: list[int], tokens: int) -> tuple[list[dict], float]:
    """A real batched worker and a gateway on 127.0.0.1, driven over the gateway's HTTP API."""
    import tempfile

    llmarket = [sys.executable, "-m", "node"]
    home = Path(tempfile.mkdtemp(prefix="llmarket-throughput-"))
    worker = subprocess.Popen(
        [*llmarket, "--data-dir", str(home / "w"), "serve", "--engine", "batched", "--slots", str(SLOTS),
         "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    gateway = None
    try:
        line = ""
        while "/p2p/" not in line:
            line = worker.stdout.readline()
            if not line and worker.poll() is not None:
                raise RuntimeError("llmarket serve exited early")
        port = free_port()
        gateway = subprocess.Popen(
            [*llmarket, "--data-dir", str(home / "g"), "gateway", "--listen", f"127.0.0.1:{port}", "--no-mdns",
             "--bootstrap", line.strip(), "--spot-check", "0", "--timeout", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/health", gateway)
        import httpx

        while httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["workers"] < 1:
            time.sleep(0.2)  # until the worker's offer arrived
        drive_http(f"http://127.0.0.1:{port}", "default", 1, 8, warm_up=True)
        rows = [drive_http(f"http://127.0.0.1:{port}", "default", n, tokens) for n in streams]
        return rows, rss_mib(worker.pid)
    finally:
        for proc in (gateway, worker):
            if proc is not None:
                proc.terminate()
                proc.wait()
        shutil.rmtree(home, ignore_errors=True)


# ------------------------------------------------------------------ main


def rounds(systems: dict, n_rounds: int) -> dict[str, list[list[dict]]]:
    """Run every system once per round, taking turns (the order rotates each round): name -> rounds of rows."""
    runs: dict[str, list[list[dict]]] = {name: [] for name in systems}
    names = list(systems)
    for r in range(n_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            print(f"round {r + 1}/{n_rounds}: {name}…", file=sys.stderr, flush=True)
            runs[name].append(systems[name]())
    return runs


def median_row(rows: list[dict]) -> dict:
    """Per key, the median over rounds; tokens/s also as min-max."""
    out = {
        key: statistics.median(row[key] for row in rows) for key in rows[0] if isinstance(rows[0][key], (int, float))
    }
    out["spread"] = f"{min(r['tokens_per_s'] for r in rows):.0f}-{max(r['tokens_per_s'] for r in rows):.0f}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="medians over this many interleaved rounds")
    parser.add_argument("--skip-market", action="store_true")
    parser.add_argument("--prefix", action="store_true", help="a shared system prompt: prefix reuse on and off")
    parser.add_argument("--chunks", type=int, nargs="+", help="prefill chunk sizes to compare")
    parser.add_argument("--internal", nargs=5, help=argparse.SUPPRESS)  # kind streams tokens workload option
    args = parser.parse_args()
    if args.internal:
        kind, streams, tokens, workload, option = args.internal
        print(json.dumps(measure_engine(kind, int(streams), int(tokens), workload, int(option))))
        return
    from node.inference.hardware import probe_hardware
    from node.models.default import default_model_file

    profile = probe_hardware()
    threads = profile.cpu_cores
    model = default_model_file()
    print(f"{profile.summary()}; medians of {args.rounds} rounds; {SLOTS} slots of {CTX} tokens")
    if args.chunks:
        print("4 streams of 128 greedy tokens; a ~1,400-token prompt arrives once they decode")
        systems = {c: lambda c=c: sweep_engine("batched", [4], 128, "chunk", c)[0] for c in args.chunks}
        runs = rounds(systems, args.rounds)
        print("| prefill chunk | longest gap (ms) | p95 gap (ms) | long prompt TTFT (ms) | aggregate tokens/s |")
        print("|---:|---:|---:|---:|---:|")
        for c, rows in runs.items():
            m = median_row(rows)
            print(f"| {c} | {m['gap_max_ms']:.0f} | {m['gap_p95_ms']:.0f} | {m['long_ttft_ms']:.0f} "
                  f"| {m['tokens_per_s']:.1f} ({m['spread']}) |")  # fmt: skip
        return
    if args.prefix:
        print("8 streams at once: one ~1,400-token system prompt, each its own question; 32 greedy tokens")
        systems = {
            "llama-server": lambda: sweep_llama_server(model, [8], 32, threads, "prefix")[0][0],
            "batched, prefix reuse": lambda: sweep_engine("batched", [8], 32, "prefix", 1)[0],
            "batched, no reuse": lambda: sweep_engine("batched", [8], 32, "prefix", 0)[0],
            "per-slot engine": lambda: sweep_engine("contexts", [8], 32, "prefix")[0],
        }
        runs = rounds(systems, args.rounds)
        print("| system | TTFT p50 (ms) | TTFT p95 (ms) | aggregate tokens/s |")
        print("|---|---:|---:|---:|")
        for name, rows in runs.items():
            m = median_row(rows)
            ttft = f"{m['ttft_p50_ms']:.0f} | {m['ttft_p95_ms']:.0f}"
            print(f"| {name} | {ttft} | {m['tokens_per_s']:.1f} ({m['spread']}) |")
        return
    rss: dict[str, float] = {}

    def server() -> list[dict]:
        rows, rss["llama-server"] = sweep_llama_server(model, args.streams, args.tokens, threads)
        return rows

    def market() -> list[dict]:
        rows, rss["llmarket serve"] = sweep_market(args.streams, args.tokens)
        return rows

    systems = {"llama-server": server, "batched engine": lambda: sweep_engine("batched", args.streams, args.tokens),
               "per-slot engine": lambda: sweep_engine("contexts", args.streams, args.tokens)}  # fmt: skip
    if not args.skip_market:
        systems["llmarket serve (batched) via gateway"] = market
    runs = rounds(systems, args.rounds)
    table = {name: [median_row([r[i] for r in rs]) for i in range(len(args.streams))] for name, rs in runs.items()}
    print("| system | streams | aggregate tokens/s (min-max) | vs llama-server | TTFT p50 (ms) | TTFT p95 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows in table.items():
        for n, row, anchor in zip(args.streams, rows, table["llama-server"], strict=True):
            print(f"| {name} | {n} | {row['tokens_per_s']:.1f} ({row['spread']}) "
                  f"| {row['tokens_per_s'] / anchor['tokens_per_s']:.0%} "
                  f"| {row['ttft_p50_ms']:.0f} | {row['ttft_p95_ms']:.0f} |")  # fmt: skip
    for name in ("batched engine", "per-slot engine"):
        rss[name] = max(row["rss_mib"] for rs in runs[name] for row in rs)
    print("resident set size (MiB):", json.dumps(rss))


if __name__ == "__main__":
    main()
