"""EIP-712 receipts of the deposit scheme, exactly as ``DepositEscrow`` checks them.

A receipt says "the requester owes ``worker`` ``cumulativeAmount`` in total,
ever". It is the typed data

    Receipt(address worker, uint256 cumulativeAmount)

in the domain ``{name: "DepositEscrow", version: "1", chainId, verifyingContract}``,
signed by the requester as a 65-byte ``r || s || v`` signature. The requester is
not in the message: it is whoever signed, and the contract checks that it is
the account the worker claims from.

Verification here accepts exactly what the contract's ``ECDSA.tryRecoverCalldata``
accepts: 65 bytes, ``v`` of 27 or 28, and ``s`` in the lower half of the curve
order (no malleable twins); and, like ``claim``, an amount below 2**128.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import SignableMessage, _hash_eip191_message, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address

from node.errors import InvalidReceipt

DOMAIN_NAME = "DepositEscrow"
DOMAIN_VERSION = "1"
RECEIPT_TYPES = {"Receipt": [{"name": "worker", "type": "address"}, {"name": "cumulativeAmount", "type": "uint256"}]}

#: The largest cumulative amount ``claim`` accepts (amounts are 128-bit on chain).
MAX_AMOUNT = 2**128 - 1

_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True)
class DepositDomain:
    """The EIP-712 domain: which deposit escrow, on which chain, a receipt is for."""

    chain_id: int
    escrow: str  # the DepositEscrow's address

    def as_dict(self) -> dict:
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.escrow),
        }


def _signable(domain: DepositDomain, worker: str, cumulative_amount: int) -> SignableMessage:
    if not isinstance(worker, str) or not is_address(worker):
        raise InvalidReceipt(f"receipt worker {worker!r} is not an address")
    if not isinstance(cumulative_amount, int) or not 0 <= cumulative_amount <= MAX_AMOUNT:
        raise InvalidReceipt(f"cumulative amount {cumulative_amount} is not below 2**128")
    return encode_typed_data(
        full_message={
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                **RECEIPT_TYPES,
            },
            "primaryType": "Receipt",
            "domain": domain.as_dict(),
            "message": {"worker": to_checksum_address(worker), "cumulativeAmount": cumulative_amount},
        }
    )


def receipt_digest(domain: DepositDomain, worker: str, cumulative_amount: int) -> bytes:
    """The 32-byte digest that is signed; equals the contract's ``receiptDigest``."""
    return _hash_eip191_message(_signable(domain, worker, cumulative_amount))


def sign_receipt(account: LocalAccount, domain: DepositDomain, worker: str, cumulative_amount: int) -> bytes:
    """Sign ``Receipt(worker, cumulative_amount)`` with the requester's key; returns the 65-byte signature."""
    signed = account.sign_message(_signable(domain, worker, cumulative_amount))
    return bytes(signed.signature)


def recover_receipt_signer(domain: DepositDomain, worker: str, cumulative_amount: int, signature: bytes) -> str:
    """The checksummed address that signed this receipt.

    Raises:
        InvalidReceipt: the signature or amount is malformed in a way the contract rejects too.
    """
    signature = bytes(signature)
    if len(signature) != 65:
        raise InvalidReceipt(f"a receipt signature is 65 bytes, got {len(signature)}")
    s = int.from_bytes(signature[32:64], "big")
    if s > _SECP256K1_N // 2:
        raise InvalidReceipt("receipt signature has a high s value (malleable); the escrow rejects it")
    if signature[64] not in (27, 28):
        raise InvalidReceipt(f"receipt signature has v={signature[64]}; the escrow accepts 27 or 28")
    signable = _signable(domain, worker, cumulative_amount)
    try:
        return Account.recover_message(signable, signature=signature)
    except Exception as err:  # eth-keys raises several types for unrecoverable points
        raise InvalidReceipt(f"receipt signature does not recover to any address: {err}") from err


def check_receipt(domain: DepositDomain, requester: str, worker: str, cumulative_amount: int, signature: bytes) -> None:
    """Check that ``requester`` signed ``Receipt(worker, cumulative_amount)``, as ``claim`` will.

    Raises:
        InvalidReceipt: it is malformed, or someone else signed it.
    """
    signer = recover_receipt_signer(domain, worker, cumulative_amount, signature)
    if signer != to_checksum_address(requester):
        raise InvalidReceipt(f"receipt to {worker} is signed by {signer}, not the requester {requester}")
