"""InferenceEscrow on a real anvil: every function's happy path, and every attack."""

from __future__ import annotations

import pytest
from eth_account import Account
from web3.logs import DISCARD

from node.errors import ChannelExpired, ChannelNotOpen, ContractReverted, InvalidReceipt, PaymentError
from node.payments.escrow import ChannelStatus
from node.payments.receipts import ReceiptDomain, sign_receipt

from .conftest import TOKEN

pytestmark = pytest.mark.slow

DAY = 86_400


def _open(chain, amount=100 * TOKEN, expiry_in=DAY, worker=None, **kwargs):
    requester = chain.client(chain.requester)
    expiry = chain.now() + expiry_in
    channel_id = requester.open_channel((worker or chain.worker).address, amount, expiry, **kwargs)
    return requester, channel_id, expiry


def _events(client, receipt, name):
    return [e["args"] for e in getattr(client.escrow.events, name)().process_receipt(receipt, errors=DISCARD)]


# ------------------------------------------------------------------ happy paths


def test_open_locks_the_deposit(chain):
    requester, channel_id, expiry = _open(chain)
    state = requester.get_channel(channel_id)
    assert (state.requester, state.worker) == (chain.requester.address, chain.worker.address)
    assert (state.deposit, state.paid, state.expiry, state.status) == (100 * TOKEN, 0, expiry, ChannelStatus.OPEN)
    assert requester.token_balance(chain.deployment.escrow) == 100 * TOKEN


def test_open_with_permit_needs_no_approval(chain):
    requester = chain.client(chain.requester)
    assert requester.allowance(chain.requester.address) == 0
    before = requester.w3.eth.get_transaction_count(chain.requester.address)
    channel_id = requester.open_channel(chain.worker.address, 5 * TOKEN, chain.now() + DAY, permit=True)
    assert requester.w3.eth.get_transaction_count(chain.requester.address) == before + 1  # one transaction
    assert requester.get_channel(channel_id).deposit == 5 * TOKEN


def test_top_up_adds_funds_and_extends_expiry(chain):
    requester, channel_id, expiry = _open(chain)
    receipt = requester.top_up(channel_id, 50 * TOKEN, expiry + DAY)
    assert _events(requester, receipt, "ChannelToppedUp")[0]["deposit"] == 150 * TOKEN
    requester.top_up(channel_id, 0, expiry + 2 * DAY)  # zero amount: extend only
    requester.top_up(channel_id, 1 * TOKEN, expiry + 2 * DAY, permit=True)
    state = requester.get_channel(channel_id)
    assert (state.deposit, state.expiry) == (151 * TOKEN, expiry + 2 * DAY)


def test_claim_pays_the_difference_and_keeps_the_channel_open(chain):
    requester, channel_id, _ = _open(chain)
    worker = chain.client(chain.worker)
    worker.claim(channel_id, 10 * TOKEN, requester.sign_receipt(channel_id, 10 * TOKEN))
    receipt = worker.claim(channel_id, 25 * TOKEN, requester.sign_receipt(channel_id, 25 * TOKEN))
    assert _events(worker, receipt, "Claimed")[0]["amount"] == 15 * TOKEN
    assert worker.token_balance(chain.worker.address) == 25 * TOKEN
    state = worker.get_channel(channel_id)
    assert (state.paid, state.status) == (25 * TOKEN, ChannelStatus.OPEN)


def test_close_pays_the_worker_and_returns_the_rest(chain):
    requester, channel_id, _ = _open(chain)
    start = requester.token_balance(chain.requester.address)
    worker = chain.client(chain.worker)
    receipt = worker.close(channel_id, 30 * TOKEN, requester.sign_receipt(channel_id, 30 * TOKEN))
    assert _events(worker, receipt, "ChannelClosed")[0]["returned"] == 70 * TOKEN
    assert worker.token_balance(chain.worker.address) == 30 * TOKEN
    assert requester.token_balance(chain.requester.address) == start + 70 * TOKEN
    assert requester.token_balance(chain.deployment.escrow) == 0
    assert worker.get_channel(channel_id).status == ChannelStatus.CLOSED


def test_close_at_the_paid_amount_needs_no_signature(chain):
    requester, channel_id, _ = _open(chain)
    chain.client(chain.worker).close(channel_id, 0)
    assert requester.get_channel(channel_id).status == ChannelStatus.CLOSED
    assert requester.token_balance(chain.deployment.escrow) == 0


