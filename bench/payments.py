"""What paying costs on the deposit scheme: decode speed, first token from a never-seen worker, capital locked.

    .venv/bin/python bench/payments.py [--runs 5] [--tokens 128] [--trials 3]

On a fresh anvil with the contracts, real `llmarket serve` processes (the default
SmolLM2, greedy) and an in-process requester (`run_job`, the code behind
`llmarket request`) that pays from one deposit in the DepositEscrow:

1. Payment overhead: a free worker and a paid worker (same machine, one at a time,
   fresh processes); decode tokens/s and time to first token, medians of --runs jobs
   each. Target: paid ≥ 99% of free tokens/s.
2. First token from a never-seen worker against a known one: two paid workers; each
   trial is a fresh requester (its own deposit) that runs a job on worker A (its
   first contact: warm-up), one more on A (known), then one on B (never seen: no
   pair, no slot; the worker reads the requester's account from chain before
   admitting it), and one more on A (known). Time to first token of the B job
   against the mean of the two known ones, medians over --trials; the requester's
   nonce is checked not to move (no transaction before the first token, nor after).
   Target: within +20 ms. On a loaded machine that end-to-end figure is noise-bound,
   so the one step that differs is also timed alone: the worker's admission
   (``DepositMetering.admit``) of a never-seen requester (its account and the pair
   read from chain, 2 reads) against a known one (read from the cache), in-process on
   the same anvil, for --admissions fresh requesters.
2c. What one receipt costs each side, timed alone (--receipts of them, no chain): the
   requester raising the pair's total in its SQLite wallet (committed,
   ``synchronous=FULL``) and signing it; the worker checking the signature and
   committing the credit to its ledger. With a receipt every half credit window,
   this bounds what paying takes from decoding, whatever the machine's load.
3. Capital a gateway locks for 8 concurrent streams on 8 workers, computed (no
   chain): one deposit + a reserve on the deposit scheme, against the channels the
   removed channel scheme opened (a deposit of the worst case × 11 per channel, one
   channel per concurrent job on a worker: 8 channels, and 8 more when the 8
   streams pile on one worker).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import trio
from web3 import HTTPProvider, Web3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.app.paid import payer_for, requester_wallet  # noqa: E402
from node.app.requester import open_requester  # noqa: E402
from node.dev.devchain import DevChain  # noqa: E402
from node.inference.sampling import SamplingParams  # noqa: E402
from node.market.requester import JobObserver, JobSpec, run_job  # noqa: E402
from node.market.routing import Reputation, RouteQuery  # noqa: E402
from node.models.default import DEFAULT_MODEL_CID  # noqa: E402
from node.net.identity import load_or_create_account  # noqa: E402
from node.payments.deployment import deploy_contracts, write_deployment  # noqa: E402
from node.payments.deposit_metering import DepositMetering  # noqa: E402
from node.payments.deposits import DepositClient  # noqa: E402
from node.payments.ledger import WorkerLedger  # noqa: E402
from node.payments.payer import CREDIT_TOKENS, DepositPayer  # noqa: E402
from node.payments.policy import job_cost, worst_case_cost  # noqa: E402
from node.protocol.messages import JobRequest  # noqa: E402

logging.getLogger("libp2p").setLevel(logging.CRITICAL)
PRICE = 10**15


@contextmanager
def worker(root: Path, name: str, chain: DevChain, price: int, *extra: str):
    data = root / name
    account = load_or_create_account(data, insecure_dev_key=True, chain_id=31337)
    chain.rpc("anvil_setBalance", account.address, hex(10**20))
    cmd = [sys.executable, "-m", "node", "--data-dir", str(data), "serve", "--price", str(price), *extra]
    if price:
        cmd += ["--rpc-url", chain.rpc_url, "--deployments", str(root / "deployments"), "--insecure-dev-key"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield proc.stdout.readline().strip(), account.address
    finally:
        proc.terminate()
        proc.wait()


PROMPT = "Write a long, detailed story about the sea."


class TextTimes(JobObserver):
    """Notes when (``time.perf_counter()``) each piece of a job's text arrives, in ``stamps``."""

    def __init__(self, stamps: list[float]) -> None:
        self.stamps = stamps

    def on_text(self, piece: str) -> None:
        self.stamps.append(time.perf_counter())


