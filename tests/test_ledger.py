"""The payment ledgers: monotonic, durable, nothing forgotten."""

from __future__ import annotations

import pytest

from node.payments.ledger import WalletChannel, WalletLedger, WorkerLedger

CH = b"\x07" * 32
OTHER = b"\x08" * 32


def test_worker_keeps_only_higher_receipts_and_tracks_claims(tmp_path):
    ledger = WorkerLedger.in_data_dir(tmp_path)
    meta = dict(chain_id=31337, escrow="0xE", requester="0xR", expiry=2_000)
    assert ledger.record_receipt(CH, 100, b"sig100", **meta)
    assert not ledger.record_receipt(CH, 90, b"sig90", **meta)  # older receipts never replace newer ones
    assert ledger.record_receipt(CH, 2**200, b"big", **meta)  # uint256 amounts survive
    assert ledger.record_receipt(OTHER, 5, b"sig5", **{**meta, "expiry": 1_000})
    assert [c.channel_id for c in ledger.pending_claims()] == [OTHER, CH]  # soonest expiry first
    ledger.mark_claimed(CH, 2**200)
    assert [c.channel_id for c in ledger.pending_claims()] == [OTHER]
    ledger.mark_failed(OTHER, "rpc down")
    assert ledger.get(OTHER).last_error == "rpc down" and ledger.pending_claims()[0].channel_id == OTHER
    ledger.mark_failed(OTHER, "ChannelExpired", give_up=True)
    assert ledger.pending_claims() == []
    # a new process (a restarted worker) sees the same state
    again = WorkerLedger.in_data_dir(tmp_path).get(CH)
    assert (again.receipted, again.claimed, again.signature) == (2**200, 2**200, b"big")


def test_wallet_never_signs_less_and_never_beyond_the_deposit(tmp_path):
    wallet = WalletLedger.in_data_dir(tmp_path)
    wallet.add(WalletChannel(CH, 31337, "0xE", "0xW", deposit=1_000, signed=0, expiry=2_000, status="open"))
    assert wallet.reserve(CH, 300) == 300
    assert wallet.reserve(CH, 200) == 300  # asking for less signs the higher amount again
    with pytest.raises(ValueError, match="holds 1000"):
        wallet.reserve(CH, 1_001)
    wallet.update(CH, deposit=5_000, expiry=3_000)
    assert wallet.reserve(CH, 1_001) == 1_001
    assert WalletLedger.in_data_dir(tmp_path).get(CH).signed == 1_001
    wallet.update(CH, status="closed")
    assert wallet.channels(status="open") == [] and len(wallet.channels()) == 1
    with pytest.raises(ValueError, match="can update only"):
        wallet.update(CH, signed=0)


R = "0x" + "11" * 20
W = "0x" + "22" * 20
ESCROW = "0xE"


def test_a_worker_credits_jobs_only_within_the_best_receipt_and_above_what_the_chain_paid(tmp_path):
    ledger = WorkerLedger.in_data_dir(tmp_path)
    held = ledger.credit_pair(31337, ESCROW, R, 150, b"sig150", 50, floor=0)  # job B's receipt came first
    assert (held.best, held.credited, held.signature) == (150, 50, b"sig150")
    held = ledger.credit_pair(31337, ESCROW, R, 100, b"sig100", 100, floor=0)  # job A's, older: credit only
    assert (held.best, held.credited, held.signature) == (150, 150, b"sig150")
    with pytest.raises(ValueError, match="past the 150"):  # one signature cannot back two jobs' credit
        ledger.credit_pair(31337, ESCROW, R, 150, b"sig150", 1, floor=0)
    assert ledger.get_pair(31337, ESCROW, R).credited == 150  # nothing was written
    # a worker whose ledger was lost: the chain paid 400, so jobs are credited from there
    fresh = WorkerLedger(tmp_path / "lost.sqlite")
    with pytest.raises(ValueError):
        fresh.credit_pair(31337, ESCROW, R, 450, b"sig450", 100, floor=400)
    assert fresh.credit_pair(31337, ESCROW, R, 450, b"sig450", 50, floor=400).credited == 450
    assert [p.requester for p in ledger.pending_pairs(31337, ESCROW)] == [R]
    ledger.update_pair(31337, ESCROW, R, claimed=150, has_slot=True)
    ledger.update_pair(31337, ESCROW, R, claimed=100)  # never lowered
    assert ledger.pending_pairs(31337, ESCROW) == []
    ledger.credit_pair(31337, ESCROW, R, 2**200, b"big", 0, floor=150)
    ledger.credit_pair(31337, ESCROW, W, 5, b"sig5", 5, floor=0)
    ledger.update_pair(31337, ESCROW, W, unlock_at=1_000)
    assert [p.requester for p in ledger.pending_pairs(31337, ESCROW)] == [W, R]  # the unlocking one first
    again = WorkerLedger.in_data_dir(tmp_path).get_pair(31337, ESCROW, R)  # a restarted worker
    assert (again.best, again.credited, again.claimed, again.has_slot) == (2**200, 150, 150, True)


def test_a_wallet_allocates_pair_increments_that_add_up_and_survive_a_restart(tmp_path):
    wallet = WalletLedger.in_data_dir(tmp_path)
    assert wallet.allocate(31337, ESCROW, W, 100, peer_id="12D3w") == 100
    assert wallet.allocate(31337, ESCROW, W, 50) == 150
    assert wallet.allocate(31337, ESCROW, R, 7) == 7  # another worker: its own counter
    with pytest.raises(ValueError):
        wallet.allocate(31337, ESCROW, W, -1)
    again = WalletLedger.in_data_dir(tmp_path)
    assert [(p.worker, p.signed, p.peer_id) for p in again.pairs(31337, ESCROW)] == [(W, 150, "12D3w"), (R, 7, "")]
    assert again.allocate(31337, ESCROW, W, 1) == 151
