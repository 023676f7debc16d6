"""A web3.py client for ``DepositEscrow``: one deposit pays any worker.

The requester side deposits, funds its reserve, signs receipts
(``Receipt(worker, cumulativeAmount)``: "I owe this worker this much in total,
ever") and unlocks / withdraws. The worker side reads a requester's account and
its own pair from chain, checks receipts as the contract will, and claims,
many requesters at once with ``claim_batch``.

``DepositClient.connect`` checks the endpoint, the chain and the deployment
before any money moves. Every transaction is
gas-estimated first (a call the contract would refuse fails before it is
sent), signed locally and sent raw; a refusal becomes a ``PaymentError``
subclass whose ``error`` attribute names the Solidity custom error.

``claimable`` and ``guarantee`` are the contract's claim arithmetic in Python,
for a worker deciding what it may rely on and for tests.

Blocking: call it from trio through ``await client.io(client.account_of, r)``.
One client may be shared by several threads; sending is serialized so nonces
never clash.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import function_signature_to_4byte_selector, to_checksum_address
from web3 import HTTPProvider, Web3
from web3.exceptions import ContractLogicError, TimeExhausted, Web3RPCError
from web3.logs import DISCARD

from node.errors import (
    ChainUnreachable,
    ConfigError,
    ContractReverted,
    DeploymentNotFound,
    InsufficientAllowance,
    InsufficientBalance,
    InvalidReceipt,
    PaymentError,
    WrongChain,
)
from node.payments.artifacts import load_artifact
from node.payments.chainio import ChainIO
from node.payments.deployment import Deployment, load_deployment
from node.payments.deposit_receipts import MAX_AMOUNT, DepositDomain, check_receipt, sign_job_terms, sign_receipt

TX_TIMEOUT_S = 120
#: The gas limit sent, in percent of the estimate.
GAS_MARGIN_PERCENT = 130


@dataclass(frozen=True)
class DepositAccount:
    """A requester's account, as ``accountOf`` returns it."""

    deposit: int  # drawn by any worker's claims, first
    reserve_left: int  # what slot holders can still draw
    reserve_total: int  # funded since the last withdrawal; a share is reserve_total // slots
    slots: int  # K: reserve shares (0: never funded)
    slots_used: int  # shares bound to a worker
    unlock_at: int  # unix seconds; 0: not unlocking

    @property
    def unlocking(self) -> bool:
        return self.unlock_at != 0

    @property
    def share(self) -> int:
        """One slot's share of the reserve."""
        return self.reserve_total // self.slots if self.slots else 0

    @property
    def free_slots(self) -> int:
        return max(self.slots - self.slots_used, 0)


@dataclass(frozen=True)
class PairState:
    """A (requester, worker) pair, as ``pairOf`` returns it."""

    paid: int  # total ever paid to the worker on the requester's receipts
    from_reserve: int  # the part of it drawn from the reserve
    has_slot: bool  # the worker holds one of the requester's reserve shares


def guarantee(account: DepositAccount, pair: PairState) -> int:
    """What the reserve still guarantees the pair's worker whatever others claim (``guaranteeOf``)."""
    if not pair.has_slot:
        return 0
    return min(max(account.share - pair.from_reserve, 0), account.reserve_left)


@dataclass(frozen=True)
class Claimable:
    """What a claim of a cumulative amount would pay now (``claim``'s arithmetic)."""

    from_deposit: int
    from_reserve: int
    takes_slot: bool

    @property
    def amount(self) -> int:
        return self.from_deposit + self.from_reserve


def claimable(account: DepositAccount, pair: PairState, cumulative_amount: int) -> Claimable:
    """What ``claim(requester, cumulative_amount, …)`` would pay the pair's worker on this state.

    Zero if the receipt is not above what was paid, or nothing is left to pay it
    with (then the claim changes nothing, not even the slot).
    """
    owed = cumulative_amount - pair.paid
    if owed <= 0:
        return Claimable(0, 0, False)
    takes_slot = not pair.has_slot and account.slots_used < account.slots
    from_deposit = min(owed, account.deposit)
    from_reserve = 0
    if owed > from_deposit and (pair.has_slot or takes_slot):
        room = max(account.share - pair.from_reserve, 0)
        from_reserve = min(owed - from_deposit, room, account.reserve_left)
    if from_deposit + from_reserve == 0:
        return Claimable(0, 0, False)
    return Claimable(from_deposit, from_reserve, takes_slot)


