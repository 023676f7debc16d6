"""DepositEscrow on a real anvil: every function's happy path, and every attack of issue 20.

Each attack test would fail on a naive contract: one whose reserve is a pool
any worker drains, whose withdrawal is immediate, whose receipts do not name
the worker, escrow and chain, that accepts high-s twins, pays whoever submits a
receipt, adds amounts without checking for 128-bit room, or has no reentrancy
guard.
"""

from __future__ import annotations

import pytest
from eth_account import Account
from web3 import HTTPProvider, Web3
from web3.logs import DISCARD

from node.errors import ContractReverted, InvalidReceipt, PaymentError
from node.payments.artifacts import Artifact, load_artifact, load_build_artifact
from node.payments.deployment import DEFAULT_UNLOCK_PERIOD_S, Deployment, _deploy
from node.payments.deposit_receipts import DepositDomain, check_receipt, receipt_digest, sign_receipt
from node.payments.deposits import DepositAccount, DepositClient, PairState, claimable, guarantee

from .conftest import TOKEN

pytestmark = pytest.mark.slow

DAY = 86_400
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
NO_PERMIT = (0, 27, b"\x00" * 32, b"\x00" * 32)


def _client(chain, account=None, deployment=None) -> DepositClient:
    return DepositClient(Web3(HTTPProvider(chain.chain.rpc_url)), deployment or chain.deployment, account)


def _new_account(chain, tokens: int = 0):
    """A fresh key with ETH for gas and, optionally, tokens (the snapshot is reverted after the test)."""
    account = Account.create()
    chain.chain.rpc("anvil_setBalance", account.address, hex(10**20))
    if tokens:
        owner = _client(chain, chain.deployer)
        owner.send(owner.token.functions.transfer(account.address, tokens), "fund")
    return account


def _events(client, receipt, name):
    return [dict(e["args"]) for e in getattr(client.escrow.events, name)().process_receipt(receipt, errors=DISCARD)]


def _reverts(error_name, fn, *args, **kwargs):
    with pytest.raises(PaymentError) as info:
        fn(*args, **kwargs)
    assert info.value.error == error_name, str(info.value)
    return info.value


def _funded(chain, deposit=100 * TOKEN, reserve=0, slots=1, account=None):
    requester = _client(chain, account or chain.requester)
    if deposit:
        requester.deposit(deposit)
    if reserve:
        requester.fund_reserve(reserve, slots)
    return requester


def _held(client) -> int:
    return client.token_balance(client.address)


# ------------------------------------------------------------------ happy paths


def test_deposit_and_deposit_with_permit(chain):
    requester = _client(chain, chain.requester)
    receipt = requester.deposit(40 * TOKEN)
    assert _events(requester, receipt, "Deposited") == [
        {"requester": chain.requester.address, "amount": 40 * TOKEN, "deposit": 40 * TOKEN}
    ]
    before = requester.w3.eth.get_transaction_count(chain.requester.address)
    requester.deposit(2 * TOKEN, permit=True)
    assert requester.w3.eth.get_transaction_count(chain.requester.address) == before + 1  # no approve
    assert requester.account_of(chain.requester.address) == DepositAccount(42 * TOKEN, 0, 0, 0, 0, 0)
    assert _held(requester) == 42 * TOKEN
    assert requester.unlock_period() == DEFAULT_UNLOCK_PERIOD_S


def test_fund_reserve_sets_the_slots_until_a_worker_holds_one(chain):
    requester = _funded(chain, deposit=0)
    receipt = requester.fund_reserve(30 * TOKEN, 3)
    assert _events(requester, receipt, "ReserveFunded")[0]["reserveTotal"] == 30 * TOKEN
    requester.fund_reserve(10 * TOKEN, 4, permit=True)  # no slot used yet: K may change
    state = requester.account_of(chain.requester.address)
    assert (state.reserve_left, state.reserve_total, state.slots, state.share) == (
        40 * TOKEN,
        40 * TOKEN,
        4,
        10 * TOKEN,
    )
    _reverts("InvalidSlots", requester.fund_reserve, TOKEN, 0)
    _reverts("ZeroAmount", requester.send, requester.escrow.functions.fundReserve(0, 4), "fundReserve")
    _reverts("ZeroAmount", requester.send, requester.escrow.functions.deposit(0), "deposit")
    worker = _client(chain, chain.worker)
    worker.claim(chain.requester.address, TOKEN, requester.sign_receipt(chain.worker.address, TOKEN))  # takes a slot
    err = _reverts("InvalidSlots", requester.fund_reserve, TOKEN, 5)
    assert err.error_args == (5, 4)
    requester.fund_reserve(4 * TOKEN, 4)  # the same K is fine
    assert requester.account_of(chain.requester.address).share == 11 * TOKEN