async def jobs(root, chain, addrs, plan, *, paid, wallet_dir, tokens) -> list[tuple[float, float]]:
    """Run one job per peer id in ``plan`` (None: any worker), in order, from one requester; returns
    [(time to first token, decode tokens/s)]."""
    wallet = requester_wallet(wallet_dir, chain.rpc_url, root / "deployments", insecure_dev_key=True) if paid else None
    params = SamplingParams(max_tokens=tokens, temperature=0, repeat_penalty=1.0)
    out = []
    async with open_requester(wallet_dir, tuple(addrs)) as requester:
        await requester.wait_for_model(DEFAULT_MODEL_CID, 30)
        want = {a.rsplit("/p2p/", 1)[1] for a in addrs}
        while {o.peer_id for o in requester.offers()} < want:
            await trio.sleep(0.1)  # polling interval: every worker's offer, before timing anything
        payer = payer_for(wallet) if paid else None
        for i, peer in enumerate(plan):
            query = RouteQuery(
                model=DEFAULT_MODEL_CID, max_price_per_1k=PRICE if paid else 0, free_only=not paid,
                chain_id=31337 if paid else 0, escrow=wallet.escrow if paid else "", pinned_peer=peer,
            )  # fmt: skip
            stamps: list[float] = []
            messages = [{"role": "user", "content": f"{PROMPT} ({i})"}]
            spec = JobSpec(DEFAULT_MODEL_CID, params, messages=messages, max_price_per_1k=query.max_price_per_1k)
            began = time.perf_counter()
            result = await run_job(
                requester.host, requester.offers, query, spec, reputation=Reputation(), payer=payer,
                observer=TextTimes(stamps),
            )  # fmt: skip
            n_tok = result.completion_tokens
            out.append((stamps[0] - began, (n_tok - 1) / (stamps[-1] - stamps[0]) if n_tok > 1 else 0.0))
    return out


async def admissions(w3, deployment, chain, root: Path, requesters: list) -> list[tuple[float, float]]:
    """(never-seen, known) admission times in ms of one job from each of ``requesters`` by one worker."""
    worker = chain.accounts[1]
    metering = DepositMetering(DepositClient(w3, deployment, worker), WorkerLedger(root / "admit.db"), PRICE)
    out = []
    for account in requesters:
        peer = "12D3KooWbench"  # the terms are bound to the peer that sends them (none here: admit is told)
        payer = DepositPayer(DepositClient(w3, deployment, account), None, peer)  # terms only: no receipt signed
        offer = type("O", (), {"price_per_1k": PRICE, "payee": worker.address, "peer_id": "x"})()
        times = []
        for i in range(2):
            request = JobRequest(f"j{i}", DEFAULT_MODEL_CID, {"max_tokens": 64}, prompt="Why is the sky blue?")
            async with payer.pay(offer, request) as payment:
                began = time.perf_counter()
                await metering.admit(payment.request, peer)
                times.append(1000 * (time.perf_counter() - began))
        out.append((times[0], times[1]))
    return out


