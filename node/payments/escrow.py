"""A web3.py client for ``InferenceEscrow`` and its token.

``EscrowClient.connect`` checks everything a user can get wrong before any
money moves: that an RPC endpoint answers, that it is the expected chain, that
a deployment record exists and that its contracts are really on that chain.

Every transaction is built (which runs ``eth_estimateGas``, so a call the
contract would refuse fails before it is sent), signed locally with the
account's key and sent raw. A contract refusal becomes a ``PaymentError``
subclass whose ``error`` attribute names the Solidity custom error.

Blocking: call it from trio through ``trio.to_thread.run_sync``. One client may
be shared by several threads; sending is serialized so nonces never clash.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
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
    ChannelExpired,
    ChannelNotOpen,
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
from node.payments.receipts import ReceiptDomain, check_pay_receipt, sign_receipt

TX_TIMEOUT_S = 120


class ChannelStatus(enum.IntEnum):
    """``InferenceEscrow.Status``."""

    NONE = 0
    OPEN = 1
    CLOSED = 2
    REFUNDED = 3


@dataclass(frozen=True)
class ChannelState:
    """One channel as the contract stores it."""

    channel_id: bytes
    requester: str
    worker: str
    deposit: int
    paid: int
    expiry: int  # unix seconds
    status: ChannelStatus

    @property
    def remaining(self) -> int:
        """What is left in the channel: deposit not yet paid to the worker."""
        return self.deposit - self.paid


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


class EscrowClient:
    """Talk to one deployment's escrow and token, optionally as ``account``."""

    def __init__(self, w3: Web3, deployment: Deployment, account: LocalAccount | None = None) -> None:
        self.w3 = w3
        self.deployment = deployment
        self.account = account
        self.domain = ReceiptDomain(deployment.chain_id, deployment.escrow)
        token_artifact = load_artifact("LLMToken")
        escrow_artifact = load_artifact("InferenceEscrow")
        self.token = w3.eth.contract(address=deployment.token, abi=token_artifact.abi)
        self.escrow = w3.eth.contract(address=deployment.escrow, abi=escrow_artifact.abi)
        self._errors = _error_specs(escrow_artifact.abi, token_artifact.abi)
        self._send_lock = threading.Lock()
        self.io = ChainIO()  # async callers: ``await client.io(client.get_channel, channel_id)``

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
    ) -> EscrowClient:
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
        with _transport_errors(rpc_url):
            code = {
                name: w3.eth.get_code(addr)
                for name, addr in (("token", deployment.token), ("escrow", deployment.escrow))
            }
        for name, bytecode in code.items():
            if not bytecode:
                raise DeploymentNotFound(
                    f"no {name} contract at {getattr(deployment, name)} on chain {actual} "
                    "(was the chain reset since the deployment?); redeploy with `brownie run scripts/deploy.py`"
                )
        return cls(w3, deployment, account)

    # -------------------------------------------------------------------- reads

    def get_channel(self, channel_id: bytes) -> ChannelState:
        """The channel's current state (status NONE for an unknown id)."""
        with self._rpc():
            raw = self.escrow.functions.getChannel(bytes(channel_id)).call()
        requester, expiry, status, worker, deposit, paid = raw
        return ChannelState(
            channel_id=bytes(channel_id),
            requester=to_checksum_address(requester),
            worker=to_checksum_address(worker),
            deposit=deposit,
            paid=paid,
            expiry=expiry,
            status=ChannelStatus(status),
        )

    def token_balance(self, address: str) -> int:
        with self._rpc():
            return self.token.functions.balanceOf(to_checksum_address(address)).call()

    def allowance(self, owner: str) -> int:
        """How many of ``owner``'s tokens the escrow may move."""
        with self._rpc():
            return self.token.functions.allowance(to_checksum_address(owner), self.deployment.escrow).call()

    def eth_balance(self, address: str) -> int:
        with self._rpc():
            return self.w3.eth.get_balance(to_checksum_address(address))

    def chain_time(self) -> int:
        """The latest block's timestamp: the clock the contract's expiry checks use."""
        with self._rpc():
            return self.w3.eth.get_block("latest")["timestamp"]

    # ---------------------------------------------------------------- receipts

    def sign_receipt(self, channel_id: bytes, cumulative_amount: int) -> bytes:
        """Sign ``Receipt(channel_id, cumulative_amount)`` as the requester."""
        return sign_receipt(self._require_account(), self.domain, channel_id, cumulative_amount)

    def check_receipt(self, channel: ChannelState, cumulative_amount: int, signature: bytes) -> None:
        """Check a receipt against the channel as the contract would, without a transaction.

        Raises:
            InvalidReceipt: bad signature, or an amount the contract would refuse.
        """
        check_pay_receipt(
            self.domain, channel.channel_id, cumulative_amount, signature,
            requester=channel.requester, deposit=channel.deposit, paid=channel.paid,
        )  # fmt: skip

    # ---------------------------------------------------------- requester txs

    def approve(self, amount: int) -> dict:
        """Let the escrow move ``amount`` of the account's tokens."""
        return self.send(self.token.functions.approve(self.deployment.escrow, amount), "approve")

    def open_channel(self, worker: str, amount: int, expiry: int, *, permit: bool = False) -> bytes:
        """Open a channel to ``worker`` with ``amount`` tokens until ``expiry``; returns its id.

        With ``permit``, the allowance comes from an EIP-2612 signature in the
        same transaction; otherwise the escrow is approved first when needed.
        """
        worker = to_checksum_address(worker)
        self._require_tokens(amount)
        if permit:
            v, r, s, deadline = self.sign_permit(amount)
            call = self.escrow.functions.openWithPermit(worker, amount, expiry, deadline, v, r, s)
        else:
            self._ensure_allowance(amount)
            call = self.escrow.functions.open(worker, amount, expiry)
        return self.opened_channel_id(self.send(call, "open"))

    def opened_channel_id(self, receipt: dict) -> bytes:
        """The id of the channel an ``open`` / ``openWithPermit`` transaction created."""
        (event,) = self.escrow.events.ChannelOpened().process_receipt(receipt, errors=DISCARD)
        return bytes(event["args"]["channelId"])

    def top_up(self, channel_id: bytes, amount: int, new_expiry: int, *, permit: bool = False) -> dict:
        """Add ``amount`` tokens (may be 0) and move the expiry to ``new_expiry`` (never earlier)."""
        if amount > 0:
            self._require_tokens(amount)
        if permit and amount > 0:
            v, r, s, deadline = self.sign_permit(amount)
            call = self.escrow.functions.topUpWithPermit(bytes(channel_id), amount, new_expiry, deadline, v, r, s)
        else:
            if amount > 0:
                self._ensure_allowance(amount)
            call = self.escrow.functions.topUp(bytes(channel_id), amount, new_expiry)
        return self.send(call, "topUp")

    def refund(self, channel_id: bytes) -> dict:
        """Take back the unclaimed rest of an expired channel."""
        return self.send(self.escrow.functions.refund(bytes(channel_id)), "refund")

    # ------------------------------------------------------------- worker txs

    def claim(self, channel_id: bytes, cumulative_amount: int, signature: bytes) -> dict:
        """Redeem a receipt and keep the channel open."""
        return self.send(self.escrow.functions.claim(bytes(channel_id), cumulative_amount, bytes(signature)), "claim")

    def close(self, channel_id: bytes, cumulative_amount: int, signature: bytes = b"") -> dict:
        """Redeem the final receipt, close the channel and return the rest to the requester."""
        return self.send(self.escrow.functions.close(bytes(channel_id), cumulative_amount, bytes(signature)), "close")

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
        """An EIP-2612 permit letting the escrow move ``amount`` tokens: ``(v, r, s, deadline)``."""
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
                "spender": self.deployment.escrow,
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
            return ContractReverted(f"{what} refused by the contract: {err}")
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
    "ChannelExpired": ChannelExpired,
    "ChannelNotOpen": ChannelNotOpen,
    "InvalidSignature": InvalidReceipt,
}

