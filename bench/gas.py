"""Gas used by the deposit escrow (``DepositEscrow``), measured on a real anvil with the shipped contracts.

    .venv/bin/python bench/gas.py            # prints Markdown tables

Each of 100 requesters deposits and funds a reserve once (with permits); the
gas per job at one job per worker is that funding divided by 100 jobs plus one
receipt's redemption, either alone (``claim``) or as one of 100 receipts from
100 requesters in one ``claimBatch``, for a (requester, worker) pair's
first-ever claim and for a repeat pair. Numbers are gasUsed from transaction
receipts, so they are exact for this compiler build.

The "channels" column is the removed channel scheme's figure, kept as a
documented number (``CHANNEL_GAS_PER_JOB``): open + claim + close of one
``InferenceEscrow`` channel per job, as measured before issue 20 removed it.
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

TOKEN = 10**18
DAY = 86_400


def gas(receipt: dict) -> int:
    return receipt["gasUsed"]


def main() -> None:
    deposits()


#: The removed channel scheme's gas per job at one job per worker: open (with permit) + claim + close of one
#: InferenceEscrow channel, as bench/gas.py measured it before issue 20 (docs/benchmarks.md).
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