def test_claim_pays_the_increase_into_earnings(chain):
    requester = _funded(chain)
    worker = _client(chain, chain.worker)
    r, w = chain.requester.address, chain.worker.address
    receipt = worker.claim(r, 10 * TOKEN, requester.sign_receipt(w, 10 * TOKEN))
    assert worker.claimed(receipt) == [
        {"requester": r, "worker": w, "cumulativeAmount": 10 * TOKEN, "fromDeposit": 10 * TOKEN, "fromReserve": 0}
    ]
    worker.claim(r, 25 * TOKEN, requester.sign_receipt(w, 25 * TOKEN))
    assert worker.pair_of(r, w) == PairState(25 * TOKEN, 0, False)  # no reserve: no slot
    assert worker.earnings_of(w) == 25 * TOKEN and worker.token_balance(w) == 0
    assert requester.account_of(r).deposit == 75 * TOKEN
    _reverts("NothingToClaim", worker.claim, r, 25 * TOKEN, requester.sign_receipt(w, 25 * TOKEN))
    _reverts("NothingToClaim", worker.claim, r, 5 * TOKEN, requester.sign_receipt(w, 5 * TOKEN))  # an old receipt
    receipt = worker.withdraw_earnings()
    assert _events(worker, receipt, "EarningsWithdrawn")[0]["amount"] == 25 * TOKEN
    assert worker.token_balance(w) == 25 * TOKEN and worker.earnings_of(w) == 0
    assert _held(worker) == 75 * TOKEN
    _reverts("ZeroAmount", worker.withdraw_earnings)


def test_a_slot_holder_draws_its_share_once_the_deposit_is_gone(chain):
    requester = _funded(chain, deposit=10 * TOKEN, reserve=40 * TOKEN, slots=4)
    worker = _client(chain, chain.worker)
    r, w = chain.requester.address, chain.worker.address
    signature = requester.sign_receipt(w, 30 * TOKEN)
    account, pair = requester.account_of(r), worker.pair_of(r, w)
    expected = claimable(account, pair, 30 * TOKEN)
    assert (expected.from_deposit, expected.from_reserve, expected.takes_slot) == (10 * TOKEN, 10 * TOKEN, True)
    receipt = worker.claim(r, 30 * TOKEN, signature)
    assert _events(worker, receipt, "SlotTaken") == [{"requester": r, "worker": w}]
    assert worker.claimed(receipt)[0]["fromReserve"] == 10 * TOKEN
    assert worker.pair_of(r, w) == PairState(20 * TOKEN, 10 * TOKEN, True)
    account = requester.account_of(r)
    assert (account.deposit, account.reserve_left, account.slots_used) == (0, 30 * TOKEN, 1)
    assert worker.guarantee_of(r, w) == 0 == guarantee(account, worker.pair_of(r, w))  # its share is used up
    _reverts("NothingAvailable", worker.claim, r, 30 * TOKEN, signature)
    requester.deposit(4 * TOKEN)  # a top-up lets the same receipt pay more
    worker.claim(r, 30 * TOKEN, signature)
    assert worker.pair_of(r, w).paid == 24 * TOKEN
    requester.fund_reserve(40 * TOKEN, 4)  # shares grow to 20: 10 more for this worker
    assert worker.guarantee_of(r, w) == 10 * TOKEN
    worker.claim(r, 30 * TOKEN, signature)
    assert worker.pair_of(r, w) == PairState(30 * TOKEN, 16 * TOKEN, True)
    assert worker.earnings_of(w) == 30 * TOKEN


