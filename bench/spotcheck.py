"""Adaptive spot checks, simulated with the real policy (node/market/trust.py): what cheaters get, what honesty costs.

    .venv/bin/python bench/spotcheck.py [--base 0.05] [--identities 20000] [--workers 5000] [--seed 1]
        [--strikes 2] [--noisy-false 0.01875] [--noisy-catch 0.96] [--json]

No network and no model: each job is a draw. A requester runs jobs on one worker
at a time with its ``Trust`` and spot-checks each job with
``trust.spot_probability(worker, base)``; a check of a cheated job catches it (a
spot check catches every cheat in docs/verification.md's table at some rate; this
simulation takes the best case for the cheater's count, one check = one catch,
and counts the checks the cheater dodged), a check of an honest job passes.

Cheaters take a new identity after each catch (a ban is per peer id). Each
strategy runs ``--identities`` identities (an identity that is never caught
stops after ``--max-jobs`` jobs, and is counted) and reports the unchecked
cheated jobs per identity (jobs it was paid for in full, cheating), the honest
jobs it did first, and the credit window it had when it was caught.

Honest workers: ``--workers`` workers each do 100 jobs. A job is one of the
typical sizes measured by ``bench/verify.py`` (docs/benchmarks.md: 42 or 619
prompt tokens and 256 answer tokens), priced at ``--price`` per 1,000 tokens;
a check is a verification job of prompt + answer tokens and one more, at the
verifier's default price, a tenth of the job's (``WorkerConfig.verify_price``).
The spend ratio is verification spend over job spend over the worker's first
100 jobs; mean, 95th percentile and worst are over workers, for exact and noisy
workers (node/market/trust.py: a noisy worker is checked at least twice the base).

Noisy workers and strikes: a noisy worker's failed check can be statistical
(node/market/trust.py, ``Trust.struck``), and only ``--strikes`` in a row ban.
Honest noisy workers fail a check with probability ``--noisy-false`` (15 of
800 in docs/verification.md's held-out runs); the share that one requester bans
within 100 and ``--noisy-jobs`` jobs is printed. Noisy cheaters are caught by a
check with probability ``--noisy-catch`` (the least measured, 96 of 100), and
each of their cheated jobs is counted as unchecked or as struck (checked and
failed, but not yet banned: a spot check comes after the job was paid).
``--strikes 1`` is the policy without strikes, for comparison.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.market.trust import STRIKES, Trust  # noqa: E402
from node.payments.policy import job_cost  # noqa: E402

#: (prompt tokens, answer tokens) of the short and long jobs in docs/benchmarks.md (bench/verify.py).
TYPICAL_JOBS = [(42, 256), (619, 256)]
#: Each: (name, what it does) with ``cheats(job_index, rng) -> bool`` (job_index counts from 0 per identity).
STRATEGIES = [
    ("cheats on every job", lambda j, rng: True),
    ("cheats on half its jobs", lambda j, rng: rng.random() < 0.5),
    ("cheats on a fifth of its jobs", lambda j, rng: rng.random() < 0.2),
    ("honest for 3 jobs, then cheats", lambda j, rng: j >= 3),
    ("honest for 10 jobs, then cheats", lambda j, rng: j >= 10),
    ("honest for 30 jobs, then cheats", lambda j, rng: j >= 30),
    ("honest for 100 jobs, then cheats", lambda j, rng: j >= 100),
]


def cheater(cheats, base: float, identities: int, max_jobs: int, rng: random.Random) -> dict:
    """A cheater that takes a new identity after each catch, with one requester's ``Trust``."""
    trust = Trust()
    unchecked = honest = never_caught = 0
    credits = []
    for identity in range(identities):
        peer = f"cheater-{identity}"
        for j in range(max_jobs):
            cheated = cheats(j, rng)
            checked = rng.random() < trust.spot_probability(peer, base)
            if cheated and checked:
                credits.append(trust.credit_tokens(peer))
                trust.failed(peer)
                break
            if cheated:
                unchecked += 1
                continue
            honest += 1
            if checked:
                trust.passed(peer)
        else:
            never_caught += 1
    return {
        "identities": identities,
        "unchecked_cheats_per_identity": unchecked / identities,
        "honest_jobs_per_identity": honest / identities,
        "never_caught": never_caught,
        "credit_when_caught": statistics.mean(credits) if credits else None,
    }


