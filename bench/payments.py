"""What paying costs: speed, time to first token with a new channel, and gas per job as really settled.

    .venv/bin/python bench/payments.py [--runs 5] [--tokens 128]

On a fresh anvil with the contracts, real `llmarket serve` processes (the default
SmolLM2, greedy) and an in-process requester (`run_job`, the code behind
`llmarket request`):

1. Payment overhead: a free worker and a paid worker (same machine, one at a time,
   fresh processes), the paid one with its channel already open; decode tokens/s and
   time to first token, medians of --runs jobs each. Target: paid ≥ 95% of free tokens/s.
2. Time to first token of a paid job whose wallet has no channel yet (the open
   transaction with a permit, on anvil, is part of it). Median of 3 fresh wallets.
3. Gas per job for 1, 10 and 100 jobs on one channel, as the worker really settles
   them with its default policy (claim after every job) and batched (--settle-every
   1000, so only the close settles): the requester's open plus every transaction of
   the worker, plus the close, divided by the jobs.
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

from node.app.paid import requester_wallet  # noqa: E402
from node.app.requester import open_requester  # noqa: E402
from node.dev.devchain import DevChain  # noqa: E402
from node.inference.sampling import SamplingParams  # noqa: E402
from node.market.requester import JobObserver, JobSpec, run_job  # noqa: E402
from node.market.routing import Reputation, RouteQuery  # noqa: E402
from node.models.default import DEFAULT_MODEL_CID  # noqa: E402
from node.net.identity import load_or_create_account  # noqa: E402
from node.payments.close import ask_to_close  # noqa: E402
from node.payments.deployment import deploy_contracts, write_deployment  # noqa: E402
from node.payments.escrow import EscrowClient  # noqa: E402
from node.payments.payer import WalletPayer  # noqa: E402

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


def gas_of(w3: Web3, sender: str, first_block: int) -> int:
    total = 0
    for number in range(first_block, w3.eth.block_number + 1):
        for tx in w3.eth.get_block(number, full_transactions=True)["transactions"]:
            if tx["from"].lower() == sender.lower():
                total += w3.eth.get_transaction_receipt(tx["hash"])["gasUsed"]
    return total


PROMPT = "Write a long, detailed story about the sea."


class TextTimes(JobObserver):
    """Notes when (``time.perf_counter()``) each piece of a job's text arrives, in ``stamps``."""

    def __init__(self, stamps: list[float]) -> None:
        self.stamps = stamps

    def on_text(self, piece: str) -> None:
        self.stamps.append(time.perf_counter())


