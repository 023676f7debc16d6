"""The requester's wallet: its deposit and reserve in the ``DepositEscrow``, and what it signed to each worker.

One deposit (and, optionally, a reserve) pays any worker, with receipts signed
by the ``DepositPayer`` (node/payments/payer.py); see docs/payments.md.
``DepositWallet`` funds, unlocks and withdraws, and says what is pending per
worker: what this wallet signed to it (its ledger) minus what the chain paid it
(``pairOf``). ``llmarket wallet`` is a thin layer over it. Blocking (web3,
SQLite): async callers run it in threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from node.errors import PaymentError
from node.payments.ledger import WalletLedger

if TYPE_CHECKING:  # web3 loads only where a client is made (node.app.paid)
    from node.payments.deposits import DepositAccount, DepositClient


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
    peer_id: str = ""  # the libp2p peer of the node in the same data dir: its jobs' terms are bound to it

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
