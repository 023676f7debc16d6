"""Across machines: jobs direct, through a relay, and after a DCUtR upgrade, between network namespaces.

    sudo .venv/bin/python bench/network.py [--jobs 5] [--rounds 2] [--tokens 128] [--tries 20] [--threads 1] [--quick]

Needs root, ``ip`` and ``nft`` (tests/netlab.py builds the lab: a bridge as the
internet, nftables NAT routers). Every node is a separate process in its own
namespace, all on this machine's cores:

- ``relay``: a public ``llmarket serve`` (the default model), the bootstrap peer of
  everyone and the relay of the private workers (public workers relay by default);
- ``req``: a public host where each requester runs, in a fresh process with a fresh
  data dir (``--side``, below): ``open_requester`` + ``run_job``, the code behind
  ``llmarket request``, listening on 0.0.0.0 like the CLI (or, where said, on
  127.0.0.1 only: a requester that accepts no inbound connection);
- workers (``llmarket serve --threads T``): ``pub`` on a public host, ``sym`` behind
  a ``masquerade random`` router (symmetric NAT: no hole punching) and ``eim``
  behind a ``masquerade`` router (endpoint-independent mapping).

``--threads 1`` (default) leaves one core to the relay and the requester, which are
Python processes on the same two cores; with llama.cpp on both cores the relayed
case would measure CPU contention more than the relay.

1. Speed. Per round and case (cases alternate), one requester joins through the
   relay and connects to the worker (``--peer``):
   ``direct``: the public worker;
   ``relayed``: the symmetric-NAT worker, from a requester that accepts no inbound
   connection (a listening public requester would be dialled directly by the
   worker, DCUtR's first step, see part 3); it waits 5 s (DCUtR tries every 2 s)
   and checks that the connection is still relayed;
   ``upgraded``: the eim-NAT worker; it waits until DCUtR has made the connection
   direct by itself (nothing asks for it).
   Then one untimed warm-up job, ``--jobs`` short jobs ("Say hello.", 8 tokens:
   TTFT with little prompt to evaluate, so mostly the path) and ``--jobs`` long jobs
   (the same prompt of a few hundred tokens, up to ``--tokens`` tokens; the worker
   evaluates it whole every time, as its KV cache reuses only whole 512-token
   batches), all greedy. TTFT: from ``run_job`` to the first text. Decode tokens/s:
   (completion tokens − 1) / (last text − first text), as bench/overhead.py. The
   connection kind is read before and after each job, and the worker's log must say
   "accepted (<kind> connection)" for every job. CPU seconds of the relay, the
   worker and the requester are read around the long jobs. Medians over all jobs.
   Targets: relayed decode ≥ 90% of direct; relayed TTFT ≤ direct + 50 ms.
2. Reachability of a private worker (behind the eim NAT), ``--reach`` fresh workers
   per row: a requester already joined through the relay either pings the worker
   at ``<relay>/p2p-circuit/p2p/<worker>`` every 0.1 s, or waits for its offer and
   runs an 8-token job as soon as it has one (separate workers, so that the pings'
   connection does not help the job). Counted from the ``serve`` process start,
   from its host listening (a TCP listener in its namespace, ``ss``: before the
   model loads) and from its "bootstrap others with:" line (model loaded and
   measured). Target: reachable ≤ 5 s after it starts.
3. Upgrade and fallback, ``--tries`` fresh requesters (process and data dir) for
   each of: the eim worker; the sym worker from a listening requester; the sym
   worker from a requester that accepts no inbound connection. Each dials (through
   the relay), runs an 8-token job, waits until the connection is direct or 10 s
   after the dial, and runs a second 8-token job. eim succeeds when the connection
   became direct and the worker accepted the second job on it (target 20/20); sym
   with no inbound when both jobs completed over the relay (target 20/20); sym from
   a listening requester is reported as it comes.

It prints the machine, the load on it and results tables; it writes nothing but its
output (the lab's logs go to a temporary directory, removed at the end unless
``--keep-logs``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEED_CASES = ("direct", "relayed", "upgraded")
WORKER_OF = {"direct": "pub", "relayed": "sym", "upgraded": "eim"}
UPGRADE_WAIT_S = 10.0  # part 3: how long a try waits for DCUtR
SYM_SETTLE_S = 5.0  # part 1: how long the relayed case gives DCUtR before it checks the connection is still relayed
PROMPT = (
    "Here is the opening of a story. Read it, then continue it in the same voice, with the keeper's next night "
    "at the lighthouse.\n\n"
    "The lighthouse at Carrow Point stood on a shelf of black rock a mile from the mainland, and for eleven "
    "years Elias Thorne had kept its lamp. He knew the sea by its sounds: the long hush of the ebb across the "
    "shingle, the hollow knock of the swell in the cave beneath the tower, the hiss that came before a squall. "
    "Every evening he climbed the hundred and twelve steps with a can of paraffin and a rag, trimmed the wick, "
    "polished the great lens until it threw his own face back at him in a hundred pieces, and wound the clockwork "
    "that turned the light. Every morning he wrote the weather in the log: wind, sea, visibility, the ships that "
    "had passed. In eleven years he had never missed a night. The supply boat came once a fortnight, when the "
    "weather allowed, bringing flour, tea, oil, letters and the newspapers of the week before. The boatman, a "
    "quiet man called Pell, would stay for one cup of tea and then leave before the tide turned. That autumn the "
    "boat did not come. The first week Elias told himself it was the gales. The second week he rationed the tea. "
    "In the third week, on a still grey evening with the sea flat as slate, he saw a light on the water to the "
    "south, low and yellow, where no ship should be, moving against the current toward the rocks."
)
SHORT_PROMPT = "Say hello."  # parts 2 and 3: small jobs


# ---------------------------------------------------------------- requester side (runs inside a namespace)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def requester_side(args: argparse.Namespace) -> None:
    import logging

    import trio

    from node.app.requester import open_requester
    from node.inference.sampling import SamplingParams
    from node.market.requester import JobObserver, JobSpec, run_job
    from node.market.routing import RouteQuery
    from node.models.default import DEFAULT_MODEL_CID
    from node.net.host import HostConfig

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    if args.verbose:  # for looking into a failed try: hole punching and relaying, on stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(name)s %(message)s", "%H:%M:%S"))
        for name in ("libp2p.relay.circuit_v2.dcutr", "node.net.nat", "node.net.relay", "node.net.dcutr"):
            logging.getLogger(name).setLevel(logging.DEBUG)
            logging.getLogger(name).addHandler(handler)
    listen = "/ip4/127.0.0.1/tcp/0" if args.listen == "loopback" else "/ip4/0.0.0.0/tcp/0"
    network = HostConfig(listen=(listen,), bootstrap=(args.bootstrap,), mdns=False)
    peer = args.peer
    query = RouteQuery(model=DEFAULT_MODEL_CID, free_only=True, pinned_peer=peer)

    async with open_requester(Path(args.data_dir), network=network) as req:
        host = req.host
        emit(event="ready", at=time.monotonic(), peer_id=req.host.peer_id)

        def offer_of_peer():
            return next((o for o in req.offers() if o.peer_id == peer), None)

        async def job(prompt: str, tokens: int, deadline_s: float = 120.0) -> dict:
            params = SamplingParams(max_tokens=tokens, temperature=0.0, repeat_penalty=1.0)
            spec = JobSpec(model=DEFAULT_MODEL_CID, params=params, messages=[{"role": "user", "content": prompt}])
            stamps: list[float] = []

            class TextTimes(JobObserver):
                def on_text(self, piece: str) -> None:
                    stamps.append(time.perf_counter())

            before = host.connection_kind(peer)
            started = time.perf_counter()
            result = await run_job(
                req.host, req.offers, query, spec, reputation=req.reputation, deadline_s=deadline_s,
                observer=TextTimes(),
            )  # fmt: skip
            n = result.completion_tokens
            return {
                "ttft_s": stamps[0] - started,
                "decode_tps": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else None,
                "tokens": n,
                "prompt_tokens": result.prompt_tokens,
                "before": before,
                "after": host.connection_kind(peer),
                "workers": result.workers,
            }

        async def wait_direct(timeout_s: float) -> float | None:
            """Poll (without asking DCUtR for anything) until the connection to the worker is direct."""
            started = time.monotonic()
            while time.monotonic() - started < timeout_s:
                if host.connection_kind(peer) == "direct":
                    return time.monotonic() - started
                await trio.sleep(0.05)
            return None

        if args.side == "ping":  # part 2: ping through the relay until the worker answers
            circuit = f"{args.bootstrap}/p2p-circuit"  # Host.dial adds /p2p/<peer>
            failures, errors = 0, set()
            with trio.move_on_after(args.timeout):
                while True:
                    try:
                        with trio.fail_after(2):
                            rtt = await req.host.ping(peer, [circuit])
                        emit(event="done", at=time.monotonic(), rtt_ms=rtt, failures=failures)
                        return
                    except Exception as err:
                        failures += 1
                        if str(err)[:100] not in errors:
                            errors.add(str(err)[:100])
                            emit(event="failure", at=time.monotonic(), error=repr(err)[:300])
                        await trio.sleep(0.1)
            emit(event="done", at=None, failures=failures)
            return

        if args.side == "first-job":  # part 2: a job as soon as the worker's offer arrives
            offer_at, offer_addrs, failures = None, [], 0
            with trio.move_on_after(args.timeout):
                while True:
                    offer = offer_of_peer()
                    if offer is None:
                        await trio.sleep(0.05)
                        continue
                    if offer_at is None:
                        offer_at, offer_addrs = time.monotonic(), list(offer.addrs)
                    try:
                        done = await job(SHORT_PROMPT, 8, deadline_s=10)
                        emit(event="done", at=time.monotonic(), offer_at=offer_at, offer_addrs=offer_addrs,
                             failures=failures, connection=done["before"] or done["after"])  # fmt: skip
                        return
                    except Exception as err:
                        failures += 1
                        emit(event="failure", at=time.monotonic(), error=str(err)[:200])
                        await trio.sleep(0.2)
            emit(event="done", at=None, offer_at=offer_at, offer_addrs=offer_addrs, failures=failures)
            return

        # parts 1 and 3: the worker is already serving
        await req.wait_for_model(DEFAULT_MODEL_CID, 30)
        offer = offer_of_peer()
        if offer is None:
            emit(event="done", error=f"no offer from {peer} within 30 s")
            return
        dial_started = time.monotonic()
        went_direct: list[float] = []

        async def watch() -> None:  # when the connection first became direct, from the dial
            while host.connection_kind(peer) != "direct":
                await trio.sleep(0.02)
            went_direct.append(time.monotonic() - dial_started)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await req.host.dial(peer, list(offer.addrs))
            out = {"event": "done", "dial_s": time.monotonic() - dial_started, "dialled": host.connection_kind(peer)}
            if args.side == "speed":
                if args.want == "direct":
                    await wait_direct(20.0)
                elif args.want == "relayed":
                    await trio.sleep(SYM_SETTLE_S)
                out["settled"] = host.connection_kind(peer)
                out["warmup"] = await job(PROMPT, 8)
                out["short"] = [await job(SHORT_PROMPT, 8) for _ in range(args.jobs)]
                pids = [int(p) for p in args.pids.split(",")]
                cpu = [cpu_seconds(p) for p in pids] + [time.process_time()]
                out["jobs"] = [await job(PROMPT, args.tokens) for _ in range(args.jobs)]
                after = [cpu_seconds(p) for p in pids] + [time.process_time()]
                out["cpu_s"] = [b - a for a, b in zip(cpu, after, strict=True)]  # relay, worker, requester
            else:  # "try": DCUtR gets until --upgrade-wait after the dial, or the end of the first job
                out["first"] = await job(SHORT_PROMPT, 8)
                await wait_direct(args.upgrade_wait - (time.monotonic() - dial_started))
                out["second"] = await job(SHORT_PROMPT, 8)
            out["direct_after_s"] = went_direct[0] if went_direct else None
            nursery.cancel_scope.cancel()
        emit(**out)


# ---------------------------------------------------------------- the lab side


class Bench:
    def __init__(self, lab, tmp: Path, threads: int) -> None:
        self.lab, self.tmp, self.threads = lab, tmp, threads
        self.counter = 0
        self.relay_host = lab.public_host("relay")
        self.req_host = lab.public_host("req")
        self.pub_host = lab.public_host("pub")
        self.eim_router = lab.nat_router("eimnat", kind="eim")
        self.sym_router = lab.nat_router("symnat", kind="symmetric")
        self.eim_host = self.eim_router.home_host("w")
        self.sym_host = self.sym_router.home_host("w")
        self.relay, self.relay_addr = None, None

    def data_dir(self, name: str) -> Path:
        self.counter += 1
        return self.tmp / f"{name}-{self.counter}"

    def serve(self, host, name: str, threads: int | None = None):
        """Start ``llmarket serve`` in ``host``; returns (proc, peer id, monotonic start)."""
        from node.net.identity import Identity

        data_dir = self.data_dir(name)
        peer_id = Identity.load(data_dir).peer_id  # the key it will use, made before it starts
        argv = [sys.executable, "-m", "node", "--data-dir", data_dir, "serve", "--no-mdns",
                "--threads", str(threads or self.threads)]  # fmt: skip
        if self.relay_addr:
            argv += ["--bootstrap", self.relay_addr]
        started = time.monotonic()
        proc = host.spawn(argv, cwd=ROOT, label=name)
        return proc, peer_id, started

    def start_relay(self) -> None:
        self.relay, _, _ = self.serve(self.relay_host, "relay", threads=1)
        line = self.relay.wait_for_line(r"^/ip4/10\.\S+", timeout=180, stream="stdout")
        self.relay_addr = line.group(0)

    def requester(self, side: str, peer: str, **options):
        argv = [sys.executable, __file__, "--side", side, "--bootstrap", self.relay_addr, "--peer", peer,
                "--data-dir", self.data_dir("req")]  # fmt: skip
        for key, value in options.items():
            argv += [f"--{key}", str(value)]
        return self.req_host.spawn(argv, cwd=ROOT, label=f"req-{side}")

    @staticmethod
    def result(proc, timeout: float) -> dict:
        line = proc.wait_for_line(r'^\{"event": "done"', timeout=timeout, stream="stdout")
        return json.loads(line.string)


def accepted(worker, requester_peer: str) -> list[str]:
    """The connection kinds the worker's log gives for the jobs of ``requester_peer``, in order."""
    prefix = re.escape(requester_peer[:12])
    return re.findall(rf"from {prefix}…: accepted \((\w+) connection\)", worker.stderr())