def test_refund_after_expiry_returns_the_unclaimed_rest(chain):
    requester, channel_id, _ = _open(chain, expiry_in=3600)
    worker = chain.client(chain.worker)
    worker.claim(channel_id, 40 * TOKEN, requester.sign_receipt(channel_id, 40 * TOKEN))
    before = requester.token_balance(chain.requester.address)
    chain.advance(3600)
    receipt = requester.refund(channel_id)
    assert _events(requester, receipt, "ChannelRefunded")[0]["amount"] == 60 * TOKEN
    assert requester.token_balance(chain.requester.address) == before + 60 * TOKEN
    assert requester.get_channel(channel_id).status == ChannelStatus.REFUNDED


def test_one_channel_pays_a_hundred_jobs(chain):
    """100 jobs, each adding to a cumulative receipt; the worker claims now and then, then closes."""
    requester, channel_id, _ = _open(chain, amount=1000 * TOKEN)
    worker = chain.client(chain.worker)
    start = requester.token_balance(chain.requester.address)
    owed = 0
    for job in range(1, 101):
        owed += job * 10**15  # job n costs n * 0.001 token
        signature = requester.sign_receipt(channel_id, owed)
        worker.check_receipt(worker.get_channel(channel_id), owed, signature)
        if job % 25 == 0 and job < 100:
            worker.claim(channel_id, owed, signature)
    worker.close(channel_id, owed, signature)
    assert owed == 5050 * 10**15
    assert worker.token_balance(chain.worker.address) == owed
    assert requester.token_balance(chain.requester.address) == start + 1000 * TOKEN - owed
    assert requester.token_balance(chain.deployment.escrow) == 0


def test_get_channel_of_an_unknown_id_is_empty(chain):
    state = chain.client().get_channel(b"\x01" * 32)
    assert state.status == ChannelStatus.NONE and state.deposit == 0


# ---------------------------------------------------------------------- attacks


def _reverts(error_name, fn, *args, **kwargs):
    with pytest.raises(PaymentError) as info:
        fn(*args, **kwargs)
    assert info.value.error == error_name, str(info.value)
    return info.value


def test_forged_signature_is_rejected(chain):
    requester, channel_id, _ = _open(chain)
    worker = chain.client(chain.worker)
    forged = sign_receipt(Account.create(), requester.domain, channel_id, 10 * TOKEN)
    err = _reverts("InvalidSignature", worker.claim, channel_id, 10 * TOKEN, forged)
    assert isinstance(err, InvalidReceipt)
    _reverts("InvalidSignature", worker.claim, channel_id, 10 * TOKEN, b"\x00" * 65)
    _reverts("InvalidSignature", worker.claim, channel_id, 10 * TOKEN, b"\x01" * 12)


def test_worker_cannot_sign_its_own_receipt(chain):
    _, channel_id, _ = _open(chain)
    worker = chain.client(chain.worker)
    _reverts("InvalidSignature", worker.claim, channel_id, 10 * TOKEN, worker.sign_receipt(channel_id, 10 * TOKEN))


def test_receipt_for_another_channel_is_rejected(chain):
    requester, first, _ = _open(chain)
    _, second, _ = _open(chain)
    worker = chain.client(chain.worker)
    _reverts("InvalidSignature", worker.claim, second, 10 * TOKEN, requester.sign_receipt(first, 10 * TOKEN))


def test_receipt_for_another_chain_or_escrow_is_rejected(chain):
    requester, channel_id, _ = _open(chain)
    worker = chain.client(chain.worker)
    elsewhere = [
        ReceiptDomain(chain_id=1, escrow=chain.deployment.escrow),
        ReceiptDomain(chain_id=chain.deployment.chain_id, escrow=chain.deployment.token),
    ]
    for domain in elsewhere:
        signature = sign_receipt(chain.requester, domain, channel_id, 10 * TOKEN)
        _reverts("InvalidSignature", worker.claim, channel_id, 10 * TOKEN, signature)


def test_amount_above_deposit_is_rejected(chain):
    requester, channel_id, _ = _open(chain, amount=100 * TOKEN)
    worker = chain.client(chain.worker)
    signature = requester.sign_receipt(channel_id, 101 * TOKEN)
    _reverts("AmountExceedsDeposit", worker.claim, channel_id, 101 * TOKEN, signature)
    _reverts("AmountExceedsDeposit", worker.close, channel_id, 101 * TOKEN, signature)


