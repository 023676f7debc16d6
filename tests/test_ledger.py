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
