"""The payment ledgers: monotonic, durable, nothing forgotten."""

from __future__ import annotations

import pytest

from node.payments.ledger import WalletLedger, WorkerLedger

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
