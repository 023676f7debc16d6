"""The requester's wallet: channels to workers, reused across jobs, and receipts signed as tokens arrive.

Blocking (web3, SQLite); the async layer calls it through ``trio.to_thread``.
One ``Wallet`` may serve concurrent jobs. A channel carries one job at a time
(receipts are cumulative, so two jobs signing on one channel would have to
agree on who owes what first): ``lease`` hands out a channel that is not in
use, opening a new one when all are (up to the worker's slots), and
``release`` gives it back. Every signature is recorded in the ledger before it
is handed out, so no amount is ever signed twice on the way down.
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
    _leased: set[bytes] = field(default_factory=set)

    @property
    def address(self) -> str:
        return self.client.account.address

    def channel_for(self, worker: str, needed: int, *, peer_id: str = "", permit: bool = True) -> WalletChannel:
        """An open channel to ``worker`` with at least ``needed`` unsigned; reused if we have one, else opened."""
        channel = self.lease(worker, needed, peer_id=peer_id, permit=permit, max_leases=None)
        self.release(channel.channel_id)
        return channel

    def lease(
        self, worker: str, needed: int, *, peer_id: str = "", permit: bool = True, max_leases: int | None = 1
    ) -> WalletChannel | None:
        """Take a channel to ``worker`` for one job; None if ``max_leases`` of its channels are in use already."""
        worker = to_checksum_address(worker)
        d = self.client.deployment
        with self._lock:
            in_use = [
                c for c in self.ledger.channels(status="open") if c.worker == worker and c.channel_id in self._leased
            ]
            if max_leases is not None and len(in_use) >= max_leases:
                return None
            now = self.client.chain_time()
            for channel in self.ledger.channels(status="open"):
                if channel.channel_id in self._leased:
                    continue
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
                        self._leased.add(channel.channel_id)
                        return channel
                    self.ledger.update(channel.channel_id, status=state.status.name.lower())
            deposit = deposit_for(needed, margin=self.margin)
            expiry = now + CHANNEL_LIFETIME_S
            channel_id = self.client.open_channel(worker, deposit, expiry, permit=permit)
            channel = WalletChannel(channel_id, d.chain_id, d.escrow, worker, deposit, 0, expiry, "open", peer_id)
            self.ledger.add(channel)
            self._leased.add(channel_id)
            return channel

    def release(self, channel_id: bytes) -> None:
        with self._lock:
            self._leased.discard(channel_id)

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