def test_claim_batch_pays_many_requesters_in_one_transfer(chain):
    w = chain.worker.address
    a = _funded(chain, deposit=50 * TOKEN)
    b = _funded(chain, deposit=5 * TOKEN, reserve=20 * TOKEN, slots=2, account=chain.other_requester)
    c = _funded(chain, deposit=10 * TOKEN, account=chain.stranger)
    worker = _client(chain, chain.worker)
    worker.claim(chain.stranger.address, 10 * TOKEN, c.sign_receipt(w, 10 * TOKEN))  # c: nothing new below
    entries = [
        (chain.requester.address, 20 * TOKEN, a.sign_receipt(w, 20 * TOKEN)),
        (chain.other_requester.address, 12 * TOKEN, b.sign_receipt(w, 12 * TOKEN)),  # 5 deposit + 7 reserve
        (chain.stranger.address, 10 * TOKEN, c.sign_receipt(w, 10 * TOKEN)),  # already paid: skipped
    ]
    receipt = worker.claim_batch(entries)
    claimed = worker.claimed(receipt)
    assert [(e["requester"], e["fromDeposit"], e["fromReserve"]) for e in claimed] == [
        (chain.requester.address, 20 * TOKEN, 0),
        (chain.other_requester.address, 5 * TOKEN, 7 * TOKEN),
    ]
    transfers = worker.token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert [(t["args"]["to"], t["args"]["value"]) for t in transfers] == [(w, 32 * TOKEN)]  # one transfer
    assert worker.token_balance(w) == 32 * TOKEN and worker.earnings_of(w) == 10 * TOKEN
    assert worker.pair_of(chain.other_requester.address, w) == PairState(12 * TOKEN, 7 * TOKEN, True)
    # one bad signature reverts the whole batch
    good = (chain.requester.address, 25 * TOKEN, a.sign_receipt(w, 25 * TOKEN))
    forged = (chain.requester.address, 30 * TOKEN, b.sign_receipt(w, 30 * TOKEN))  # a's account, b's signature
    _reverts("InvalidSignature", worker.claim_batch, [good, forged])
    assert worker.pair_of(chain.requester.address, w).paid == 20 * TOKEN


def test_unlock_cancel_and_withdraw(chain):
    requester = _funded(chain, deposit=10 * TOKEN, reserve=20 * TOKEN, slots=2)
    r = chain.requester.address
    start = requester.token_balance(r)
    _reverts("NotUnlocking", requester.withdraw)
    _reverts("NotUnlocking", requester.cancel_unlock)
    receipt = requester.unlock()
    unlock_at = _events(requester, receipt, "UnlockStarted")[0]["unlockAt"]
    assert unlock_at == requester.account_of(r).unlock_at == requester.chain_time() + DEFAULT_UNLOCK_PERIOD_S
    _reverts("UnlockPending", requester.withdraw)
    assert _events(requester, requester.cancel_unlock(), "UnlockCancelled") == [{"requester": r}]
    assert not requester.account_of(r).unlocking
    requester.unlock()
    receipt = requester.deposit(TOKEN)  # any funding cancels a pending unlock
    assert _events(requester, receipt, "UnlockCancelled") == [{"requester": r}]
    assert requester.account_of(r).unlock_at == 0
    requester.unlock()
    chain.advance(DEFAULT_UNLOCK_PERIOD_S)
    receipt = requester.withdraw()
    assert _events(requester, receipt, "Withdrawn") == [{"requester": r, "amount": 31 * TOKEN}]
    assert requester.account_of(r) == DepositAccount(0, 0, 0, 2, 0, 0)
    assert requester.token_balance(r) == start - TOKEN + 31 * TOKEN
    assert _held(requester) == 0


def test_views_match_the_python_side(chain):
    client = _client(chain)
    w = chain.worker.address
    for amount in (0, 1, 10**18, 2**128 - 1):
        assert bytes(client.escrow.functions.receiptDigest(w, amount).call()) == receipt_digest(
            client.domain, w, amount
        )
    signature = sign_receipt(chain.requester, client.domain, w, 5)
    check_receipt(client.domain, chain.requester.address, w, 5, signature)
    with pytest.raises(InvalidReceipt):
        client.check_receipt(chain.requester.address, w, 5, signature, paid=5)
    with pytest.raises(InvalidReceipt):
        receipt_digest(client.domain, w, 2**128)  # the contract refuses these amounts too


