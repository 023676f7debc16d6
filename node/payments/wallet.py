"""The requester's wallet: its channels to workers, and receipts signed against them.

Blocking (web3, SQLite): async callers use ``node.payments.payer.WalletPayer``,
which decides which channel a job uses (a channel carries one job at a time)
on the trio thread and calls this in threads. Every signature is recorded in
the ledger before it is handed out, so no amount is ever signed twice on the
way down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from eth_utils import to_checksum_address

from node.payments.ledger import WalletChannel, WalletLedger
from node.payments.policy import deposit_for

if TYPE_CHECKING:  # web3 loads only where a client is made (node.app.paid)
    from node.payments.escrow import EscrowClient

CHANNEL_LIFETIME_S = 24 * 3600


@dataclass
class Wallet:
    client: EscrowClient
    ledger: WalletLedger
    margin: float = 10.0  # deposit = worst case × (1 + margin)
    min_time_left_s: float = 3600.0  # do not reuse a channel closer than this to its expiry

    @property
    def address(self) -> str:
        return self.client.account.address

    def channel_for(
        self,
        worker: str,
        needed: int,
        *,
        peer_id: str = "",
        permit: bool = True,
        exclude: frozenset[bytes] = frozenset(),
    ) -> WalletChannel:
        """An open channel to ``worker`` with at least ``needed`` unsigned: one of ours, else a new one.

        Channels in ``exclude`` (in use by other jobs) are not reused. A reused
        channel is checked on chain first (the worker may have closed it on our
        request, from another process).
        """
        return self.reusable_channel(worker, needed, exclude=exclude) or self.open_channel(
            worker, needed, peer_id=peer_id, permit=permit
        )

    def reusable_channel(
        self, worker: str, needed: int, *, exclude: frozenset[bytes] = frozenset()
    ) -> WalletChannel | None:
        worker = to_checksum_address(worker)
        d = self.client.deployment
        now = self.client.chain_time()
        for channel in self.ledger.channels(status="open"):
            if (
                channel.channel_id not in exclude
                and channel.worker == worker
                and channel.chain_id == d.chain_id
                and channel.escrow == d.escrow
                and channel.unsigned >= needed
                and channel.expiry - now >= self.min_time_left_s
            ):
                state = self.client.get_channel(channel.channel_id)
                if state.status.name == "OPEN":
                    return channel
                self.ledger.update(channel.channel_id, status=state.status.name.lower())
        return None

    def open_channel(self, worker: str, needed: int, *, peer_id: str = "", permit: bool = True) -> WalletChannel:
        """Open a new channel to ``worker`` sized for ``needed`` and ``margin`` more jobs like it."""
        worker = to_checksum_address(worker)
        d = self.client.deployment
        deposit = deposit_for(needed, margin=self.margin)
        expiry = self.client.chain_time() + CHANNEL_LIFETIME_S
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
