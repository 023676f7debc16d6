"""The requester's wallet: channels to workers, reused across jobs, and receipts signed as tokens arrive.

Blocking (web3, SQLite); the async layer calls it through ``trio.to_thread``.
One ``Wallet`` may serve concurrent jobs: channel selection and opening are
serialised, and a signature is recorded in the ledger before it is handed out,
so no amount is ever signed twice on the way down and no channel is opened twice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from eth_utils import to_checksum_address

from node.payments.escrow import EscrowClient
from node.payments.ledger import WalletChannel, WalletLedger
from node.payments.policy import deposit_for

CHANNEL_LIFETIME_S = 24 * 3600


@dataclass
class Wallet:
    client: EscrowClient
    ledger: WalletLedger
    margin: float = 10.0  # deposit = worst case × (1 + margin)
    min_time_left_s: float = 3600.0  # do not reuse a channel closer than this to its expiry
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        return self.client.account.address

    def channel_for(self, worker: str, needed: int, *, peer_id: str = "", permit: bool = True) -> WalletChannel:
        """An open channel to ``worker`` with at least ``needed`` unsigned; reused if we have one, else opened."""
        worker = to_checksum_address(worker)
        d = self.client.deployment
        with self._lock:
            now = self.client.chain_time()
            for channel in self.ledger.channels(status="open"):
                if (
                    channel.worker == worker
                    and channel.chain_id == d.chain_id
                    and channel.escrow == d.escrow
                    and channel.unsigned >= needed
                    and channel.expiry - now >= self.min_time_left_s
                ):
                    # the worker may have closed it (on our request, from another process): ask the chain
                    state = self.client.get_channel(channel.channel_id)
                    if state.status.name == "OPEN":
                        return channel
                    self.ledger.update(channel.channel_id, status=state.status.name.lower())
            deposit = deposit_for(needed, margin=self.margin)
            expiry = now + CHANNEL_LIFETIME_S
            channel_id = self.client.open_channel(worker, deposit, expiry, permit=permit)
            channel = WalletChannel(channel_id, d.chain_id, d.escrow, worker, deposit, 0, expiry, "open", peer_id)
            self.ledger.add(channel)
            return channel

    def sign(self, channel_id: bytes, cumulative: int) -> tuple[int, bytes]:
        """Sign a cumulative receipt (never below what was signed before); returns (amount, signature)."""
        amount = self.ledger.reserve(channel_id, cumulative)
        return amount, self.client.sign_receipt(channel_id, amount)

    def refresh(self, channel_id: bytes) -> WalletChannel | None:
        """Bring a channel's ledger entry up to date with the chain (status, deposit, expiry)."""
        state = self.client.get_channel(channel_id)
        self.ledger.update(channel_id, deposit=state.deposit, expiry=state.expiry, status=state.status.name.lower())
        return self.ledger.get(channel_id)

    def refund_expired(self) -> list[bytes]:
        """Refund every open channel past its expiry; returns their ids."""
        refunded = []
        now = self.client.chain_time()
        for channel in self.ledger.channels(status="open"):
            if channel.expiry <= now:
                self.client.refund(channel.channel_id)
                self.ledger.update(channel.channel_id, status="refunded")
                refunded.append(channel.channel_id)
        return refunded