def test_requesters_changed_names_who_moved(chain):
    client = _client(chain)
    start = client.block_number() + 1
    _funded(chain, deposit=TOKEN)
    _funded(chain, deposit=0, reserve=TOKEN, account=chain.other_requester)
    assert client.requesters_changed(start) == {chain.requester.address, chain.other_requester.address}


# ---------------------------------------------------------------------- attacks


def test_over_commitment_cannot_take_a_slot_holders_share(chain):
    """R signs receipts for far more than deposit + reserve, to honest workers and to its own sock puppets.

    The puppets claim first. Each honest worker that holds a slot and kept its
    exposure within its guarantee still gets all it is owed. (A naive contract
    with one shared reserve pool lets the puppets drain it first.)
    """
    r = chain.requester.address
    requester = _funded(chain, deposit=10 * TOKEN, reserve=30 * TOKEN, slots=3)
    honest = [_client(chain, _new_account(chain)) for _ in range(2)]
    for h in honest:  # a first small job each: the claim binds a slot (paid from the deposit)
        a = h.account.address
        h.claim(r, TOKEN, requester.sign_receipt(a, TOKEN))
        assert h.pair_of(r, a).has_slot and h.guarantee_of(r, a) == 10 * TOKEN
    # honest exposure since: within each one's bound, deposit left (8) + guarantee (10)
    owed = {h.account.address: TOKEN + 10 * TOKEN for h in honest}
    receipts = {a: requester.sign_receipt(a, amount) for a, amount in owed.items()}
    puppets = [_client(chain, _new_account(chain)) for _ in range(5)]
    first, *others = puppets  # 100 each: way beyond deposit + reserve
    first.claim(r, 100 * TOKEN, requester.sign_receipt(first.account.address, 100 * TOKEN))  # takes the free slot
    for p in others:  # no deposit left, no slot free: nothing
        _reverts("NothingAvailable", p.claim, r, 100 * TOKEN, requester.sign_receipt(p.account.address, 100 * TOKEN))
    drained = sum(p.earnings_of(p.account.address) for p in puppets)
    assert drained == 8 * TOKEN + 10 * TOKEN  # the rest of the deposit, and the one free slot's share
    assert requester.account_of(r).deposit == 0
    for h in honest:
        a = h.account.address
        assert h.guarantee_of(r, a) == 10 * TOKEN  # untouched by the puppets
        h.claim(r, owed[a], receipts[a])
        assert h.pair_of(r, a).paid == owed[a]  # everything it was owed
        assert h.earnings_of(a) == owed[a]
    for p in puppets:
        _reverts("NothingAvailable", p.claim, r, 100 * TOKEN, requester.sign_receipt(p.account.address, 100 * TOKEN))
    assert requester.account_of(r).reserve_left == 0
    paid = drained + sum(owed.values())
    assert paid == 40 * TOKEN == _held(requester)  # never more than deposit + reserve; all still held as earnings


def test_withdrawal_cannot_front_run_claims(chain):
    """R unlocks while a worker holds an unclaimed receipt: the worker still claims in the unlock period."""
    r, w = chain.requester.address, chain.worker.address
    requester = _funded(chain, deposit=50 * TOKEN, reserve=10 * TOKEN, slots=1)
    worker = _client(chain, chain.worker)
    signature = requester.sign_receipt(w, 55 * TOKEN)
    requester.unlock()
    _reverts("UnlockPending", requester.withdraw)  # a naive, immediate withdraw would take it all now
    chain.advance(DEFAULT_UNLOCK_PERIOD_S - 60)
    _reverts("UnlockPending", requester.withdraw)
    worker.claim(r, 55 * TOKEN, signature)  # claims keep working while unlocking
    chain.advance(60)
    start = requester.token_balance(r)
    requester.withdraw()
    assert requester.token_balance(r) == start + 5 * TOKEN
    assert worker.earnings_of(w) == 55 * TOKEN and _held(worker) == 55 * TOKEN