def cpu_seconds(pid: int) -> float:
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return float("nan")
    return times.user + times.system


def speed(bench: Bench, workers: dict, jobs: int, rounds: int, tokens: int) -> dict:
    results = {case: {"jobs": [], "short": [], "problems": [], "cpu_s": [0.0, 0.0, 0.0]} for case in SPEED_CASES}
    for r in range(rounds):
        for case in SPEED_CASES if r % 2 == 0 else reversed(SPEED_CASES):
            worker, peer = workers[WORKER_OF[case]]
            want = {"direct": "any", "relayed": "relayed", "upgraded": "direct"}[case]
            # the relayed case's requester accepts no inbound connection: else the worker dials it directly
            listen = "loopback" if case == "relayed" else "any"
            pids = f"{bench.relay.pid},{worker.pid}"
            proc = bench.requester("speed", peer, want=want, jobs=jobs, tokens=tokens, listen=listen, pids=pids)
            out = Bench.result(proc, timeout=120 + jobs * 60)
            proc.wait(10)
            got = results[case]
            if "error" in out:
                got["problems"].append(out["error"])
                continue
            got["cpu_s"] = [a + b for a, b in zip(got["cpu_s"], out["cpu_s"], strict=True)]
            got["jobs"] += out["jobs"]
            got["short"] += out["short"]
            got.setdefault("direct_after_s", []).append(out.get("direct_after_s"))
            expected = "relayed" if case == "relayed" else "direct"
            kinds = [k for j in out["short"] + out["jobs"] for k in (j["before"], j["after"])]
            if any(k != expected for k in kinds):
                got["problems"].append(f"round {r + 1}: connection kinds {sorted(set(kinds))}, not only {expected}")
            logged = accepted(worker, json.loads(proc.wait_for_line(r'"event": "ready"', 1).string)["peer_id"])
            if logged[1:] != [expected] * 2 * jobs:  # the first is the warm-up
                got["problems"].append(f"round {r + 1}: worker logged {logged[1:]} for the timed jobs")
    return results