def honest_workers(base: float, workers: int, jobs: int, price: int, exact: bool, rng: random.Random) -> dict:
    """Spot-check spend over job spend for honest workers' first ``jobs`` jobs."""
    trust, verify_price = Trust(), price // 10
    ratios, checks = [], []
    for w in range(workers):
        peer = f"honest-{w}"
        spent = checking = checked = 0
        for _ in range(jobs):
            prompt, answer = rng.choice(TYPICAL_JOBS)
            spent += job_cost(prompt, answer, price)
            if rng.random() < trust.spot_probability(peer, base, exact=exact):
                checked += 1
                checking += job_cost(prompt + answer, 1, verify_price)
                trust.passed(peer)
        ratios.append(checking / spent)
        checks.append(checked)
    ratios.sort()
    return {
        "workers": workers,
        "jobs": jobs,
        "checks_mean": statistics.mean(checks),
        "spend_ratio_mean": statistics.mean(ratios),
        "spend_ratio_p95": ratios[int(0.95 * (len(ratios) - 1))],
        "spend_ratio_max": ratios[-1],
        "credit_after": trust.credit_tokens(f"honest-{workers - 1}"),
    }


def noisy_honest(base: float, workers: int, jobs: int, false_rate: float, strikes: int, rng: random.Random) -> dict:
    """Honest noisy workers whose checked answers fail (statistically) with probability ``false_rate``: the
    share that one requester bans (``strikes`` in a row, ``Trust.struck``) within 100 and within ``jobs`` jobs."""
    trust = Trust(strikes=strikes)
    banned_at, checks = [], []
    for w in range(workers):
        peer, checked, ban = f"noisy-{w}", 0, None
        for j in range(jobs):
            if rng.random() < trust.spot_probability(peer, base, exact=False):
                checked += 1
                if rng.random() >= false_rate:
                    trust.passed(peer)
                elif trust.struck(peer):
                    ban = j
                    break
        banned_at.append(ban)
        checks.append(checked)
    return {
        "workers": workers,
        "jobs": jobs,
        "false_rate": false_rate,
        "checks_mean": statistics.mean(checks),
        "banned_within_100": sum(b is not None and b < 100 for b in banned_at) / workers,
        "banned_within_all": sum(b is not None for b in banned_at) / workers,
    }