def test_receipts_do_not_replay_across_escrows_chains_or_pairs(chain):
    r, w = chain.requester.address, chain.worker.address
    requester = _funded(chain, deposit=50 * TOKEN)
    _funded(chain, deposit=50 * TOKEN, account=chain.other_requester)
    w3 = requester.w3
    second, block = _deploy(w3, load_artifact("DepositEscrow"), chain.deployer.address, chain.deployment.token, 3600)
    other = Deployment(chain.deployment.chain_id, chain.deployment.token, second, block, chain.deployer.address)
    _client(chain, chain.requester, other).deposit(50 * TOKEN)
    worker, worker2 = _client(chain, chain.worker, other), _client(chain, chain.other_worker)
    signature = requester.sign_receipt(w, 10 * TOKEN)
    _reverts("InvalidSignature", worker.claim, r, 10 * TOKEN, signature)  # another escrow
    for domain in (DepositDomain(1, chain.deployment.deposits), DepositDomain(chain.deployment.chain_id, second)):
        elsewhere = sign_receipt(chain.requester, domain, w, 10 * TOKEN)  # another chain; another escrow
        _reverts("InvalidSignature", _client(chain, chain.worker).claim, r, 10 * TOKEN, elsewhere)
    _reverts("InvalidSignature", worker2.claim, r, 10 * TOKEN, signature)  # another worker
    _reverts(
        "InvalidSignature", _client(chain, chain.worker).claim, chain.other_requester.address, 10 * TOKEN, signature
    )
    _client(chain, chain.worker).claim(r, 10 * TOKEN, signature)  # its own pair, escrow and chain
    assert _client(chain).pair_of(r, w).paid == 10 * TOKEN


def test_high_s_and_malformed_signatures_are_rejected(chain):
    r, w = chain.requester.address, chain.worker.address
    requester = _funded(chain)
    worker = _client(chain, chain.worker)
    signature = requester.sign_receipt(w, 10 * TOKEN)
    s = int.from_bytes(signature[32:64], "big")
    twin = signature[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - signature[64]])  # v 27 <-> 28
    assert Account._recover_hash(receipt_digest(requester.domain, w, 10 * TOKEN), signature=twin) == r  # valid twin
    with pytest.raises(InvalidReceipt, match="high s"):
        requester.check_receipt(r, w, 10 * TOKEN, twin)
    err = _reverts("InvalidSignature", worker.claim, r, 10 * TOKEN, twin)
    assert isinstance(err, InvalidReceipt)
    for bad in (signature[:64] + bytes([signature[64] - 27]), signature[:64], b"\x00" * 65, signature + b"\x00"):
        with pytest.raises(InvalidReceipt):
            requester.check_receipt(r, w, 10 * TOKEN, bad)
        _reverts("InvalidSignature", worker.claim, r, 10 * TOKEN, bad)
    worker.claim(r, 10 * TOKEN, signature)


def test_only_the_payee_can_claim(chain):
    r, w = chain.requester.address, chain.worker.address
    requester = _funded(chain)
    signature = requester.sign_receipt(w, 10 * TOKEN)
    for account in (chain.stranger, chain.requester, chain.other_worker):
        thief = _client(chain, account)
        _reverts("InvalidSignature", thief.claim, r, 10 * TOKEN, signature)
        _reverts("InvalidSignature", thief.claim_batch, [(r, 10 * TOKEN, signature)])
    assert requester.account_of(r).deposit == 100 * TOKEN
    _client(chain, chain.worker).claim(r, 10 * TOKEN, signature)
    assert _client(chain).earnings_of(w) == 10 * TOKEN