def test_amount_below_paid_is_rejected(chain):
    requester, channel_id, _ = _open(chain)
    worker = chain.client(chain.worker)
    worker.claim(channel_id, 50 * TOKEN, requester.sign_receipt(channel_id, 50 * TOKEN))
    old = requester.sign_receipt(channel_id, 20 * TOKEN)
    _reverts("AmountBelowPaid", worker.claim, channel_id, 20 * TOKEN, old)
    _reverts("AmountBelowPaid", worker.close, channel_id, 20 * TOKEN, old)
    _reverts("NothingToClaim", worker.claim, channel_id, 50 * TOKEN, requester.sign_receipt(channel_id, 50 * TOKEN))


def test_claim_after_close_and_double_close_are_rejected(chain):
    requester, channel_id, _ = _open(chain)
    worker = chain.client(chain.worker)
    worker.close(channel_id, 10 * TOKEN, requester.sign_receipt(channel_id, 10 * TOKEN))
    later = requester.sign_receipt(channel_id, 20 * TOKEN)
    err = _reverts("ChannelNotOpen", worker.claim, channel_id, 20 * TOKEN, later)
    assert isinstance(err, ChannelNotOpen)
    _reverts("ChannelNotOpen", worker.close, channel_id, 20 * TOKEN, later)
    _reverts("ChannelNotOpen", worker.close, channel_id, 10 * TOKEN)
    _reverts("ChannelNotOpen", requester.refund, channel_id)


def test_only_the_worker_redeems(chain):
    requester, channel_id, _ = _open(chain)
    signature = requester.sign_receipt(channel_id, 10 * TOKEN)
    stranger = chain.client(chain.stranger)
    _reverts("NotWorker", stranger.claim, channel_id, 10 * TOKEN, signature)
    _reverts("NotWorker", stranger.close, channel_id, 10 * TOKEN, signature)
    _reverts("NotWorker", requester.close, channel_id, 0)


def test_refund_before_expiry_or_by_a_stranger_is_rejected(chain):
    requester, channel_id, _ = _open(chain, expiry_in=3600)
    _reverts("NotExpired", requester.refund, channel_id)
    chain.advance(3600)
    _reverts("NotRequester", chain.client(chain.stranger).refund, channel_id)
    _reverts("NotRequester", chain.client(chain.worker).refund, channel_id)


def test_redeeming_after_expiry_is_rejected(chain):
    requester, channel_id, _ = _open(chain, expiry_in=3600)
    signature = requester.sign_receipt(channel_id, 10 * TOKEN)
    chain.advance(3600)
    err = _reverts("ChannelExpired", chain.client(chain.worker).claim, channel_id, 10 * TOKEN, signature)
    assert isinstance(err, ChannelExpired)
    _reverts("ChannelExpired", chain.client(chain.worker).close, channel_id, 10 * TOKEN, signature)


def test_top_up_cannot_shorten_expiry(chain):
    requester, channel_id, expiry = _open(chain)
    _reverts("ExpiryShortened", requester.top_up, channel_id, 1 * TOKEN, expiry - 1)
    _reverts("NotRequester", chain.client(chain.stranger).top_up, channel_id, 1 * TOKEN, expiry + DAY)


def test_zero_amounts_and_past_expiries_are_rejected(chain):
    requester = chain.client(chain.requester)
    now = chain.now()
    _reverts("ZeroAmount", requester.open_channel, chain.worker.address, 0, now + DAY)
    _reverts("ExpiryInPast", requester.open_channel, chain.worker.address, TOKEN, now - 1)
    _reverts("InvalidWorker", requester.open_channel, chain.requester.address, TOKEN, now + DAY)
    _reverts("InvalidWorker", requester.open_channel, "0x" + "00" * 20, TOKEN, now + DAY)
    _, channel_id, expiry = _open(chain)
    _reverts("ZeroAmount", requester.top_up, channel_id, 0, expiry)
    chain.advance(2 * DAY)
    _reverts("ExpiryInPast", requester.top_up, channel_id, TOKEN, expiry + 1)