@dataclass(frozen=True)
class _ErrorSpec:
    name: str
    types: tuple[str, ...]


def _error_specs(*abis: list[dict[str, Any]]) -> dict[bytes, _ErrorSpec]:
    specs = {}
    for abi in abis:
        for item in abi:
            if item.get("type") == "error":
                types = tuple(i["type"] for i in item["inputs"])
                selector = function_signature_to_4byte_selector(f"{item['name']}({','.join(types)})")
                specs[selector] = _ErrorSpec(item["name"], types)
    return specs


def _hex_to_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return b""
    return b""


class DepositClient:
    """Talk to one deployment's ``DepositEscrow`` and token, optionally as ``account``."""

    def __init__(self, w3: Web3, deployment: Deployment, account: LocalAccount | None = None) -> None:
        if deployment.deposits is None:
            raise DeploymentNotFound(
                f"the deployment record for chain {deployment.chain_id} has no DepositEscrow; "
                "redeploy with `brownie run scripts/deploy.py`"
            )
        self.w3 = w3
        self.deployment = deployment
        self.address: str = deployment.deposits
        self.account = account
        self.domain = DepositDomain(deployment.chain_id, deployment.deposits)
        token_artifact = load_artifact("LLMToken")
        escrow_artifact = load_artifact("DepositEscrow")
        self.token = w3.eth.contract(address=deployment.token, abi=token_artifact.abi)
        self.escrow = w3.eth.contract(address=deployment.deposits, abi=escrow_artifact.abi)
        self._errors = _error_specs(escrow_artifact.abi, token_artifact.abi)
        self._send_lock = threading.Lock()
        self.io = ChainIO()  # async callers: ``await client.io(client.account_of, requester)``

    # ------------------------------------------------------------ construction

    @classmethod
    def connect(
        cls,
        rpc_url: str,
        *,
        deployments_dir: str | Path | None = None,
        deployment: Deployment | None = None,
        account: LocalAccount | None = None,
        chain_id: int | None = None,
        timeout_s: float = 10.0,
    ) -> DepositClient:
        """Connect and check the chain and the deployment.

        Args:
            rpc_url: the chain's HTTP JSON-RPC endpoint.
            deployments_dir: where ``<chainId>.json`` records live (ignored if ``deployment`` is given).
            deployment: the deployment to use instead of reading a record.
            account: the key to sign transactions and receipts with; reads only without one.
            chain_id: refuse to go on unless the endpoint serves this chain.
            timeout_s: HTTP timeout of each RPC request.

        Raises:
            ChainUnreachable, WrongChain, DeploymentNotFound.
        """
        if deployment is None and deployments_dir is None:
            raise ConfigError("give a deployment or a deployments directory (--deployments)")
        w3 = Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": timeout_s}))
        with _transport_errors(rpc_url):
            actual = w3.eth.chain_id
        if chain_id is not None and actual != chain_id:
            raise WrongChain(
                f"{rpc_url} serves chain {actual}, not chain {chain_id}; point --rpc-url at the right chain"
            )
        if deployment is None:
            deployment = load_deployment(deployments_dir, actual)
        elif deployment.chain_id != actual:
            raise WrongChain(
                f"the deployment is for chain {deployment.chain_id} but {rpc_url} serves chain {actual}; "
                "point --rpc-url at the right chain"
            )
        client = cls(w3, deployment, account)  # refuses a record without a DepositEscrow
        with _transport_errors(rpc_url):
            code = {
                name: w3.eth.get_code(addr)
                for name, addr in (("token", deployment.token), ("deposits", client.address))
            }
        for name, bytecode in code.items():
            if not bytecode:
                raise DeploymentNotFound(
                    f"no {name} contract at {getattr(deployment, name)} on chain {actual} "
                    "(was the chain reset since the deployment?); redeploy with `brownie run scripts/deploy.py`"
                )
        return client

    # -------------------------------------------------------------------- reads

    def account_of(self, requester: str) -> DepositAccount:
        """A requester's deposit, reserve, slots and unlock (all zero for an unknown one)."""
        with self._rpc():
            raw = self.escrow.functions.accountOf(to_checksum_address(requester)).call()
        return DepositAccount(*raw)

    def pair_of(self, requester: str, worker: str) -> PairState:
        """What ``requester``'s receipts paid ``worker`` so far, and whether it holds a slot."""
        with self._rpc():
            paid, from_reserve, has_slot = self.escrow.functions.pairOf(
                to_checksum_address(requester), to_checksum_address(worker)
            ).call()
        return PairState(paid, from_reserve, bool(has_slot))

    def guarantee_of(self, requester: str, worker: str) -> int:
        """What the reserve still guarantees ``worker`` whatever other workers claim."""
        with self._rpc():
            return self.escrow.functions.guaranteeOf(to_checksum_address(requester), to_checksum_address(worker)).call()

    def earnings_of(self, worker: str) -> int:
        """What ``claim`` credited to ``worker`` and it has not withdrawn (``withdraw_earnings``)."""
        with self._rpc():
            return self.escrow.functions.earnings(to_checksum_address(worker)).call()

    def unlock_period(self) -> int:
        with self._rpc():
            return self.escrow.functions.unlockPeriod().call()

    def token_balance(self, address: str) -> int:
        with self._rpc():
            return self.token.functions.balanceOf(to_checksum_address(address)).call()

    def allowance(self, owner: str) -> int:
        """How many of ``owner``'s tokens the deposit escrow may move."""
        with self._rpc():
            return self.token.functions.allowance(to_checksum_address(owner), self.address).call()

    def eth_balance(self, address: str) -> int:
        with self._rpc():
            return self.w3.eth.get_balance(to_checksum_address(address))

    def chain_time(self) -> int:
        """The latest block's timestamp: the clock ``unlockAt`` is compared with."""
        with self._rpc():
            return self.w3.eth.get_block("latest")["timestamp"]

    def block_number(self) -> int:
        with self._rpc():
            return self.w3.eth.block_number

    def requesters_changed(self, from_block: int, to_block: int | str = "latest") -> set[str]:
        """The requesters whose account or pairs any event touched in these blocks (inclusive).

        Every event but ``EarningsWithdrawn`` has the requester as its first
        indexed argument; a worker refreshes its cached reads of just these.
        """
        with self._rpc():
            logs = self.w3.eth.get_logs({"address": self.address, "fromBlock": from_block, "toBlock": to_block})
        earnings_topic = self.escrow.events.EarningsWithdrawn().topic
        changed = set()
        for log in logs:
            topics = log["topics"]
            if len(topics) >= 2 and _hex_to_bytes(topics[0]) != _hex_to_bytes(earnings_topic):
                changed.add(to_checksum_address(_hex_to_bytes(topics[1])[-20:]))
        return changed

    # ---------------------------------------------------------------- receipts

    def sign_receipt(self, worker: str, cumulative_amount: int) -> bytes:
        """Sign ``Receipt(worker, cumulative_amount)`` as the requester."""
        return sign_receipt(self._require_account(), self.domain, worker, cumulative_amount)

    def sign_job_terms(self, job_id: str, worker: str, peer_id: str, expires_at: int) -> bytes:
        """Bind a job's terms to the peer ``peer_id`` that sends it to ``worker``, as the requester."""
        return sign_job_terms(self._require_account(), self.domain, job_id, worker, peer_id, expires_at)

    def check_receipt(
        self, requester: str, worker: str, cumulative_amount: int, signature: bytes, *, paid: int | None = None
    ) -> None:
        """Check a receipt as ``claim`` will, without a transaction.

        With ``paid`` (the pair's ``paid`` on chain), a receipt that is not above it is refused too.

        Raises:
            InvalidReceipt: a bad signature or amount, or (with ``paid``) nothing new.
        """
        check_receipt(self.domain, requester, worker, cumulative_amount, signature)
        if paid is not None and cumulative_amount <= paid:
            raise InvalidReceipt(f"receipt for {cumulative_amount} is not above the {paid} already paid")

    # ---------------------------------------------------------- requester txs

    def approve(self, amount: int) -> dict:
        """Let the deposit escrow move ``amount`` of the account's tokens."""
        return self.send(self.token.functions.approve(self.address, amount), "approve")

    def deposit(self, amount: int, *, permit: bool = False) -> dict:
        """Add ``amount`` to the account's deposit (cancels a pending unlock).

        With ``permit``, the allowance comes from an EIP-2612 signature in the same
        transaction; otherwise the escrow is approved first when needed.
        """
        self._require_tokens(amount)
        if permit:
            v, r, s, deadline = self.sign_permit(amount)
            return self.send(self.escrow.functions.depositWithPermit(amount, deadline, v, r, s), "deposit")
        self._ensure_allowance(amount)
        return self.send(self.escrow.functions.deposit(amount), "deposit")

    def fund_reserve(self, amount: int, slots: int, *, permit: bool = False) -> dict:
        """Add ``amount`` to the reserve, cut into ``slots`` shares (fixed once a worker holds one)."""
        self._require_tokens(amount)
        if permit:
            v, r, s, deadline = self.sign_permit(amount)
            call = self.escrow.functions.fundReserveWithPermit(amount, slots, deadline, v, r, s)
            return self.send(call, "fundReserve")
        self._ensure_allowance(amount)
        return self.send(self.escrow.functions.fundReserve(amount, slots), "fundReserve")

    def unlock(self) -> dict:
        """Start the unlock period; ``withdraw`` is possible ``unlock_period()`` seconds later."""
        return self.send(self.escrow.functions.unlock(), "unlock")

    def cancel_unlock(self) -> dict:
        return self.send(self.escrow.functions.cancelUnlock(), "cancelUnlock")

    def withdraw(self) -> dict:
        """Take back the deposit and what is left of the reserve, after the unlock period."""
        return self.send(self.escrow.functions.withdraw(), "withdraw")

    # ------------------------------------------------------------- worker txs

    def claim(self, requester: str, cumulative_amount: int, signature: bytes) -> dict:
        """Redeem one receipt; the pay is credited to ``earnings`` (see ``withdraw_earnings``)."""
        call = self.escrow.functions.claim(to_checksum_address(requester), cumulative_amount, bytes(signature))
        return self.send(call, "claim")

    def claim_batch(self, claims: Iterable[tuple[str, int, bytes]]) -> dict:
        """Redeem ``(requester, cumulative_amount, signature)`` receipts in one transaction and one transfer.

        Entries that pay nothing are skipped; one bad signature reverts the batch, so check them first
        (``check_receipt``).
        """
        entries = [(to_checksum_address(r), amount, bytes(sig)) for r, amount, sig in claims]
        if not entries:
            raise ConfigError("claim_batch needs at least one receipt")
        return self.send(self.escrow.functions.claimBatch(entries), "claimBatch")

    def withdraw_earnings(self) -> dict:
        """Transfer what ``claim`` credited to the account."""
        return self.send(self.escrow.functions.withdrawEarnings(), "withdrawEarnings")

    def claimed(self, receipt: dict) -> list[dict[str, Any]]:
        """A mined transaction's ``Claimed`` events: requester, worker, cumulativeAmount, fromDeposit, fromReserve."""
        return [dict(e["args"]) for e in self.escrow.events.Claimed().process_receipt(receipt, errors=DISCARD)]

    # --------------------------------------------------------------- internals

    def _require_account(self) -> LocalAccount:
        if self.account is None:
            raise ConfigError("this action signs, but the client has no account; unlock a wallet first")
        return self.account

    def _require_tokens(self, amount: int) -> None:
        owner = self._require_account().address
        balance = self.token_balance(owner)
        if balance < amount:
            raise InsufficientBalance(
                f"{owner} holds {balance} token base units but this needs {amount}; "
                "fund the account (on a dev chain: LLMToken.mint) or use a smaller amount"
            )

    def _ensure_allowance(self, amount: int) -> None:
        if self.allowance(self._require_account().address) < amount:
            self.approve(amount)

    def sign_permit(self, amount: int) -> tuple[int, bytes, bytes, int]:
        """An EIP-2612 permit letting the deposit escrow move ``amount`` tokens: ``(v, r, s, deadline)``."""
        account = self._require_account()
        with self._rpc():
            nonce = self.token.functions.nonces(account.address).call()
            name = self.token.functions.name().call()
        deadline = self.chain_time() + 3600
        signed = Account.sign_typed_data(
            account.key,
            domain_data={
                "name": name,
                "version": "1",
                "chainId": self.deployment.chain_id,
                "verifyingContract": self.deployment.token,
            },
            message_types={
                "Permit": [
                    {"name": "owner", "type": "address"},
                    {"name": "spender", "type": "address"},
                    {"name": "value", "type": "uint256"},
                    {"name": "nonce", "type": "uint256"},
                    {"name": "deadline", "type": "uint256"},
                ]
            },
            message_data={
                "owner": account.address,
                "spender": self.address,
                "value": amount,
                "nonce": nonce,
                "deadline": deadline,
            },
        )
        return signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big"), deadline

    def send(self, call: Any, what: str) -> dict:
        """Sign and send a contract call as the account; returns the mined receipt.

        Gas is estimated first, so a call the contract refuses raises its decoded
        custom error (a ``PaymentError``) without spending anything.
        """
        account = self._require_account()
        with self._rpc(what):
            with self._send_lock:
                tx = call.build_transaction(
                    {
                        "from": account.address,
                        "nonce": self.w3.eth.get_transaction_count(account.address, "pending"),
                        "chainId": self.deployment.chain_id,
                    }
                )
                # The estimate is exact for the state and clock it ran on; the block the
                # transaction lands in may differ (another worker's claim, a later second for
                # `unlock`'s new unlockAt), and an exact limit then runs out of gas.
                tx["gas"] = tx["gas"] * GAS_MARGIN_PERCENT // 100
                tx_hash = self.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
            try:
                receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=TX_TIMEOUT_S)
            except TimeExhausted:
                raise PaymentError(
                    f"{what} transaction 0x{tx_hash.hex()} was not mined within {TX_TIMEOUT_S}s; "
                    "check it later (it may still be mined) before retrying"
                ) from None
        if receipt["status"] != 1:
            raise ContractReverted(f"{what} transaction 0x{tx_hash.hex()} reverted on chain", error=None)
        return dict(receipt)

    @contextmanager
    def _rpc(self, what: str = "call") -> Iterator[None]:
        try:
            with _transport_errors(self.w3.provider.endpoint_uri):
                yield
        except ContractLogicError as err:
            raise self._decode_revert(err, what) from None

    def _decode_revert(self, err: ContractLogicError, what: str) -> PaymentError:
        data = _hex_to_bytes(err.data)
        spec = self._errors.get(data[:4])
        if spec is None:
            return ContractReverted(f"{what} refused by the deposit escrow: {err}")
        try:
            args = tuple(abi_decode(list(spec.types), data[4:]))
        except Exception:
            args = ()
        message = f"{what} refused: {spec.name}({', '.join(map(_show, args))})"
        hint = _HINTS.get(spec.name)
        cls = _ERROR_CLASSES.get(spec.name, ContractReverted)
        return cls(f"{message}; {hint}" if hint else message, error=spec.name, error_args=args)


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