def test_amounts_near_2_128_and_2_256_are_amount_too_large(chain):
    r, w = chain.requester.address, chain.worker.address
    requester = _funded(chain, deposit=100 * TOKEN, reserve=10 * TOKEN, slots=1)
    esc = requester.escrow.functions
    owner = _client(chain, chain.deployer)
    owner.send(owner.token.functions.mint(r, 2**129), "mint")
    requester.approve(2**256 - 1)
    deposit = 100 * TOKEN
    for amount in (2**128 - deposit, 2**256 - deposit - 1, 2**256 - deposit, 2**256 - deposit + 1, 2**256 - 1):
        for call in (esc.deposit(amount), esc.depositWithPermit(amount, *NO_PERMIT)):
            err = _reverts("AmountTooLarge", requester.send, call, "deposit")
            assert isinstance(err, ContractReverted) and err.error_args == (amount,)
        for call in (esc.fundReserve(amount, 1), esc.fundReserveWithPermit(amount, 1, *NO_PERMIT)):
            _reverts("AmountTooLarge", requester.send, call, "fundReserve")
    _reverts("AmountTooLarge", requester.fund_reserve, 2**96, 1)  # a share over 96 bits
    requester.fund_reserve(2**96 - 10 * TOKEN - 1, 1)  # a share of exactly 2**96 - 1 is fine
    requester.deposit(2**128 - 1 - deposit)  # fills the 128 bits exactly
    assert requester.account_of(r).deposit == 2**128 - 1
    _reverts("AmountTooLarge", requester.deposit, 1)
    worker = _client(chain, chain.worker)
    for amount in (2**128, 2**256 - 1):
        signature = b"\x00" * 65  # checked before the signature: no valid signature exists for these anyway
        err = _reverts("AmountTooLarge", worker.claim, r, amount, signature)
        assert err.error_args == (amount,)
        _reverts("AmountTooLarge", worker.claim_batch, [(r, amount, signature)])
    worker.claim(r, 2**128 - 1, requester.sign_receipt(w, 2**128 - 1))  # the largest receipt pays in full
    assert worker.pair_of(r, w).paid == 2**128 - 1 and requester.account_of(r).deposit == 0
    assert worker.earnings_of(w) == 2**128 - 1


def test_reentrant_token_cannot_reenter(chain, brownie_build):
    """A hostile token calls back into the escrow from inside transfer(); the guard stops every path."""
    w3 = Web3(HTTPProvider(chain.chain.rpc_url))
    evil = Artifact.from_json(load_build_artifact(brownie_build, "ReentrantToken"))
    evil_address, _ = _deploy(w3, evil, chain.requester.address, 1000 * TOKEN)
    escrow, block = _deploy(w3, load_artifact("DepositEscrow"), chain.deployer.address, evil_address, 3600)
    deployment = Deployment(chain.deployment.chain_id, evil_address, escrow, block, chain.deployer.address)
    r, w = chain.requester.address, chain.worker.address
    requester, worker = DepositClient(w3, deployment, chain.requester), DepositClient(w3, deployment, chain.worker)
    evil_token = w3.eth.contract(address=evil_address, abi=evil.abi)
    requester.deposit(100 * TOKEN)
    worker.claim(r, 10 * TOKEN, requester.sign_receipt(w, 10 * TOKEN))
    batch = [(r, 20 * TOKEN, requester.sign_receipt(w, 20 * TOKEN))]
    reentries = [
        requester.escrow.functions.claim(r, 30 * TOKEN, requester.sign_receipt(w, 30 * TOKEN)),
        requester.escrow.functions.claimBatch(batch),
        requester.escrow.functions.withdrawEarnings(),
        requester.escrow.functions.withdraw(),
        requester.escrow.functions.unlock(),
    ]
    for reentry in reentries:
        for attempt in (worker.withdraw_earnings, lambda: worker.claim_batch(batch)):
            requester.send(evil_token.functions.arm(escrow, reentry._encode_transaction_data()), "arm")
            _reverts("ReentrancyGuardReentrantCall", attempt)
            requester.send(evil_token.functions.arm("0x" + "00" * 20, b""), "disarm")
    worker.claim_batch(batch)  # unarmed, the same calls go through
    worker.withdraw_earnings()
    assert worker.token_balance(w) == 20 * TOKEN and requester.account_of(r).deposit == 80 * TOKEN
    requester.unlock()
    chain.advance(3600)
    requester.send(evil_token.functions.arm(escrow, reentries[2]._encode_transaction_data()), "arm")
    _reverts("ReentrancyGuardReentrantCall", requester.withdraw)
    assert requester.account_of(r).deposit == 80 * TOKEN