def reach(bench: Bench, trials: int) -> list[dict]:
    from node.net.identity import Identity

    out = []
    for i in range(trials):
        for side in ("ping", "first-job"):
            # the requester joins first; then the worker starts
            data_dir = bench.data_dir("reach")
            peer = Identity.load(data_dir).peer_id
            req = bench.requester(side, peer, timeout=120)
            me = json.loads(req.wait_for_line(r'"event": "ready"', timeout=60, stream="stdout").string)["peer_id"]
            argv = [sys.executable, "-m", "node", "--data-dir", data_dir, "serve", "--no-mdns",
                    "--threads", str(bench.threads), "--bootstrap", bench.relay_addr]  # fmt: skip
            started = time.monotonic()
            worker = bench.eim_host.spawn(argv, cwd=ROOT, label="reach")
            listening = serving = None
            while serving is None and time.monotonic() - started < 180:
                # its host is up when it listens (before the model loads); it serves after "bootstrap others with:"
                if listening is None and bench.eim_host.run(["ss", "-Hltn"]).stdout.strip():
                    listening = time.monotonic()
                if "bootstrap others with:" in worker.stderr():
                    serving = time.monotonic()
                time.sleep(0.05)
            result = Bench.result(req, timeout=150)
            at = result.get("at")
            row = {"side": side, "trial": i + 1, "failures": result["failures"]}
            for name, since in (("start", started), ("listening", listening), ("serving", serving)):
                row[f"from_{name}_s"] = at - since if at and since else None
            row["listening_s"], row["serving_s"] = listening - started, serving - started
            if side == "first-job":
                row["offer_from_start_s"] = result["offer_at"] - started if result.get("offer_at") else None
                row["offer_had_circuit"] = any("/p2p-circuit" in a for a in result.get("offer_addrs") or [])
                row["connection"] = (accepted(worker, me) or [None])[0]
            out.append(row)
            req.kill()
            worker.kill()
    return out