_ERROR_CLASSES: dict[str, type[PaymentError]] = {
    "ERC20InsufficientBalance": InsufficientBalance,
    "ERC20InsufficientAllowance": InsufficientAllowance,
    "InvalidSignature": InvalidReceipt,
}

_HINTS = {
    "ZeroAmount": "the amount must be above zero",
    "AmountTooLarge": (
        f"a deposit, a reserve and a receipt each hold at most {MAX_AMOUNT} base units, and a reserve share 2**96 - 1"
    ),
    "InvalidSlots": "the slot count must be at least 1, and stays fixed once a worker holds a slot",
    "NotUnlocking": "call unlock first",
    "UnlockPending": "withdrawing is possible from the unlock time on; claims are still open until then",
    "InvalidSignature": "the receipt is not signed by this requester, to this worker, for this chain and escrow",
    "NothingToClaim": "the receipt is not above what this requester already paid this worker",
    "NothingAvailable": "the requester's deposit is empty and this worker's reserve share is used up",
    "ERC20InsufficientBalance": "the account needs more tokens",
    "ERC20InsufficientAllowance": "approve the deposit escrow for the amount first, or use a permit",
}


@contextmanager
def _transport_errors(url: str) -> Iterator[None]:
    """Turn transport failures into one-line ``ChainUnreachable`` / ``InsufficientBalance`` errors.

    An endpoint that answers with an HTTP error (429: rate-limited) or refuses a call with a JSON-RPC error
    (a log range too large, a node busy) is ``ChainUnreachable`` too: a later try may work, and callers retry it.
    """
    try:
        yield
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        raise ChainUnreachable(
            f"no Ethereum JSON-RPC endpoint answers at {url}; start the chain or fix --rpc-url"
        ) from None
    except requests.exceptions.RequestException as err:
        raise ChainUnreachable(f"the Ethereum JSON-RPC endpoint at {url} failed: {err}") from None
    except Web3RPCError as err:
        if "insufficient funds" in str(err).lower():
            raise InsufficientBalance(f"not enough ETH to pay for gas ({err}); fund the account with ETH") from None
        raise ChainUnreachable(f"the Ethereum JSON-RPC endpoint at {url} refused the call: {err}") from None
