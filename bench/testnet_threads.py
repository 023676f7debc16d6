"""Several workers on one machine: aggregate tokens/s of two workers under concurrent streams, each worker with
every core (``--threads <cores>``, serve's default, and the testnet's before issue 22) against the cores divided
among the workers (``testnet up``'s default now: ``max(1, cores // workers)`` each, ``threads_per_worker``).

    .venv/bin/python bench/testnet_threads.py [--streams 8] [--tokens 64] [--rounds 2] [--repeat 1]

The workers are started as ``testnet up`` starts them (``llmarket serve`` processes on loopback, the second
bootstrapped to the first, ``--threads`` given), but free: the payment scheme costs the same in both modes and is
left out, so the bench does not depend on it. A requester in this process runs a warm-up round, then
``--rounds`` timed rounds of ``--streams`` greedy chat jobs at once, half pinned to each worker, so that both
workers decode at the same time (the gateway's router would send a burst to the cheaper worker first, while it has
free slots). A round's figure is the completion tokens of all its jobs over its wall time; the median round is
reported, with the median job's tokens/s. With ``--repeat`` above 1 the modes alternate (before, after, before,
…), since the machine may be shared and its load drifts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.app.requester import open_requester  # noqa: E402
from node.dev.testnet import threads_per_worker  # noqa: E402
from node.errors import NodeError  # noqa: E402
from node.inference.sampling import SamplingParams  # noqa: E402
from node.market.requester import JobSpec, Timeouts, run_job  # noqa: E402
from node.market.routing import RouteQuery  # noqa: E402
from node.models.default import DEFAULT_MODEL_CID  # noqa: E402

#: A slow worker is measured, not failed over (a requester's defaults give up after 10 s without a token).
PATIENT = Timeouts(accept_s=120, first_token_s=300, progress_s=300)

PROMPTS = [
    "Write a long story about a dragon.",
    "Describe a lighthouse at night.",
    "Explain how rain forms.",
    "Tell me about the history of bread.",
]


def start_worker(data_dir: Path, threads: int, bootstrap: str | None) -> tuple[subprocess.Popen, str]:
    """``llmarket serve`` as ``testnet up`` starts a worker (free here); returns (process, multiaddr)."""
    cmd = [
        sys.executable, "-m", "node", "--data-dir", str(data_dir), "serve", "--model", "default",
        "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--threads", str(threads),
    ]  # fmt: skip
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    data_dir.mkdir(parents=True)
    err = open(data_dir / "serve.err", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()  # the first address it prints, once it serves
    if not line.startswith("/"):
        proc.kill()
        raise SystemExit(f"the worker did not start: {(data_dir / 'serve.err').read_text()[-600:]}")
    return proc, line


async def _rounds(addrs: list[str], data_dir: Path, streams: int, tokens: int, rounds: int) -> list:
    async with open_requester(data_dir, tuple(addrs)) as requester:
        with trio.fail_after(60):
            await requester.gossip.wait_for(lambda live: len(live) >= len(addrs))
        peers = [a.rsplit("/p2p/", 1)[1] for a in addrs]

        async def job(i: int, results: list) -> None:
            spec = JobSpec(
                model=DEFAULT_MODEL_CID,
                params=SamplingParams(max_tokens=tokens, temperature=0.0),
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            )
            query = RouteQuery(model=DEFAULT_MODEL_CID, pinned_peer=peers[i % len(peers)], free_only=True)
            try:
                results.append(
                    await run_job(
                        requester.host, requester.offers, query, spec, reputation=requester.reputation,
                        deadline_s=600, timeouts=PATIENT,
                    )
                )  # fmt: skip
            except NodeError as err:  # counted as no tokens, and said
                print(f"  a job failed: {err}", file=sys.stderr)

        out = []
        for r in range(rounds + 1):  # round 0: the warm-up, not counted
            results: list = []
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(streams):
                    nursery.start_soon(job, i, results)
            wall = time.perf_counter() - started
            total = sum(res.completion_tokens for res in results)
            per_job = [res.completion_tokens / res.elapsed_s for res in results if res.elapsed_s > 0]
            print(
                f"  round {r}{' (warm-up)' if r == 0 else ''}: {total} tokens in {wall:.1f} s = "
                f"{total / wall:.1f} tokens/s; jobs {statistics.median(per_job):.1f} tokens/s (median)",
                file=sys.stderr,
            )
            if r:
                out.append((total / wall, per_job))
        return out


def run_mode(name: str, threads: int, args) -> tuple[float, float]:
    print(f"{name}: 2 workers, {threads} thread(s) each", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=f"bench-threads-{name}-") as tmp:
        procs = []
        try:
            first, addr1 = start_worker(Path(tmp) / "worker-1", threads, None)
            procs.append(first)
            second, addr2 = start_worker(Path(tmp) / "worker-2", threads, addr1)
            procs.append(second)
            rounds = trio.run(_rounds, [addr1, addr2], Path(tmp) / "requester", args.streams, args.tokens, args.rounds)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=60)
    aggregate = statistics.median(r[0] for r in rounds)
    job = statistics.median(t for r in rounds for t in r[1])
    return aggregate, job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="before/after pairs, alternating")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    figures: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for _ in range(args.repeat):
        figures["before"].append(run_mode("before", cores, args))  # every worker takes every core
        figures["after"].append(run_mode("after", threads_per_worker(cores, 2), args))  # testnet up's default
    print(f"\n{cores} cores, 2 workers, {args.streams} streams of {args.tokens} tokens (half on each worker)")
    for name, runs in figures.items():
        threads = cores if name == "before" else threads_per_worker(cores, 2)
        aggregates = ", ".join(f"{a:.1f}" for a, _ in runs)
        jobs = ", ".join(f"{j:.1f}" for _, j in runs)
        print(f"  {name:<6} --threads {threads}: aggregate {aggregates} tokens/s; median job {jobs} tokens/s")


if __name__ == "__main__":
    main()