TRY_KINDS = {  # name: (worker, the requester's listen address)
    "eim": ("eim", "any"),
    "sym": ("sym", "any"),
    "sym-closed": ("sym", "loopback"),
}


def tries(bench: Bench, workers: dict, n: int, upgrade_wait: float) -> dict:
    out = {kind: [] for kind in TRY_KINDS}
    for _ in range(n):
        for kind, (name, listen) in TRY_KINDS.items():
            worker, peer = workers[name]
            proc = bench.requester("try", peer, listen=listen, **{"upgrade-wait": upgrade_wait})
            result = Bench.result(proc, timeout=120)
            proc.wait(10)
            me = json.loads(proc.wait_for_line(r'"event": "ready"', 1).string)["peer_id"]
            result["logged"] = accepted(worker, me)
            out[kind].append(result)
    return out


# ---------------------------------------------------------------- report


def med(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    names = (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    model = next(names, "?")
    return f"{model}, {os.cpu_count()} cores"


def others_running(mine: str = "") -> list[str]:
    """Other pytest / llmarket processes on the machine (they share the cores); not this benchmark's."""
    found = subprocess.run(["pgrep", "-af", r"pytest|python -m node"], capture_output=True, text=True).stdout
    return [
        line
        for line in found.splitlines()
        if line.split()[0] != str(os.getpid()) and "bench/network.py" not in line and not (mine and mine in line)
    ]


class Watcher:
    """Samples the other pytest / llmarket processes every 5 s, per part of the benchmark."""

    def __init__(self, mine: str) -> None:
        self.mine, self.part = mine, "setup"
        self.samples: dict[str, list[list[str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.samples.setdefault(self.part, []).append(others_running(self.mine))
            if self._stop.wait(5.0):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        parts = []
        for part, samples in self.samples.items():
            busy = [s for s in samples if s]
            parts.append(f"{part} {len(busy)}/{len(samples)}")
        seen = sorted({line.split(None, 1)[1][:90] for samples in self.samples.values() for s in samples for line in s})
        text = "samples (every 5 s) with other pytest/llmarket processes running: " + ", ".join(parts)
        return text + ("".join(f"\n  seen: {line}" for line in seen[:5]) if seen else "")


def report(args, speed_results, reach_rows, try_results, wall_s: float, loads: list[str], watcher: Watcher) -> None:
    print(f"{machine()}; worker llama.cpp threads {args.threads}; load average at start/end: {' / '.join(loads)}")
    print(watcher.summary())
    print(f"bench wall time {wall_s / 60:.1f} min\n")
    if speed_results:
        res = speed_results
        prompt_tokens = med(j["prompt_tokens"] for c in SPEED_CASES for j in res[c]["jobs"])
        print(f"1. Speed: {args.jobs * args.rounds} jobs per case and prompt ({args.rounds} rounds × {args.jobs}); "
              f"greedy; medians. Long: the same {prompt_tokens:.0f}-token prompt, up to {args.tokens} tokens. "
              f"Short: \"{SHORT_PROMPT}\", 8 tokens.")  # fmt: skip
        print("| case | worker | TTFT, long prompt (ms) | TTFT, short prompt (ms) | decode tokens/s | tokens | "
              "CPU s per long job: relay / requester / worker |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---|")
        ttft = {c: med(j["ttft_s"] for j in res[c]["jobs"]) for c in SPEED_CASES}
        short = {c: med(j["ttft_s"] for j in res[c]["short"]) for c in SPEED_CASES}
        tps = {c: med(j["decode_tps"] for j in res[c]["jobs"]) for c in SPEED_CASES}
        for case in SPEED_CASES:
            n = max(len(res[case]["jobs"]), 1)
            relay, worker, requester = (x / n for x in res[case]["cpu_s"])
            where = {"direct": "public", "relayed": "symmetric NAT", "upgraded": "eim NAT, after DCUtR"}[case]
            print(f"| {case} | {where} | {1000 * ttft[case]:.0f} | {1000 * short[case]:.1f} | {tps[case]:.1f} | "
                  f"{med(j['tokens'] for j in res[case]['jobs']):.0f} | "
                  f"{relay:.2f} / {requester:.2f} / {worker:.2f} |")  # fmt: skip
        up = [d for d in res["upgraded"].get("direct_after_s", []) if d is not None]
        if up:
            print(f"upgraded case: the connection was direct {med(up):.2f} s (median) after the dial")
        for case in ("relayed", "upgraded"):
            ratio = tps[case] / tps["direct"]
            added, added_short = 1000 * (ttft[case] - ttft["direct"]), 1000 * (short[case] - short["direct"])
            line = f"{case}: decode {ratio:.1%} of direct; TTFT {added:+.0f} ms (long), {added_short:+.1f} ms (short)"
            if case == "relayed":
                line += (f" — targets: decode ≥ 90% {'met' if ratio >= 0.9 else 'MISSED'}; TTFT ≤ +50 ms "
                         f"{'met' if added <= 50 else 'MISSED'} (long), {'met' if added_short <= 50 else 'MISSED'} "
                         "(short)")  # fmt: skip
            print(line)
        for case in SPEED_CASES:
            for problem in speed_results[case]["problems"]:
                print(f"PROBLEM ({case}): {problem}")
        print()
    if reach_rows:
        print(f"2. Reachability of a fresh worker behind the eim NAT ({len(reach_rows) // 2} per row): seconds until a "
              "public requester reaches it, counted from three moments; medians, and each trial")  # fmt: skip
        print("| a public requester… | from `serve` start | from its host listening | from \"bootstrap others "
              "with:\" | trials (from start) |")  # fmt: skip
        print("|---|---:|---:|---:|---|")
        for side, what in (("ping", "pings it through the relay"), ("first-job", "has an 8-token job done by it")):
            rows = [r for r in reach_rows if r["side"] == side]
            trials = ", ".join("failed" if r["from_start_s"] is None else f"{r['from_start_s']:.2f}" for r in rows)
            print(f"| {what} | {med(r['from_start_s'] for r in rows):.2f} | "
                  f"{med(r['from_listening_s'] for r in rows):.2f} | {med(r['from_serving_s'] for r in rows):+.2f} | "
                  f"{trials} |")  # fmt: skip
        print(
            f'`serve` start to its host listening: {med(r["listening_s"] for r in reach_rows):.2f} s; to "bootstrap '
            f'others with:" (model loaded and measured): {med(r["serving_s"] for r in reach_rows):.2f} s (medians)'
        )
        jobs = [r for r in reach_rows if r["side"] == "first-job"]
        print(f"its first offer reached the requester {med(r['offer_from_start_s'] for r in jobs):.2f} s after start; "
              f"{sum(r['offer_had_circuit'] for r in jobs)}/{len(jobs)} carried a /p2p-circuit address; the first "
              f"job came on a {', '.join(str(r.get('connection')) for r in jobs)} connection; failed attempts before "
              f"it: {', '.join(str(r['failures']) for r in jobs)}")  # fmt: skip
        ping = [r for r in reach_rows if r["side"] == "ping"]
        for name, label in (("start", "`serve` start"), ("listening", "its host listening")):
            value = med(r[f"from_{name}_s"] for r in ping)
            print(f"target reachable (ping through the relay) ≤ 5 s after {label}: "
                  f"{'met' if value <= 5 else 'MISSED'} ({value:.2f} s)")  # fmt: skip
        print()
    if try_results:
        n = len(try_results["eim"])
        ok = {
            "eim": lambda r: r["direct_after_s"] is not None and r["logged"][1:] == ["direct"],
            "sym": lambda r: len(r["logged"]) == 2,
            "sym-closed": lambda r: r["logged"] == ["relayed", "relayed"],
        }
        good = {kind: [r for r in rows if "error" not in r and ok[kind](r)] for kind, rows in try_results.items()}
        print(f"3. Upgrade and fallback: {n} fresh requesters each; two 8-token jobs each, the second after the "
              f"connection became direct or {args.upgrade_wait:g} s after the dial")  # fmt: skip
        print("| worker | requester | result | target |")
        print("|---|---|---|---|")
        ups = [r["direct_after_s"] for r in good["eim"]]
        print(f"| behind eim NAT | public, listening | second job direct in {len(good['eim'])}/{n} (direct "
              f"{med(ups):.2f} s median, {max(ups, default=float('nan')):.2f} s max after the dial) | {n}/{n}: "
              f"{'met' if len(good['eim']) == n else 'MISSED'} |")  # fmt: skip
        relayed_first = sum(r["logged"][0] == "relayed" for r in good["sym"])
        direct_second = sum(r["logged"][1] == "direct" for r in good["sym"])
        print(f"| behind symmetric NAT | public, listening | both jobs completed in {len(good['sym'])}/{n}; first job "
              f"relayed in {relayed_first}, second job direct in {direct_second} (the worker dialled the requester) "
              "| |")  # fmt: skip
        print(
            f"| behind symmetric NAT | public, accepts no inbound | both jobs completed over the relay in "
            f"{len(good['sym-closed'])}/{n} | {n}/{n}: {'met' if len(good['sym-closed']) == n else 'MISSED'} |"
        )
        dials = [r["dial_s"] for rows in try_results.values() for r in rows if "dial_s" in r]
        print(f"dial through the relay: median {1000 * med(dials):.0f} ms")
        for kind, rows in try_results.items():
            for i, r in enumerate(rows):
                if r not in good[kind]:
                    if "error" in r:
                        print(f"PROBLEM ({kind}, try {i + 1}): {r['error']}")
                        continue
                    jobs = "; ".join(f"{r[j]['before']} → {r[j]['after']}" for j in ("first", "second"))
                    print(f"PROBLEM ({kind}, try {i + 1}): connection kind around the jobs: {jobs}; direct after "
                          f"{r['direct_after_s']} s; the worker logged {r['logged']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5, help="timed jobs per case and round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the speed cases (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=128, help="max tokens of a timed job (default: %(default)s)")
    parser.add_argument("--tries", type=int, default=20, help="upgrade/fallback tries per NAT (default: %(default)s)")
    parser.add_argument("--reach", type=int, default=3, help="fresh workers per reach row (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp threads of the workers (default: %(default)s, which leaves a core to the "
                             "relay and the requester)")  # fmt: skip
    parser.add_argument("--upgrade-wait", type=float, default=UPGRADE_WAIT_S, metavar="S",
                        help="part 3: how long after its dial a try waits for a direct connection "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a short run: 2 jobs, 1 round, 2 tries, 1 worker")
    parser.add_argument("--only", choices=("speed", "reach", "tries"), action="append", help="run only these parts")
    parser.add_argument("--keep-logs", metavar="DIR", help="keep the processes' output in DIR")
    parser.add_argument("--side", choices=("speed", "try", "ping", "first-job"), help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--want", default="any", help=argparse.SUPPRESS)
    parser.add_argument("--pids", default="", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", type=int, default=0, help=argparse.SUPPRESS)

    parser.add_argument("--listen", default="any", choices=("any", "loopback"), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=60, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        import trio

        trio.run(requester_side, args)
        return

    from tests.netlab import Lab, unavailable_reason

    reason = unavailable_reason()
    if reason:
        sys.exit(f"bench/network.py: cannot build a network lab here: {reason}")
    if args.quick:
        args.jobs, args.rounds, args.tries, args.reach = 2, 1, 2, 1
    parts = set(args.only or ("speed", "reach", "tries"))
    loads = [" ".join(open("/proc/loadavg").read().split()[:3])]
    started = time.monotonic()
    log_dir = Path(args.keep_logs) if args.keep_logs else Path(tempfile.mkdtemp(prefix="llmarket-network-"))
    tmp = Path(tempfile.mkdtemp(prefix="llmarket-network-data-"))
    watcher = Watcher(mine=str(tmp))
    speed_results = reach_rows = try_results = None
    try:
        with Lab(log_dir) as lab:
            bench = Bench(lab, tmp, args.threads)
            bench.start_relay()
            workers = {}
            if parts & {"speed", "tries"}:
                for name, host in (("pub", bench.pub_host), ("eim", bench.eim_host), ("sym", bench.sym_host)):
                    if name == "pub" and "speed" not in parts:
                        continue
                    proc, peer, _ = bench.serve(host, name)
                    workers[name] = (proc, peer)
                for proc, _ in workers.values():
                    proc.wait_for_line("bootstrap others with:", timeout=180)
                for name in ("eim", "sym"):
                    workers[name][0].wait_for_line(r"reachable: behind NAT, through relay", timeout=60)
            if "speed" in parts:
                watcher.part = "speed"
                speed_results = speed(bench, workers, args.jobs, args.rounds, args.tokens)
            if "tries" in parts:
                watcher.part = "tries"
                try_results = tries(bench, workers, args.tries, args.upgrade_wait)
            if "reach" in parts:
                for proc, _ in workers.values():  # idle workers, but fewer processes on the cores
                    proc.kill()
                watcher.part = "reach"
                reach_rows = reach(bench, args.reach)
    finally:
        watcher.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
    loads.append(" ".join(open("/proc/loadavg").read().split()[:3]))
    report(args, speed_results, reach_rows, try_results, time.monotonic() - started, loads, watcher)


if __name__ == "__main__":
    main()
