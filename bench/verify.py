"""Verified inference: what fingerprints cost a worker, a check a verifier, and spot checks a requester.

    .venv/bin/python bench/verify.py [--rounds 5] [--tokens 256] [--runs 3] [--spot-check 0.05] [--jobs 20000] [--json]
    .venv/bin/python bench/verify.py --quick    # seconds: 1 round and 1 run of 32 tokens
    .venv/bin/python bench/verify.py --calibrate [--scale 0.1] [--no-write] [--only hotter-1.3,noisy]

``--calibrate`` runs the statistical calibration instead (about 1.5 hours on 2 cores):
the workloads of ``tests/calibration.py`` at full size, 1,000 honest jobs of the
batched (default) engine, 1,000 honest checks of the per-slot engine, 200 of a noisy
worker and 100 jobs per cheater, and writes the tallies into docs/verification.md
(between its calibration markers); ``--only`` runs some of them and writes nothing.
The test suite runs the same workloads at a smoke size.

One process, the default model (SmolLM2-135M-Instruct Q4_1), n_ctx 2048, one
slot per engine using every core; the KV cache is emptied before every job, so
each one evaluates its prompt afresh, as a worker's next (different) job would.

1. Fingerprint overhead on decode: one engine, its ``fingerprints`` switch on
   and off in turn (--rounds each), runs one greedy job of --tokens; decode
   tokens/s = (completion_tokens - 1) / (elapsed_s - first_token_s) of the
   ``Finished`` event, medians compared. Also the wire size of the records per
   answer token (15 bytes a record; an answer that ended on end-of-generation
   has one more record than tokens).
2. Verification against generation: answers of --tokens (sampled, temperature
   0.8, a fixed seed; the first candidate prompt whose answer reaches 200/256 of
   --tokens) to a short chat (~40 prompt tokens) and a long one (a ~600-token
   system message, then the question). Generation time is the worker's
   ``Finished.elapsed_s`` (prompt included); verification time is
   ``verify.check`` on a third engine, wall clock (its prompt included). The
   verdict must be ok. Medians over --runs.
4. (below 3 in the table) TTFT after a long shared system prompt: cold, warm
   (the engine reuses its cache in whole 512-token batches only, for
   reproducible outputs) and with the whole shared prefix reused (what that
   rule gives up).
3. Spot-check spend: each of --jobs jobs, drawn from part 2's token counts and
   priced at --price per 1k tokens (``job_cost``), is checked with probability
   --spot-check at the verifier's default price, the job price / 10 (a seeded
   RNG); verification spend over job spend, and its expectation P / 10.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.inference.engine import Finished, SamplingParams, open_engine  # noqa: E402
from node.models.default import default_model_file  # noqa: E402
from node.payments.policy import job_cost  # noqa: E402
from node.protocol.messages import JobRequest  # noqa: E402
from node.verify import local as verify  # noqa: E402

ESSAY = [{"role": "user", "content": "Write a long, detailed essay about the history of bicycles."}]
QUESTIONS = [
    "Write a long, detailed essay about the history of bicycles.",
    "Write a long, detailed story about a lighthouse keeper and the sea.",
    "Explain in detail, step by step, how a steam engine works and how it changed the world.",
]
NOTES = (  # the long prompt's system message: ~600 tokens of text
    "You are a museum guide. Use these notes from the museum's bicycle gallery when you answer.\n"
    "Room 1. The draisine, or running machine, was built by Karl Drais in Mannheim in 1817. It had two wheels in "
    "line, a wooden frame and no pedals: the rider pushed along the ground with his feet and steered the front "
    "wheel with a bar. A year of failed harvests had made horses expensive, and Drais hoped to replace them.\n"
    "Room 2. In the 1860s French makers, among them Pierre Michaux and Pierre Lallement, fixed cranks and pedals "
    "to the front wheel. The velocipede was heavy, with iron tyres on wooden wheels, and riders called it the "
    "boneshaker. Riding schools opened in Paris, London and New York, and the craze faded within a few years.\n"
    "Room 3. To go faster with each turn of the pedals, makers enlarged the front wheel. The high-wheeler, or "
    "penny-farthing, of the 1870s had a front wheel up to one and a half metres across, solid rubber tyres and "
    "wire spokes held in tension. It was fast and light but dangerous: a rider who hit a stone was thrown over "
    "the handlebars, a fall known as a header. Clubs organised long rides and the first races.\n"
    "Room 4. In 1885 John Kemp Starley of Coventry sold the Rover safety bicycle: two wheels of equal size, the "
    "rider seated between them, and a chain that drove the rear wheel. In 1888 John Boyd Dunlop, a veterinarian "
    "in Belfast, made an air-filled tyre for his son's tricycle, and pneumatic tyres soon ended the rough ride. "
    "The diamond frame of steel tubes followed, and it is still the shape of most bicycles.\n"
    "Room 5. The bicycle boom of the 1890s gave millions of people cheap private transport. Women's cycling "
    "changed clothing, as bloomers and shorter skirts replaced long dresses, and it was linked with campaigns "
    "for women's rights. Cyclists' clubs lobbied for paved roads before there were many cars to use them. "
    "Mechanics trained on bicycles, among them the Wright brothers, went on to build cars and aircraft.\n"
    "Room 6. The twentieth century brought derailleur gears, lighter alloys, racing on roads and tracks, the "
    "Tour de France from 1903, folding bicycles, mountain bikes from California in the 1970s, and carbon fibre "
    "frames. In many cities the bicycle is again a main way to travel, and electric bicycles with small motors "
    "now carry commuters, couriers and families over longer distances and steeper hills than before.\n"
    "Answer in full, with dates and names from these notes wherever they help."
)


def fresh(engine) -> None:
    """Empty the engine's KV cache: the next job evaluates its whole prompt, as a new job would."""
    for llama in engine._llamas:
        llama.reset()


