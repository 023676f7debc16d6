"""Gas used by the escrow, measured on a real anvil with the shipped contracts.

    .venv/bin/python bench/gas.py            # prints a Markdown table

Measures deploy, open (approve + open, or one transaction with permit), topUp,
claim, close and refund, then the gas per job when 1, 10 and 100 jobs share
one channel, for two settlement policies:

- settle once: the worker redeems only the last cumulative receipt, with close;
- claim every job: the worker claims after each job and closes after the last.

The requester's open is counted once per channel (with permit). Numbers are
gasUsed from transaction receipts, so they are exact for this compiler build;
"first ever" rows cost ~17k more than the steady state because a storage slot
goes from zero to non-zero: the escrow's token balance and channel counter,
the requester's permit nonce, the worker's token balance (shown separately).

Then the deposit scheme (``DepositEscrow``, issue 20): each of 100 requesters
deposits and funds a reserve once (with permits); the gas per job at one job
per worker is that funding divided by 100 jobs plus one receipt's redemption,
either alone (``claim``) or as one of 100 receipts from 100 requesters in one
``claimBatch``, for a (requester, worker) pair's first-ever claim and for a
repeat pair. ``--deposits-only`` skips the channel tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

from web3 import HTTPProvider, Web3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eth_account import Account  # noqa: E402

from node.dev.devchain import DevChain  # noqa: E402
from node.payments.deployment import deploy_contracts  # noqa: E402
from node.payments.deposits import DepositClient  # noqa: E402
from node.payments.escrow import EscrowClient  # noqa: E402

TOKEN = 10**18
DAY = 86_400


def gas(receipt: dict) -> int:
    return receipt["gasUsed"]


def main() -> None:
    if "--deposits-only" not in sys.argv:
        channels()
    deposits()


def channels() -> None:
    with DevChain.start(accounts=4) as chain:
        deployer, requester_key, worker_key, _ = chain.accounts
        w3 = Web3(HTTPProvider(chain.rpc_url))
        deployment = deploy_contracts(w3, deployer.address)
        # deployment gas, from the two creation transactions
        block_txs = [w3.eth.get_transaction_receipt(tx) for b in range(1, w3.eth.block_number + 1)
                     for tx in w3.eth.get_block(b)["transactions"]]  # fmt: skip
        deploy_token, deploy_escrow = (gas(r) for r in block_txs[:2])
        owner = EscrowClient(w3, deployment, deployer)
        owner.send(owner.token.functions.transfer(requester_key.address, 10**6 * TOKEN), "fund")
        requester = EscrowClient(w3, deployment, requester_key)
        worker = EscrowClient(w3, deployment, worker_key)
        esc = requester.escrow.functions

        def open_channel(amount: int, *, permit: bool) -> tuple[bytes, int]:
            expiry = requester.chain_time() + DAY
            if permit:
                v, r, s, deadline = requester.sign_permit(amount)
                receipt = requester.send(
                    esc.openWithPermit(worker_key.address, amount, expiry, deadline, v, r, s), "open"
                )
            else:
                receipt = requester.send(esc.open(worker_key.address, amount, expiry), "open")
            return requester.opened_channel_id(receipt), gas(receipt)

        rows: list[tuple[str, int]] = [("deploy LLMToken", deploy_token), ("deploy InferenceEscrow", deploy_escrow)]
        requester.approve(TOKEN)
        _, open_first = open_channel(TOKEN, permit=False)
        approve = gas(requester.approve(100 * TOKEN))
        channel, open_plain = open_channel(100 * TOKEN, permit=False)
        _, permit_first = open_channel(100 * TOKEN, permit=True)
        _, open_permit = open_channel(100 * TOKEN, permit=True)
        rows += [
            ("open (the escrow's first channel ever)", open_first),
            ("approve (before a plain open)", approve),
            ("open", open_plain),
            ("openWithPermit (the requester's first permit)", permit_first),
            ("openWithPermit (one transaction, no approve)", open_permit),
        ]
        requester.approve(10 * TOKEN)
        rows.append(
            ("topUp", gas(requester.send(esc.topUp(channel, 10 * TOKEN, requester.chain_time() + 2 * DAY), "topUp")))
        )
        first_claim = gas(worker.claim(channel, TOKEN, requester.sign_receipt(channel, TOKEN)))
        claim = gas(worker.claim(channel, 2 * TOKEN, requester.sign_receipt(channel, 2 * TOKEN)))
        close = gas(worker.close(channel, 3 * TOKEN, requester.sign_receipt(channel, 3 * TOKEN)))
        rows += [("claim (worker's first ever)", first_claim), ("claim", claim), ("close", close)]
        refund_channel, _ = open_channel(TOKEN, permit=True)
        chain.rpc("evm_increaseTime", DAY + 1)
        chain.rpc("evm_mine")
        rows.append(("refund (after expiry)", gas(requester.refund(refund_channel))))

        per_job = []
        for jobs in (1, 10, 100):
            price = 10**15
            once_id, once_open = open_channel(jobs * price, permit=True)
            once_total = once_open + gas(
                worker.close(once_id, jobs * price, requester.sign_receipt(once_id, jobs * price))
            )
            each_id, each_open = open_channel(jobs * price, permit=True)
            each_total = each_open
            for job in range(1, jobs):
                each_total += gas(worker.claim(each_id, job * price, requester.sign_receipt(each_id, job * price)))
            each_total += gas(worker.close(each_id, jobs * price, requester.sign_receipt(each_id, jobs * price)))
            per_job.append((jobs, once_total / jobs, each_total / jobs))

    print("| operation | gas |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:,} |")
    print()
    print("| jobs per channel | gas per job, settle once (open + close) | gas per job, claim every job |")
    print("|---:|---:|---:|")
    for jobs, once, each in per_job:
        print(f"| {jobs} | {once:,.0f} | {each:,.0f} |")


#: The channel scheme's gas per job at one job per worker (docs/benchmarks.md, paid jobs: open + claim + close).
CHANNEL_GAS_PER_JOB = 246_761
JOBS = 100  # jobs a requester's funding is amortised over; also receipts per batch


def deposits() -> None:
    """Gas of the deposit scheme (DepositEscrow)."""
    with DevChain.start(accounts=4) as chain:
        deployer = chain.accounts[0]
        w3 = Web3(HTTPProvider(chain.rpc_url))
        deployment = deploy_contracts(w3, deployer.address)
        owner = DepositClient(w3, deployment, deployer)
        deploy_gas = gas(w3.eth.get_transaction_receipt(w3.eth.get_block(3)["transactions"][0]))

        def account() -> DepositClient:
            key = Account.create()
            chain.rpc("anvil_setBalance", key.address, hex(10**20))
            return DepositClient(w3, deployment, key)

        requesters = [account() for _ in range(JOBS)]
        for r in requesters:
            owner.send(owner.token.functions.transfer(r.account.address, 1000 * TOKEN), "fund")
        funding = []
        for r in requesters:
            first = gas(r.deposit(100 * TOKEN, permit=True))
            reserve = gas(r.fund_reserve(100 * TOKEN, 8, permit=True))
            funding.append((first, reserve))
        fund_first, reserve_first = funding[-1]
        r0 = requesters[0]
        deposit_again = gas(r0.deposit(10 * TOKEN, permit=True))
        reserve_again = gas(r0.fund_reserve(10 * TOKEN, 8, permit=True))
        per_requester = fund_first + reserve_first  # deposit + reserve, once, amortised over JOBS jobs
        amortised = per_requester / JOBS

        # single claims: a worker with earnings already (its first claim ever creates that slot)
        worker = account()
        price = 10**15
        worker_first = gas(worker.claim(requesters[0].account.address, price, requesters[0].sign_receipt(
            worker.account.address, price)))  # fmt: skip
        single_first = []  # a new pair each (the pair takes one of the requester's 8 slots)
        for r in requesters[1:11]:
            single_first.append(
                gas(worker.claim(r.account.address, price, r.sign_receipt(worker.account.address, price)))
            )
        single_repeat = []
        for r in requesters[1:11]:
            amount = 2 * price
            single_repeat.append(
                gas(worker.claim(r.account.address, amount, r.sign_receipt(worker.account.address, amount)))
            )
        withdraw_earnings = gas(worker.withdraw_earnings())

        # batches of 100 receipts from 100 requesters, to a worker that holds tokens already
        batcher = account()
        owner.send(owner.token.functions.transfer(batcher.account.address, 1), "dust")
        first_batch = [(r.account.address, price, r.sign_receipt(batcher.account.address, price)) for r in requesters]
        batch_first = gas(batcher.claim_batch(first_batch)) / JOBS
        repeat_batch = [(r.account.address, 2 * price, r.sign_receipt(batcher.account.address, 2 * price))
                        for r in requesters]  # fmt: skip
        batch_repeat = gas(batcher.claim_batch(repeat_batch)) / JOBS

        r0.unlock()
        chain.rpc("evm_increaseTime", DAY + 1)
        chain.rpc("evm_mine")
        withdraw = gas(r0.withdraw())

    first = sum(single_first) / len(single_first)
    repeat = sum(single_repeat) / len(single_repeat)
    print()
    print("Deposit scheme (DepositEscrow):")
    print()
    print("| operation | gas |")
    print("|---|---:|")
    for name, value in [
        ("deploy DepositEscrow", deploy_gas),
        ("depositWithPermit (the requester's first)", fund_first),
        ("fundReserveWithPermit (the requester's first)", reserve_first),
        ("depositWithPermit (again)", deposit_again),
        ("fundReserveWithPermit (again)", reserve_again),
        ("claim (the worker's first ever: its earnings slot is created)", worker_first),
        ("claim (first-ever pair; takes a reserve slot)", round(first)),
        ("claim (repeat pair)", round(repeat)),
        ("withdrawEarnings", withdraw_earnings),
        (f"claimBatch of {JOBS} receipts from {JOBS} requesters, per receipt (first-ever pairs)", round(batch_first)),
        (f"claimBatch of {JOBS} receipts from {JOBS} requesters, per receipt (repeat pairs)", round(batch_repeat)),
        ("unlock", None),
        ("withdraw (after the unlock period)", withdraw),
    ]:
        if value is not None:
            print(f"| {name} | {value:,} |")
    print()
    print(
        f"Gas per job at one job per worker (a requester's deposit + reserve, {per_requester:,} gas, over {JOBS} jobs):"
    )
    print()
    print("| settlement | first-ever pair | repeat pair | channels (open + claim + close) |")
    print("|---|---:|---:|---:|")
    for settlement, new_pair, old_pair in (
        ("one claim per job", first, repeat),
        (f"claimBatch of {JOBS}", batch_first, batch_repeat),
    ):
        print(f"| {settlement} | {amortised + new_pair:,.0f} | {amortised + old_pair:,.0f} | {CHANNEL_GAS_PER_JOB:,} |")


if __name__ == "__main__":
    main()