def noisy_cheater(
    cheats, base: float, identities: int, max_jobs: int, catch: float, strikes: int, rng: random.Random
) -> dict:
    """A noisy cheater that a check catches with probability ``catch`` (statistically: a strike), and that
    takes a new identity after each ban. Counts its cheated jobs per identity that nobody checked, and those
    a check caught without a ban yet (a spot check is made after the job is paid: it was paid for them)."""
    trust = Trust(strikes=strikes)
    unchecked = struck = jobs = 0
    for identity in range(identities):
        peer = f"noisy-cheater-{identity}"
        for j in range(max_jobs):
            jobs += 1
            cheated = cheats(j, rng)
            checked = rng.random() < trust.spot_probability(peer, base, exact=False)
            if not checked:
                unchecked += cheated
            elif cheated and rng.random() < catch:
                if trust.struck(peer):
                    break
                struck += 1
            else:
                trust.passed(peer)
    return {
        "identities": identities,
        "catch": catch,
        "unchecked_cheats_per_identity": unchecked / identities,
        "struck_cheats_per_identity": struck / identities,
        "jobs_per_identity": jobs / identities,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=float, default=0.05, help="the requester's --spot-check (default 0.05)")
    parser.add_argument("--identities", type=int, default=20_000, help="identities per cheating strategy")
    parser.add_argument("--max-jobs", type=int, default=10_000, help="jobs after which an identity stops")
    parser.add_argument("--workers", type=int, default=5_000, help="honest workers, 100 jobs each")
    parser.add_argument("--price", type=int, default=10**6, help="job price per 1,000 tokens (base units)")
    parser.add_argument(
        "--noisy-false",
        type=float,
        default=15 / 800,
        help="an honest noisy job's chance of failing a check (default: 15 of 800, measured)",
    )
    parser.add_argument(
        "--noisy-catch",
        type=float,
        default=0.96,
        help="a noisy cheat's chance of failing a check (default 0.96, the least measured)",
    )
    parser.add_argument(
        "--strikes",
        type=int,
        default=STRIKES,
        help=f"statistical failures in a row that ban a noisy worker (default {STRIKES}; 1: no strikes)",
    )
    parser.add_argument("--noisy-jobs", type=int, default=1000, help="jobs per honest noisy worker (strikes)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = {
        "base": args.base,
        "cheaters": {
            name: cheater(cheats, args.base, args.identities, args.max_jobs, rng) for name, cheats in STRATEGIES
        },
        "honest": {
            kind: honest_workers(args.base, args.workers, 100, args.price, kind == "exact", rng)
            for kind in ("exact", "noisy")
        },
        "noisy_honest": noisy_honest(args.base, args.workers, args.noisy_jobs, args.noisy_false, args.strikes, rng),
        "noisy_cheaters": {
            name: noisy_cheater(cheats, args.base, args.identities, args.max_jobs, args.noisy_catch, args.strikes, rng)
            for name, cheats in STRATEGIES[:3]
        },
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"base spot-check probability {args.base}; {args.identities:,} identities per cheater")
    print()
    print("| cheater (new identity after each catch) | unchecked cheated jobs / identity | honest jobs / identity "
          "| credit window when caught (tokens) |")  # fmt: skip
    print("|---|---:|---:|---:|")
    for name, r in results["cheaters"].items():
        credit = "–" if r["credit_when_caught"] is None else f"{r['credit_when_caught']:.0f}"
        never = f" ({r['never_caught']} never caught)" if r["never_caught"] else ""
        print(f"| {name}{never} | {r['unchecked_cheats_per_identity']:.2f} | {r['honest_jobs_per_identity']:.1f} "
              f"| {credit} |")  # fmt: skip
    print()
    print("| honest worker, first 100 jobs | checks | spot-check spend / job spend: mean | p95 | worst "
          "| credit window after (tokens) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for kind, r in results["honest"].items():
        spend = " | ".join(f"{100 * r[k]:.2f}%" for k in ("spend_ratio_mean", "spend_ratio_p95", "spend_ratio_max"))
        print(f"| {kind} ({r['workers']:,} workers) | {r['checks_mean']:.1f} | {spend} | {r['credit_after']} |")
    r = results["noisy_honest"]
    print()
    print(f"Noisy workers under strikes ({args.strikes} statistical failure(s) in a row ban):")
    print()
    print("| honest noisy worker, one requester | checks | banned within 100 jobs | within "
          f"{r['jobs']:,} jobs |")  # fmt: skip
    print("|---|---:|---:|---:|")
    print(f"| fails {100 * r['false_rate']:.1f}% of checks ({r['workers']:,} workers) | {r['checks_mean']:.1f} "
          f"| {100 * r['banned_within_100']:.2f}% | {100 * r['banned_within_all']:.2f}% |")  # fmt: skip
    print()
    print(f"| noisy cheater caught in {100 * args.noisy_catch:.0f}% of checks (new identity after each ban) "
          "| unchecked cheated jobs / identity | struck, not yet banned / identity | jobs / identity |")  # fmt: skip
    print("|---|---:|---:|---:|")
    for name, r in results["noisy_cheaters"].items():
        print(f"| {name} | {r['unchecked_cheats_per_identity']:.2f} | {r['struck_cheats_per_identity']:.2f} "
              f"| {r['jobs_per_identity']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