def decode_rate(done: Finished) -> float:
    return (done.usage.completion_tokens - 1) / (done.elapsed_s - done.first_token_s)


async def overhead(engine, rounds: int, tokens: int) -> dict:
    """One engine, its ``fingerprints`` switch flipped between turns (the same context, threads and pages)."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    await engine.complete_chat(ESSAY, dataclasses.replace(params, max_tokens=8))  # warm-up: page the weights in
    rates: dict[bool, list[float]] = {True: [], False: []}
    wire = []
    for _ in range(rounds):
        for record in (True, False):
            engine.fingerprints = record
            fresh(engine)
            done = await engine.complete_chat(ESSAY, params)
            rates[record].append(decode_rate(done))
            if record:
                wire.append((len(done.fingerprints), done.usage.completion_tokens))
    engine.fingerprints = True
    with_fp, without = statistics.median(rates[True]), statistics.median(rates[False])
    fp_bytes, fp_tokens = wire[0]
    return {
        "decode_tok_s_with": with_fp, "decode_tok_s_without": without, "decode_ratio": with_fp / without,
        "wire_bytes": fp_bytes, "wire_tokens": fp_tokens, "wire_bytes_per_token": fp_bytes / fp_tokens,
    }  # fmt: skip


async def verification(worker, verifier, prompts: list, tokens: int, runs: int) -> dict:
    """Generation and verification times for the first of ``prompts`` whose answer has enough tokens."""
    params = SamplingParams(max_tokens=tokens, seed=7)
    fields = dataclasses.asdict(params) | {"stop": list(params.stop)}
    floor = tokens * 200 // 256
    lengths = []
    for messages in prompts:
        request = JobRequest(job_id="bench", model="default", params=fields, messages=messages)
        generate, check = [], []
        for _ in range(runs):
            fresh(worker)
            done = await worker.complete_chat(messages, params)
            lengths.append(done.usage.completion_tokens)
            if done.usage.completion_tokens < floor:
                break
            fresh(verifier)
            start = time.perf_counter()
            verdict = await verify.check(
                verifier, request, done.fingerprints, text=done.text, finish_reason=done.finish_reason,
                prompt_tokens=done.usage.prompt_tokens, completion_tokens=done.usage.completion_tokens,
                numerics=worker.numerics or "cpu",
            )  # fmt: skip
            check.append(time.perf_counter() - start)
            assert verdict.ok, f"an honest answer failed verification: {verdict.reason}"
            generate.append(done.elapsed_s)
        if len(check) == runs:
            gen, ver = statistics.median(generate), statistics.median(check)
            return {
                "prompt_tokens": done.usage.prompt_tokens, "completion_tokens": done.usage.completion_tokens,
                "generate_s": gen, "verify_s": ver, "ratio": ver / gen,
            }  # fmt: skip
    raise SystemExit(f"no prompt gave an answer of {floor}+ tokens (got {lengths}); try other prompts")


def spot_checks(jobs: list[tuple[int, int]], p: float, n: int, price: int, seed: int) -> dict:
    """``n`` jobs drawn from ``jobs`` (prompt, completion tokens), each checked with probability ``p``."""
    rng = random.Random(seed)
    verify_price = price // 10  # a verifier's default verify_price_per_1k
    spent = checking = checked = 0
    for _ in range(n):
        prompt, completion = rng.choice(jobs)
        spent += job_cost(prompt, completion, price)
        if rng.random() < p:
            checked += 1
            checking += job_cost(prompt, completion, verify_price)
    return {
        "jobs": n, "checked": checked, "job_spend": spent, "verify_spend": checking, "ratio": checking / spent,
        "expected": p * verify_price / price, "p": p, "price": price, "verify_price": verify_price,
    }  # fmt: skip


def suffix_only(llama, tokens: list[int], cached: int) -> float:
    """Seconds to evaluate ``tokens[cached:]`` on top of a cache that holds ``tokens[:cached]``."""
    llama.reset()
    llama.eval(tokens[:cached])
    start = time.perf_counter()
    llama.eval(tokens[cached:])
    return time.perf_counter() - start


async def shared_prefix(engine, runs: int) -> dict:
    """TTFT for a question after a long shared system prompt: cold, warm as the engine reuses its cache (whole
    512-token batches only, for reproducible outputs), and with the whole shared prefix reused (the bound a
    reuse-everything cache would reach: the suffix alone, evaluated on top of the cached prefix)."""
    system = {"role": "system", "content": NOTES + "\n" + NOTES}  # ~1,200 tokens
    first = [system, {"role": "user", "content": QUESTIONS[0]}]
    second = [system, {"role": "user", "content": QUESTIONS[1]}]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    cold, warm, ideal = [], [], []
    llama = engine._llamas[0]
    a, b = engine._chat_tokens(llama, first), engine._chat_tokens(llama, second)
    common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    for _ in range(runs):
        fresh(engine)
        cold.append((await engine.complete_chat(second, params)).first_token_s)
        fresh(engine)
        await engine.complete_chat(first, params)
        warm.append((await engine.complete_chat(second, params)).first_token_s)
        ideal.append(await trio.to_thread.run_sync(suffix_only, llama, b, common))
    fresh(engine)
    return {
        "prompt_tokens": len(b), "shared_tokens": common, "reused_tokens": common // llama.n_batch * llama.n_batch,
        "cold_ms": 1000 * statistics.median(cold), "warm_ms": 1000 * statistics.median(warm),
        "ideal_ms": 1000 * statistics.median(ideal),
    }  # fmt: skip


async def measure(args: argparse.Namespace) -> dict:
    path = default_model_file()
    async with open_engine(path, slots=1) as on, open_engine(path, slots=1) as verifier:
        results = {"threads": on.threads, "overhead": await overhead(on, args.rounds, args.tokens)}
        short = [[{"role": "user", "content": q}] for q in QUESTIONS]
        long = [[{"role": "system", "content": NOTES}, *chat] for chat in short]
        for name, prompts in (("short", short), ("long", long)):
            results[name] = await verification(on, verifier, prompts, args.tokens, args.runs)
        results["prefix"] = await shared_prefix(on, args.runs)
    jobs = [(results[k]["prompt_tokens"], results[k]["completion_tokens"]) for k in ("short", "long")]
    results["spot"] = spot_checks(jobs, args.spot_check, args.jobs, args.price, args.seed)
    return results


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def table(r: dict, args: argparse.Namespace) -> list[str]:
    o, s = r["overhead"], r["spot"]
    rows = [
        ("decode tokens/s, fingerprints on / off", f"{o['decode_ratio']:.3f}",
         f"{o['decode_tok_s_with']:.1f} / {o['decode_tok_s_without']:.1f} tok/s, median of {args.rounds}", "≥ 0.97"),
        ("fingerprint bytes per answer token", f"{o['wire_bytes_per_token']:.2f}",
         f"{o['wire_bytes']} bytes for {o['wire_tokens']} tokens", "≤ 16"),
    ]  # fmt: skip
    for name in ("short", "long"):
        v = r[name]
        rows.append((
            f"verify / generate, {name} prompt", f"{v['ratio']:.3f}",
            f"{v['verify_s']:.3f} s / {v['generate_s']:.3f} s; {v['prompt_tokens']} prompt + "
            f"{v['completion_tokens']} answer tokens, median of {args.runs}", "≤ 0.15",
        ))  # fmt: skip
    rows += [
        ("spot-check spend / job spend, simulated", f"{s['ratio']:.4f}",
         f"{s['checked']} of {s['jobs']} jobs checked (P {s['p']}, seed {args.seed}): "
         f"{s['verify_spend']} / {s['job_spend']} units", "≤ 0.01"),
        ("… expected, P × verify price / price", f"{s['expected']:.4f}",
         f"{s['p']} × {s['verify_price']} / {s['price']} per 1k tokens", "≤ 0.01"),
    ]  # fmt: skip
    p = r["prefix"]
    rows.append((
        "TTFT after a shared system prompt: warm / cold", f"{p['warm_ms'] / p['cold_ms']:.3f}",
        f"warm {p['warm_ms']:.0f} ms (reuses {p['reused_tokens']} of {p['shared_tokens']} shared tokens), cold "
        f"{p['cold_ms']:.0f} ms, whole prefix reused {p['ideal_ms']:.0f} ms; {p['prompt_tokens']} prompt tokens",
        "(cost of reproducibility)",
    ))  # fmt: skip
    return ["| measure | result | raw | target |", "|---|---:|---|---|"] + [f"| {' | '.join(row)} |" for row in rows]


# ------------------------------------------------------------------ the calibration (--calibrate)

#: Full sizes: 6 * 100 + 4 * 100 = 1,000 honest checks, 4 * 250 = 1,000 batched ones, 200 of a worker with noisy
#: logits, 100 jobs per cheater.
FULL = {"pairs": 100, "singles": 100, "rounds": 250, "noisy": 200, "jobs": 100}  # rounds: 1,000 default jobs
BEGIN = "<!-- calibration: begin (written by bench/verify.py --calibrate) -->"
END = "<!-- calibration: end -->"


HONEST_WORKLOADS = ("batched", "honest", "noisy")


async def calibrate(scale: float, only: frozenset[str] = frozenset()) -> tuple:
    """The workloads at ``scale`` of their full sizes; ``only``: just these (names of ``HONEST_WORKLOADS`` and
    cheaters), the others' tallies None."""
    from tests import calibration

    wanted = lambda name: not only or name in only  # noqa: E731
    honest = batched = noisy = None

    size = {key: max(1, round(value * scale)) for key, value in FULL.items()}
    model = default_model_file()

    def report(line: str) -> None:  # progress on stderr; the tallies go to stdout
        print(f"  ... {line}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # The default engine's workloads first: each tally is printed as it completes.
        if wanted("batched"):
            batched = await calibration.batched_checks(model, rounds=size["rounds"], report=report)
            print(batched.summary(), flush=True)
        cheats = []
        for cheat in filter(wanted, calibration.CHEATS):
            cheats.append(await calibration.cheater_checks(cheat, model, Path(tmp), jobs=size["jobs"], report=report))
            print(cheats[-1].summary(), flush=True)
        if wanted("honest"):
            honest = await calibration.honest_checks(
                model, Path(tmp), pairs=size["pairs"], singles=size["singles"], report=report
            )
            print(honest.summary(), flush=True)
        if wanted("noisy"):
            noisy = await calibration.noisy_checks(model, jobs=size["noisy"], report=report)
            print(noisy.summary(), flush=True)
    return honest, batched, noisy, cheats


def calibration_markdown(honest, batched, noisy, cheats, *, machine: str, minutes: float, scale: float = 1) -> str:
    rows = ["| workload | checks | flagged | max logit error: median / p99 / max | mean error, max | flips, max "
            "(per token) | surprisal z, max |", "|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for tally in filter(None, (honest, batched, noisy)):
        errors = sorted(v.max_error for v in tally.verdicts)
        p99 = errors[min(len(errors) - 1, int(0.99 * len(errors)))]
        rows.append(
            f"| {tally.what} | {len(tally.verdicts):,} | **{len(tally.failures)}** | {statistics.median(errors):.2f} "
            f"/ {p99:.2f} / {errors[-1]:.2f} | {max(v.mean_error for v in tally.verdicts):.2f} "
            f"| {max(v.flips for v in tally.verdicts)} ({max(v.flips / max(1, v.tokens) for v in tally.verdicts):.2f}) "
            f"| {max(v.surprise_z for v in tally.verdicts):.2f} |"
        )
    rows += ["", "| cheater | caught | first failing check |", "|---|---|---|"]
    for tally in cheats:
        reasons = "; ".join(f"{reason}: {count}" for reason, count in sorted(tally.reasons.items()))
        rows.append(f"| {tally.cheat} | {tally.caught} of {tally.checked} | {reasons} |")
    sizes = "" if scale == 1 else f" (--scale {scale})"
    head = f"Last calibration{sizes}: {time.strftime('%Y-%m-%d')}, {machine}, {minutes:.0f} min."
    extra = f" The batched engine found {batched.reused_tokens:,} prompt tokens in a cache." if batched else ""
    return "\n".join([BEGIN, head + extra, "", *rows, END])


def write_between_markers(doc: Path, block: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"bench/verify.py: {doc} has no calibration markers ({BEGIN!r} ... {END!r})")
    before, rest = text.split(BEGIN, 1)
    doc.write_text(before + block + rest.split(END, 1)[1])


def run_calibration(args: argparse.Namespace) -> None:
    from tests import calibration

    only = frozenset(name for name in args.only.split(",") if name)
    if unknown := only - {*HONEST_WORKLOADS, *calibration.CHEATS}:
        known = ", ".join([*HONEST_WORKLOADS, *calibration.CHEATS])
        raise SystemExit(f"bench/verify.py: no workload {', '.join(sorted(unknown))} (the workloads: {known})")
    started = time.monotonic()
    honest, batched, noisy, cheats = trio.run(calibrate, args.scale, only)
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    minutes = (time.monotonic() - started) / 60
    block = calibration_markdown(honest, batched, noisy, cheats, machine=machine, minutes=minutes, scale=args.scale)
    print(block)
    if only:
        print("(--only: a partial calibration; docs/verification.md is left as it is)")
    elif not args.no_write:
        write_between_markers(Path(__file__).resolve().parents[1] / "docs" / "verification.md", block)
    honest_flags = sum(len(t.failures) for t in (honest, batched, noisy) if t)
    short = [t.cheat for t in cheats if t.caught < calibration.TARGET.get(t.cheat, 1.0) * t.checked]
    if honest_flags or short:
        raise SystemExit(f"bench/verify.py: {honest_flags} honest jobs flagged; caught below target: {short or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="turns per engine in part 1")
    parser.add_argument("--tokens", type=int, default=256, help="max_tokens of every job")
    parser.add_argument("--runs", type=int, default=3, help="generations and checks per prompt in part 2")
    parser.add_argument("--spot-check", type=float, default=0.05, help="probability that a job is checked")
    parser.add_argument("--jobs", type=int, default=20000, help="simulated jobs in part 3")
    parser.add_argument("--price", type=int, default=1000, help="job price per 1k tokens")
    parser.add_argument("--seed", type=int, default=0, help="the spot-check simulation's RNG seed")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 run, 32 tokens: a smoke test")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--calibrate", action="store_true", help="run the statistical calibration instead (~1 h)")
    parser.add_argument("--scale", type=float, default=1.0, help="--calibrate at this fraction of its full sizes")
    parser.add_argument("--no-write", action="store_true", help="--calibrate without writing docs/verification.md")
    parser.add_argument(
        "--only",
        default="",
        help="--calibrate only these workloads, comma-separated (batched, honest, noisy or a "
        "cheater of tests/calibration.py); never written to the docs",
    )
    args = parser.parse_args()
    if args.calibrate:
        run_calibration(args)
        return
    if args.quick:
        args.rounds, args.runs, args.tokens = 1, 1, 32
    import llama_cpp

    results = trio.run(measure, args)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "llama_cpp": llama_cpp.__version__}
    if args.json:
        print(json.dumps({"machine": machine, **results}, indent=2))
        return
    print(
        f"{machine['cpu']}; {machine['cores']} cores, {results['threads']} threads; "
        f"llama-cpp-python {machine['llama_cpp']}; up to {args.tokens} tokens a job"
    )
    print("\n".join(table(results, args)))


if __name__ == "__main__":
    main()
