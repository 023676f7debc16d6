"""Test data shared by several test modules."""

from __future__ import annotations

import dataclasses

from node.identity import Identity
from node.messages import ModelInfo, Offer
from node.offers import sign_offer

MODEL = "bafymodel"


def offer(peer_id: str = "12D3KooWtest", **changes) -> Offer:
    """An unsigned offer for MODEL: free, one free slot, expiring at 1e9 unless changed."""
    base = Offer(
        peer_id=peer_id,
        addrs=[],
        payee="",
        binding=b"",
        models=[ModelInfo(MODEL, "test model", 2048, "Q4_1")],
        price_per_1k=0,
        chain_id=0,
        escrow="",
        slots_total=2,
        slots_free=1,
        tokens_per_s=100.0,
        first_token_ms=10.0,
        hardware="test",
        version="test",
        seq=1,
        expires_at=1e9,
    )
    return dataclasses.replace(base, **changes)


def signed_offer(identity: Identity, seq: int, expires_at: float, **changes) -> Offer:
    """An offer published by ``identity``, signed and bound like a worker's."""
    fields = dict(peer_id=identity.peer_id, payee=identity.payee, binding=identity.binding, slots_total=1)
    return sign_offer(identity, offer(**{**fields, "seq": seq, "expires_at": expires_at, **changes}))
