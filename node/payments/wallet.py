"""The requester's wallet: its deposit (``DepositWallet``) and, for now, its channels (``Wallet``).

``DepositWallet`` is the deposit scheme's (docs/payments.md): one deposit and a
reserve in the ``DepositEscrow`` pay any worker, with receipts signed by the
``DepositPayer`` (node/payments/payer.py). It funds, unlocks and withdraws, and
says what is pending per worker: what this wallet signed to it (its ledger)
minus what the chain paid it (``pairOf``). ``llmarket wallet`` is a thin layer
over it.

The channel wallet:

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

from node.errors import PaymentError
from node.payments.ledger import WalletChannel, WalletLedger
from node.payments.policy import deposit_for

if TYPE_CHECKING:  # web3 loads only where a client is made (node.app.paid)
    from node.payments.deposits import DepositAccount, DepositClient
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


# ------------------------------------------------------------------- deposit


@dataclass(frozen=True)
class Pending:
    """What this wallet owes one worker and the chain has not paid it yet."""

    worker: str
    peer_id: str
    signed: int  # the pair's cumulative amount, as this wallet signed it
    paid: int  # what the worker claimed on chain (``pairOf``)
    has_slot: bool  # the worker holds one of the reserve's slots

    @property
    def pending(self) -> int:
        return max(self.signed - self.paid, 0)


@dataclass
class DepositWallet:
    """A requester's deposit and reserve in a ``DepositEscrow``, and the pairs it signed (blocking: web3, SQLite)."""

    client: DepositClient  # with the requester's key
    ledger: WalletLedger

    @property
    def address(self) -> str:
        return self.client.account.address

    @property
    def escrow(self) -> str:
        return self.client.address

    def account(self) -> DepositAccount:
        """The deposit, reserve, slots and unlock, as the chain has them."""
        return self.client.account_of(self.address)

    def require_funded(self) -> DepositAccount:
        """The account, if workers can be paid from it.

        Raises:
            PaymentError: nothing is deposited (with the command that funds it), or the deposit is unlocking
                (workers refuse an unlocking requester).
        """
        account = self.account()
        if account.unlocking:
            raise PaymentError(
                f"the deposit of {self.address} is unlocking (workers refuse new jobs from it); "
                "cancel with `llmarket wallet cancel-unlock`, or withdraw once it is unlocked"
            )
        if account.deposit == 0 and account.reserve_left == 0:
            raise PaymentError(
                f"{self.address} has no deposit in the DepositEscrow at {self.escrow} to pay workers from; "
                "fund one with `llmarket wallet deposit AMOUNT` (and a reserve: `llmarket wallet reserve AMOUNT`)"
            )
        return account

    def pending(self) -> list[Pending]:
        """Per worker this wallet signed to on this escrow: signed, paid on chain, pending."""
        d = self.client.deployment
        rows = []
        for pair in self.ledger.pairs(d.chain_id, self.escrow):
            state = self.client.pair_of(self.address, pair.worker)
            rows.append(Pending(pair.worker, pair.peer_id, pair.signed, state.paid, state.has_slot))
        return rows

    def deposit(self, amount: int) -> dict:
        """Add ``amount`` to the deposit (any worker's claims draw on it first); cancels a pending unlock."""
        return self.client.deposit(amount)

    def fund_reserve(self, amount: int, slots: int | None = None) -> dict:
        """Add ``amount`` to the reserve, cut into ``slots`` shares (default: the current count, else 1)."""
        if slots is None:
            slots = self.account().slots or 1
        return self.client.fund_reserve(amount, slots)

    def unlock(self) -> int:
        """Start the unlock period; returns the unix time from which ``withdraw`` works."""
        self.client.unlock()
        return self.account().unlock_at

    def cancel_unlock(self) -> dict:
        return self.client.cancel_unlock()

    def withdraw(self) -> int:
        """Take back the deposit and what is left of the reserve (after the unlock period); returns the amount."""
        account = self.account()
        self.client.withdraw()
        return account.deposit + account.reserve_left
