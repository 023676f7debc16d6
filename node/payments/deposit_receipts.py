"""EIP-712 receipts of the deposit scheme, exactly as ``DepositEscrow`` checks them.

A receipt says "the requester owes ``worker`` ``cumulativeAmount`` in total,
ever". It is the typed data

    Receipt(address worker, uint256 cumulativeAmount)

in the domain ``{name: "DepositEscrow", version: "1", chainId, verifyingContract}``,
signed by the requester as a 65-byte ``r || s || v`` signature. The requester is
not in the message: it is whoever signed, and the contract checks that it is
the account the worker claims from.

The same domain signs the **job terms binding** (never on chain): the typed data

    JobTerms(string jobId, address worker, string peerId, uint64 expiresAt)

by which a requester says "the job ``jobId`` that the libp2p peer ``peerId`` sends
to ``worker`` is paid from my deposit, until ``expiresAt``". A worker admits a job
paid from a deposit only with it (node/payments/deposit_metering.py), so nobody can
name someone else's deposit in a request.

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


JOB_TERMS_TYPES = {
    "JobTerms": [
        {"name": "jobId", "type": "string"},
        {"name": "worker", "type": "address"},
        {"name": "peerId", "type": "string"},
        {"name": "expiresAt", "type": "uint64"},
    ]
}
_DOMAIN_TYPES = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


def _signable(domain: DepositDomain, worker: str, cumulative_amount: int) -> SignableMessage:
    if not isinstance(worker, str) or not is_address(worker):
        raise InvalidReceipt(f"receipt worker {worker!r} is not an address")
    if not isinstance(cumulative_amount, int) or not 0 <= cumulative_amount <= MAX_AMOUNT:
        raise InvalidReceipt(f"cumulative amount {cumulative_amount} is not below 2**128")
    return encode_typed_data(
        full_message={
            "types": {"EIP712Domain": _DOMAIN_TYPES, **RECEIPT_TYPES},
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


def _recover(signable: SignableMessage, signature: bytes, what: str) -> str:
    signature = bytes(signature)
    if len(signature) != 65:
        raise InvalidReceipt(f"a {what} signature is 65 bytes, got {len(signature)}")
    s = int.from_bytes(signature[32:64], "big")
    if s > _SECP256K1_N // 2:
        raise InvalidReceipt(f"{what} signature has a high s value (malleable); the escrow rejects it")
    if signature[64] not in (27, 28):
        raise InvalidReceipt(f"{what} signature has v={signature[64]}; the escrow accepts 27 or 28")
    try:
        return Account.recover_message(signable, signature=signature)
    except Exception as err:  # eth-keys raises several types for unrecoverable points
        raise InvalidReceipt(f"{what} signature does not recover to any address: {err}") from err


def recover_receipt_signer(domain: DepositDomain, worker: str, cumulative_amount: int, signature: bytes) -> str:
    """The checksummed address that signed this receipt.

    Raises:
        InvalidReceipt: the signature or amount is malformed in a way the contract rejects too.
    """
    return _recover(_signable(domain, worker, cumulative_amount), signature, "receipt")


def check_receipt(domain: DepositDomain, requester: str, worker: str, cumulative_amount: int, signature: bytes) -> None:
    """Check that ``requester`` signed ``Receipt(worker, cumulative_amount)``, as ``claim`` will.

    Raises:
        InvalidReceipt: it is malformed, or someone else signed it.
    """
    signer = recover_receipt_signer(domain, worker, cumulative_amount, signature)
    if signer != to_checksum_address(requester):
        raise InvalidReceipt(f"receipt to {worker} is signed by {signer}, not the requester {requester}")


# ------------------------------------------------------------- job terms binding


def _terms_signable(domain: DepositDomain, job_id: str, worker: str, peer_id: str, expires_at: int) -> SignableMessage:
    if not isinstance(worker, str) or not is_address(worker):
        raise InvalidReceipt(f"terms worker {worker!r} is not an address")
    if not isinstance(expires_at, int) or not 0 <= expires_at < 2**64:
        raise InvalidReceipt(f"terms expiry {expires_at!r} is not a uint64")
    return encode_typed_data(
        full_message={
            "types": {"EIP712Domain": _DOMAIN_TYPES, **JOB_TERMS_TYPES},
            "primaryType": "JobTerms",
            "domain": domain.as_dict(),
            "message": {"jobId": str(job_id), "worker": to_checksum_address(worker), "peerId": str(peer_id),
                        "expiresAt": expires_at},
        }
    )  # fmt: skip


def sign_job_terms(
    account: LocalAccount, domain: DepositDomain, job_id: str, worker: str, peer_id: str, expires_at: int
) -> bytes:
    """The requester's binding of a job's terms to the peer that sends it: 65 bytes (``DepositTerms.binding``)."""
    return bytes(account.sign_message(_terms_signable(domain, job_id, worker, peer_id, expires_at)).signature)


def check_job_terms(
    domain: DepositDomain, requester: str, job_id: str, worker: str, peer_id: str, expires_at: int, binding: bytes
) -> None:
    """Check that ``requester`` bound job ``job_id`` to ``worker`` and the sending peer ``peer_id``.

    Raises:
        InvalidReceipt: the binding is malformed, or someone else signed it (or for another job, worker, peer or
            expiry).
    """
    signer = _recover(_terms_signable(domain, job_id, worker, peer_id, expires_at), binding, "job terms")
    if signer != to_checksum_address(requester):
        raise InvalidReceipt(f"the job's terms are not bound to this peer by the requester {requester}")
