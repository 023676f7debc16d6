"""EIP-712 payment receipts, exactly as ``InferenceEscrow`` checks them.

A receipt says "the requester owes the worker ``cumulativeAmount`` in total on
channel ``channelId``". It is the typed data

    Receipt(bytes32 channelId, uint256 cumulativeAmount)

in the domain ``{name: "InferenceEscrow", version: "1", chainId, verifyingContract}``,
signed by the channel's requester as a 65-byte ``r || s || v`` signature.

Verification here accepts exactly what the contract's ``ECDSA.tryRecover``
accepts: 65 bytes, ``v`` of 27 or 28, and ``s`` in the lower half of the curve
order (no malleable twins).
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import SignableMessage, _hash_eip191_message, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from node.errors import InvalidReceipt

DOMAIN_NAME = "InferenceEscrow"
DOMAIN_VERSION = "1"
RECEIPT_TYPES = {"Receipt": [{"name": "channelId", "type": "bytes32"}, {"name": "cumulativeAmount", "type": "uint256"}]}

_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_UINT256_MAX = 2**256 - 1


@dataclass(frozen=True)
class ReceiptDomain:
    """The EIP-712 domain: which escrow, on which chain, a receipt is for."""

    chain_id: int
    escrow: str  # the escrow contract's address

    def as_dict(self) -> dict:
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.escrow),
        }


def _signable(domain: ReceiptDomain, channel_id: bytes, cumulative_amount: int) -> SignableMessage:
    if len(channel_id) != 32:
        raise InvalidReceipt(f"channel id must be 32 bytes, got {len(channel_id)}")
    if not 0 <= cumulative_amount <= _UINT256_MAX:
        raise InvalidReceipt(f"cumulative amount {cumulative_amount} is not a uint256")
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
            "message": {"channelId": bytes(channel_id), "cumulativeAmount": cumulative_amount},
        }
    )


def receipt_digest(domain: ReceiptDomain, channel_id: bytes, cumulative_amount: int) -> bytes:
    """The 32-byte digest that is signed; equals the contract's ``receiptDigest``."""
    return _hash_eip191_message(_signable(domain, channel_id, cumulative_amount))


def sign_receipt(account: LocalAccount, domain: ReceiptDomain, channel_id: bytes, cumulative_amount: int) -> bytes:
    """Sign a receipt with the requester's key; returns the 65-byte signature."""
    signed = account.sign_message(_signable(domain, channel_id, cumulative_amount))
    return bytes(signed.signature)


def recover_receipt_signer(domain: ReceiptDomain, channel_id: bytes, cumulative_amount: int, signature: bytes) -> str:
    """The checksummed address that signed this receipt.

    Raises:
        InvalidReceipt: the signature is malformed in a way the contract rejects too.
    """
    signature = bytes(signature)
    if len(signature) != 65:
        raise InvalidReceipt(f"a receipt signature is 65 bytes, got {len(signature)}")
    s = int.from_bytes(signature[32:64], "big")
    if s > _SECP256K1_N // 2:
        raise InvalidReceipt("receipt signature has a high s value (malleable); the escrow rejects it")
    if signature[64] not in (27, 28):
        raise InvalidReceipt(f"receipt signature has v={signature[64]}; the escrow accepts 27 or 28")
    try:
        return Account.recover_message(_signable(domain, channel_id, cumulative_amount), signature=signature)
    except Exception as err:  # eth-keys raises several types for unrecoverable points
        raise InvalidReceipt(f"receipt signature does not recover to any address: {err}") from err


def check_receipt_signer(
    domain: ReceiptDomain, channel_id: bytes, cumulative_amount: int, signature: bytes, requester: str
) -> None:
    """Check that ``requester`` signed this receipt, as the contract will.

    Raises:
        InvalidReceipt: it is malformed, or someone else signed it.
    """
    signer = recover_receipt_signer(domain, channel_id, cumulative_amount, signature)
    if signer != to_checksum_address(requester):
        raise InvalidReceipt(
            f"receipt for channel 0x{bytes(channel_id).hex()[:12]}… "
            f"is signed by {signer}, not the requester {requester}"
        )


def check_pay_receipt(
    domain: ReceiptDomain,
    channel_id: bytes,
    cumulative_amount: int,
    signature: bytes,
    *,
    requester: str,
    deposit: int,
    paid: int,
) -> None:
    """Check a receipt as the contract's ``claim`` will: the requester's signature, within the channel.

    The one receipt check: the worker's meter runs it on every receipt before
    relying on it, and ``EscrowClient.check_receipt`` before a claim.

    Raises:
        InvalidReceipt: a bad signature, or an amount the contract would refuse (over the deposit, below
            what was already paid).
    """
    if cumulative_amount > deposit:
        raise InvalidReceipt(f"receipt for {cumulative_amount} exceeds the channel's deposit {deposit}")
    if cumulative_amount < paid:
        raise InvalidReceipt(f"receipt for {cumulative_amount} is below the {paid} already paid")
    check_receipt_signer(domain, channel_id, cumulative_amount, signature, requester)