_HINTS = {
    "AmountTooLarge": "a channel holds at most 2**128 - 1 base units in all",
    "ERC20InsufficientBalance": "the account needs more tokens",
    "ERC20InsufficientAllowance": "approve the escrow for the amount first, or open with a permit",
    "ChannelExpired": "its receipts can no longer be redeemed; the requester can refund it",
    "ChannelNotOpen": "the channel id is unknown, or it was closed or refunded already",
    "NotExpired": "a refund is possible only after the channel's expiry",
    "ExpiryInPast": "choose an expiry after the latest block's timestamp",
    "ExpiryShortened": "a top-up may only move the expiry later",
    "InvalidSignature": "the receipt is not signed by the channel's requester for this channel, chain and escrow",
}


@contextmanager
def _transport_errors(url: str) -> Iterator[None]:
    """Turn transport failures into one-line ``ChainUnreachable`` / ``InsufficientBalance`` errors."""
    try:
        yield
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        raise ChainUnreachable(
            f"no Ethereum JSON-RPC endpoint answers at {url}; start the chain or fix --rpc-url"
        ) from None
    except Web3RPCError as err:
        if "insufficient funds" in str(err).lower():
            raise InsufficientBalance(f"not enough ETH to pay for gas ({err}); fund the account with ETH") from None
        raise