async def jobs(root, chain, addr, n, *, paid, wallet_dir, tokens) -> tuple[list, object]:
    """Run ``n`` jobs from one requester; returns [(ttft, decode tokens/s)] and its wallet."""
    wallet = requester_wallet(wallet_dir, chain.rpc_url, root / "deployments", insecure_dev_key=True) if paid else None
    query = RouteQuery(
        model=DEFAULT_MODEL_CID,
        max_price_per_1k=PRICE if paid else 0,
        free_only=not paid,
        chain_id=31337 if paid else 0,
        escrow=wallet.client.deployment.escrow if paid else "",
    )
    params = SamplingParams(max_tokens=tokens, temperature=0, repeat_penalty=1.0)
    out = []
    async with open_requester(wallet_dir, (addr,)) as requester:
        await requester.wait_for_model(DEFAULT_MODEL_CID, 30)
        for i in range(n):
            stamps: list[float] = []
            messages = [{"role": "user", "content": f"{PROMPT} ({i})"}]
            spec = JobSpec(DEFAULT_MODEL_CID, params, messages=messages, max_price_per_1k=query.max_price_per_1k)
            began = time.perf_counter()
            result = await run_job(
                requester.host, requester.offers, query, spec, reputation=Reputation(),
                payer=WalletPayer(wallet) if paid else None, observer=TextTimes(stamps),
            )  # fmt: skip
            n_tok = result.completion_tokens
            out.append((stamps[0] - began, (n_tok - 1) / (stamps[-1] - stamps[0]) if n_tok > 1 else 0.0))
        if paid:
            for channel in wallet.ledger.channels(status="open"):
                await ask_to_close(requester.host, channel.peer_id, [], wallet.client.account, channel.channel_id)
                wallet.ledger.update(channel.channel_id, status="closed")
    return out, wallet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, DevChain.start() as chain:
        root = Path(tmp)
        w3 = Web3(HTTPProvider(chain.rpc_url))
        deployment = deploy_contracts(w3, chain.accounts[0].address)
        write_deployment(deployment, root / "deployments")
        owner = EscrowClient(w3, deployment, chain.accounts[0])

        def fund(wallet_dir: Path) -> None:
            account = load_or_create_account(wallet_dir, insecure_dev_key=True, chain_id=31337)
            chain.rpc("anvil_setBalance", account.address, hex(10**20))
            owner.send(owner.token.functions.transfer(account.address, 1000 * 10**18), "fund")

        # 1. overhead: free, then paid with an open channel (a warm-up job opens it)
        with worker(root, "free", chain, 0) as (addr, _):
            free, _ = trio.run(
                lambda: jobs(root, chain, addr, args.runs, paid=False, wallet_dir=root / "r-free", tokens=args.tokens)
            )
        fund(root / "r-paid")
        with worker(root, "paid", chain, PRICE) as (addr, _):
            trio.run(lambda: jobs(root, chain, addr, 1, paid=True, wallet_dir=root / "r-paid", tokens=8))
            paid, _ = trio.run(
                lambda: jobs(root, chain, addr, args.runs, paid=True, wallet_dir=root / "r-paid", tokens=args.tokens)
            )
            # 2. a new channel each time
            new_channel = []
            for k in range(3):
                fund(root / f"r-new-{k}")
                first, _ = trio.run(
                    lambda k=k: jobs(root, chain, addr, 1, paid=True, wallet_dir=root / f"r-new-{k}", tokens=8)
                )
                new_channel.append(first[0][0])
        # 3. gas per job, default and batched settlement
        gas_rows = []
        for label, extra in (
            ("claim after every job (default)", ()),
            ("batched (--settle-every 1000)", ("--settle-every", "1000")),
        ):
            for n in (1, 10, 100):
                name = f"gas-{n}-{len(extra)}"
                fund(root / f"r-{name}")
                with worker(root, name, chain, PRICE, *extra) as (addr, worker_address):
                    start = w3.eth.block_number + 1
                    _, wallet = trio.run(
                        lambda n=n, name=name: jobs(
                            root, chain, addr, n, paid=True, wallet_dir=root / f"r-{name}", tokens=8
                        )
                    )
                    total = gas_of(w3, wallet.address, start) + gas_of(w3, worker_address, start)
                gas_rows.append((label, n, total / n))

    def med(rows, k):
        return statistics.median(r[k] for r in rows)

    ratio = med(paid, 1) / med(free, 1)
    print("| measurement | free | paid |")
    print("|---|---:|---:|")
    label = f"decode tokens/s (channel open), median of {args.runs}"
    print(f"| {label} | {med(free, 1):.1f} | {med(paid, 1):.1f} ({ratio:.1%}) |")
    print(f"| time to first token, ms | {1000 * med(free, 0):.0f} | {1000 * med(paid, 0):.0f} |")
    new = 1000 * statistics.median(new_channel)
    print(f"| time to first token with a new channel (open with permit), ms, median of 3 | | {new:.0f} |")
    print()
    print("| settlement | jobs per channel | gas per job (open + worker's claims + close) |")
    print("|---|---:|---:|")
    for label, n, per_job in gas_rows:
        print(f"| {label} | {n} | {per_job:,.0f} |")


if __name__ == "__main__":
    main()