def test_amounts_beyond_128_bits_are_amount_too_large(chain):
    """Even a top-up near 2**256, where ``deposit + amount`` overflows uint256, reverts with a named error.

    Before the fix, amounts from 2**256 - deposit up reverted with Panic(0x11), which
    the client could not name (``error`` was None).
    """
    requester, channel_id, expiry = _open(chain, amount=100 * TOKEN)
    deposit, esc, no_permit = 100 * TOKEN, requester.escrow.functions, (0, 27, b"\x00" * 32, b"\x00" * 32)
    for amount in (2**128 - deposit, 2**256 - deposit - 1, 2**256 - deposit, 2**256 - deposit + 1, 2**256 - 1):
        for call in (
            esc.topUp(channel_id, amount, expiry + DAY),
            esc.topUpWithPermit(channel_id, amount, expiry + DAY, *no_permit),
        ):
            err = _reverts("AmountTooLarge", requester.send, call, "topUp")
            assert isinstance(err, ContractReverted) and err.error_args == (amount,)
    for amount in (2**128, 2**256 - 1):
        _reverts("AmountTooLarge", requester.send, esc.open(chain.worker.address, amount, expiry), "open")
        call = esc.openWithPermit(chain.worker.address, amount, expiry, *no_permit)
        _reverts("AmountTooLarge", requester.send, call, "open")
    assert requester.get_channel(channel_id).deposit == deposit


def test_a_deposit_can_reach_2_128_minus_1_and_no_further(chain):
    requester, channel_id, expiry = _open(chain, amount=100 * TOKEN)
    owner = chain.client(chain.deployer)
    owner.send(owner.token.functions.mint(chain.requester.address, 2**128), "mint")
    room = 2**128 - 1 - 100 * TOKEN
    requester.top_up(channel_id, room, expiry)  # exactly fills the 128 bits
    assert requester.get_channel(channel_id).deposit == 2**128 - 1
    for amount in (1, 2**256 - 2**128 + 1, 2**256 - 1):  # 2**256 - 2**128 + 1 is the first to overflow uint256
        call = requester.escrow.functions.topUp(channel_id, amount, expiry)
        err = _reverts("AmountTooLarge", requester.send, call, "topUp")
        assert err.error_args == (amount,)
    _reverts("AmountTooLarge", requester.top_up, channel_id, 1, expiry + DAY)  # the client's own path, too
    assert requester.get_channel(channel_id).deposit == 2**128 - 1


def test_reentrant_token_cannot_reenter(chain, brownie_build):
    """A malicious token calls back into the escrow from inside transfer(); the guard stops it."""
    from web3 import HTTPProvider, Web3

    from node.payments.artifacts import Artifact, load_build_artifact
    from node.payments.deployment import Deployment, _deploy
    from node.payments.escrow import EscrowClient

    w3 = Web3(HTTPProvider(chain.chain.rpc_url))
    evil = Artifact.from_json(load_build_artifact(brownie_build, "ReentrantToken"))
    escrow_artifact = Artifact.from_json(load_build_artifact(brownie_build, "InferenceEscrow"))
    evil_address, _ = _deploy(w3, evil, chain.requester.address, 1000 * TOKEN)
    escrow_address, block = _deploy(w3, escrow_artifact, chain.deployer.address, evil_address)
    deployment = Deployment(chain.deployment.chain_id, evil_address, escrow_address, block, chain.deployer.address)
    requester = EscrowClient(w3, deployment, chain.requester)
    evil_token = w3.eth.contract(address=evil_address, abi=evil.abi)

    channel_id = requester.open_channel(chain.worker.address, 100 * TOKEN, requester.chain_time() + DAY)
    signature = requester.sign_receipt(channel_id, 10 * TOKEN)
    for reentry in (
        requester.escrow.functions.claim(channel_id, 20 * TOKEN, requester.sign_receipt(channel_id, 20 * TOKEN)),
        requester.escrow.functions.close(channel_id, 10 * TOKEN, signature),
        requester.escrow.functions.refund(channel_id),
    ):
        requester.send(evil_token.functions.arm(escrow_address, reentry._encode_transaction_data()), "arm")
        worker = EscrowClient(w3, deployment, chain.worker)
        _reverts("ReentrancyGuardReentrantCall", worker.claim, channel_id, 10 * TOKEN, signature)
        requester.send(evil_token.functions.arm("0x" + "00" * 20, b""), "disarm")
    worker.claim(channel_id, 10 * TOKEN, signature)  # unarmed, the same claim goes through
    assert worker.get_channel(channel_id).paid == 10 * TOKEN