def receipt_costs(root: Path, n: int) -> tuple[float, float]:
    """Median ms per receipt: (requester: allocate + sign, worker: check + credit), over ``n`` receipts."""
    from eth_account import Account

    from node.payments.deposit_receipts import DepositDomain, check_receipt, sign_receipt
    from node.payments.ledger import WalletLedger

    requester, worker = Account.create(), Account.create()
    domain = DepositDomain(31337, "0x" + "dd" * 20)
    wallet, ledger = WalletLedger(root / "rc-wallet.db"), WorkerLedger(root / "rc-worker.db")
    step = job_cost(0, CREDIT_TOKENS // 2, PRICE)
    sides: tuple[list[float], list[float]] = ([], [])
    for _ in range(n):
        began = time.perf_counter()
        total = wallet.allocate(domain.chain_id, domain.escrow, worker.address, step)
        signature = sign_receipt(requester, domain, worker.address, total)
        mid = time.perf_counter()
        check_receipt(domain, requester.address, worker.address, total, signature)
        ledger.credit_pair(domain.chain_id, domain.escrow, requester.address, total, signature, step, floor=0)
        sides[0].append(1000 * (mid - began))
        sides[1].append(1000 * (time.perf_counter() - mid))
    return statistics.median(sides[0]), statistics.median(sides[1])


def print_admissions(admitted: list[tuple[float, float]]) -> None:
    cold, warm = statistics.median(a[0] for a in admitted), statistics.median(a[1] for a in admitted)
    print()
    print(f"| the worker's admission of a job (DepositMetering.admit), median of {len(admitted)} requesters | ms |")
    print("|---|---:|")
    print(f"| a requester it knows (account read from its cache) | {warm:.2f} |")
    print(f"| a requester it never saw (account and pair read from chain) | {cold:.2f} ({cold - warm:+.2f}) |")


def print_receipts(requester_ms: float, worker_ms: float, n: int) -> None:
    print()
    print(f"| one receipt, median of {n} (one every half credit window: 8 to {CREDIT_TOKENS // 2} tokens) | ms |")
    print("|---|---:|")
    print(f"| requester: raise the pair's total (SQLite, committed) and sign it | {requester_ms:.2f} |")
    print(f"| worker: check the signature and commit the credit (SQLite) | {worker_ms:.2f} |")


def capital(prompt_tokens: int = 1000, max_tokens: int = 256, streams: int = 8) -> list[tuple[str, int]]:
    """Capital locked for ``streams`` concurrent streams of this size on ``streams`` workers, in worst cases."""
    worst = worst_case_cost(prompt_tokens, max_tokens, PRICE)
    channel = worst * (1 + CHANNEL_MARGIN)  # the channel payer's deposit_for(worst, margin=10)
    return [
        ("deposit scheme: one deposit (every stream's worst case at once)", streams * worst),
        ("deposit scheme: + a reserve of one worst case per slot, 8 slots", streams * worst + streams * worst),
        ("channels: one per worker (8 channels)", streams * channel),
        ("channels: + 8 streams piled on one worker (8 more channels)", 2 * streams * channel),
    ]


#: The removed channel scheme's deposit margin: a channel held the job's worst case × (1 + 10), so that later jobs
#: could reuse it (node/payments/policy.py ``deposit_for`` before issue 20).
CHANNEL_MARGIN = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--admissions", type=int, default=30)
    parser.add_argument("--admission-only", action="store_true", help="time the worker's admission step only")
    parser.add_argument("--receipts", type=int, default=200)
    parser.add_argument("--receipts-only", action="store_true", help="time one receipt on each side only")
    args = parser.parse_args()
    if args.receipts_only:
        with tempfile.TemporaryDirectory() as tmp:
            print_receipts(*receipt_costs(Path(tmp), args.receipts), args.receipts)
        return
    with tempfile.TemporaryDirectory() as tmp, DevChain.start() as chain:
        root = Path(tmp)
        costs = receipt_costs(root, args.receipts)
        w3 = Web3(HTTPProvider(chain.rpc_url))
        deployment = deploy_contracts(w3, chain.accounts[0].address)
        write_deployment(deployment, root / "deployments")
        owner = DepositClient(w3, deployment, chain.accounts[0])

        def fund(wallet_dir: Path) -> str:
            account = load_or_create_account(wallet_dir, insecure_dev_key=True, chain_id=31337)
            chain.rpc("anvil_setBalance", account.address, hex(10**20))
            owner.send(owner.token.functions.transfer(account.address, 1000 * 10**18), "fund")
            DepositClient(w3, deployment, account).deposit(100 * 10**18, permit=True)  # its one transaction
            return account.address

        # 2b. the admission step alone
        fresh = []
        for k in range(args.admissions):
            fund(root / f"r-admit-{k}")
            fresh.append(load_or_create_account(root / f"r-admit-{k}", insecure_dev_key=True, chain_id=31337))
        admitted = trio.run(admissions, w3, deployment, chain, root, fresh)
        if args.admission_only:
            print_admissions(admitted)
            return
        # 1. overhead: free, then paid from a deposit (a warm-up job first)
        with worker(root, "free", chain, 0) as (addr, _):
            free = trio.run(
                lambda: jobs(
                    root, chain, [addr], [None] * args.runs, paid=False, wallet_dir=root / "r-free", tokens=args.tokens
                )  # fmt: skip
            )
        fund(root / "r-paid")
        with worker(root, "paid", chain, PRICE) as (addr, _):
            paid = trio.run(
                lambda: jobs(
                    root,
                    chain,
                    [addr],
                    [None] * (args.runs + 1),
                    paid=True,
                    wallet_dir=root / "r-paid",
                    tokens=args.tokens,
                )  # fmt: skip
            )[1:]
        # 2. a never-seen worker against a known one
        new_ms, known_ms, moved = [], [], 0
        with worker(root, "a", chain, PRICE) as (a, _), worker(root, "b", chain, PRICE) as (b, _):
            pa, pb = a.rsplit("/p2p/", 1)[1], b.rsplit("/p2p/", 1)[1]
            for k in range(args.trials):
                address = fund(root / f"r-new-{k}")
                nonce = w3.eth.get_transaction_count(address)
                times = trio.run(
                    lambda k=k: jobs(
                        root, chain, [a, b], [pa, pa, pb, pa], paid=True, wallet_dir=root / f"r-new-{k}", tokens=8
                    )  # fmt: skip
                )
                moved += w3.eth.get_transaction_count(address) - nonce
                new_ms.append(1000 * times[2][0])
                known_ms.append(1000 * (times[1][0] + times[3][0]) / 2)

    def med(rows, k):
        return statistics.median(r[k] for r in rows)

    ratio = med(paid, 1) / med(free, 1)
    print("| measurement | free | paid (deposit) |")
    print("|---|---:|---:|")
    label = f"decode tokens/s, median of {args.runs}"
    print(f"| {label} | {med(free, 1):.1f} | {med(paid, 1):.1f} ({ratio:.1%}) |")
    print(f"| time to first token, ms | {1000 * med(free, 0):.0f} | {1000 * med(paid, 0):.0f} |")
    print()
    new, known = statistics.median(new_ms), statistics.median(known_ms)
    print(f"| first token, median of {args.trials} fresh requesters | ms |")
    print("|---|---:|")
    print(f"| a known worker (pair exists) | {known:.0f} |")
    print(f"| a never-seen worker (no pair, no slot) | {new:.0f} ({new - known:+.0f}) |")
    print(f"| transactions by the requester during the jobs | {moved} |")
    trials = ", ".join(f"{n:.0f}/{k:.0f}" for n, k in zip(new_ms, known_ms, strict=True))
    print(f"| per trial: never-seen / known, ms | {trials} |")
    print_admissions(admitted)
    print_receipts(*costs, args.receipts)
    print()
    print(f"| capital for 8 concurrent streams on 8 workers (1,000-token prompts, 256 max tokens, {PRICE} per 1k) "
          "| base units | worst cases |")  # fmt: skip
    print("|---|---:|---:|")
    worst = worst_case_cost(1000, 256, PRICE)
    for label, amount in capital():
        print(f"| {label} | {amount:,} | {amount // worst} |")


if __name__ == "__main__":
    main()
