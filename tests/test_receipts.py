"""EIP-712 receipts: Python signing and verification agree with the contract byte for byte."""

from __future__ import annotations

import pytest
from eth_abi import encode
from eth_account import Account
from eth_utils import keccak

from node.errors import InvalidReceipt
from node.payments.receipts import (
    ReceiptDomain,
    check_receipt_signer,
    receipt_digest,
    recover_receipt_signer,
    sign_receipt,
)

from .conftest import TOKEN

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
DOMAIN = ReceiptDomain(chain_id=31337, escrow="0x5FbDB2315678afecb367f032d93F642f64180aa3")
CHANNEL = bytes(range(32))
REQUESTER = Account.from_key("0x" + "11" * 32)


def domain_separator_by_hand(domain: ReceiptDomain) -> bytes:
    domain_typehash = keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [domain_typehash, keccak(b"InferenceEscrow"), keccak(b"1"), domain.chain_id, domain.escrow],
        )
    )


def eip712_digest_by_hand(domain: ReceiptDomain, channel_id: bytes, amount: int) -> bytes:
    """The digest spelled out from EIP-712, independently of eth-account."""
    struct_hash = keccak(
        encode(
            ["bytes32", "bytes32", "uint256"],
            [keccak(b"Receipt(bytes32 channelId,uint256 cumulativeAmount)"), channel_id, amount],
        )
    )
    return keccak(b"\x19\x01" + domain_separator_by_hand(domain) + struct_hash)


def test_digest_matches_the_eip712_definition():
    for amount in (0, 1, 10**18, 2**256 - 1):
        assert receipt_digest(DOMAIN, CHANNEL, amount) == eip712_digest_by_hand(DOMAIN, CHANNEL, amount)


def test_sign_then_recover_round_trips():
    signature = sign_receipt(REQUESTER, DOMAIN, CHANNEL, 5 * TOKEN)
    assert len(signature) == 65 and signature[64] in (27, 28)
    assert recover_receipt_signer(DOMAIN, CHANNEL, 5 * TOKEN, signature) == REQUESTER.address
    check_receipt_signer(DOMAIN, CHANNEL, 5 * TOKEN, signature, REQUESTER.address.lower())


@pytest.mark.parametrize(
    "domain, channel, amount",
    [
        (DOMAIN, CHANNEL, 6 * TOKEN),  # another amount
        (DOMAIN, bytes(32), 5 * TOKEN),  # another channel
        (ReceiptDomain(1, DOMAIN.escrow), CHANNEL, 5 * TOKEN),  # another chain
        (ReceiptDomain(31337, "0x" + "ab" * 20), CHANNEL, 5 * TOKEN),  # another escrow
    ],
)
def test_a_receipt_does_not_verify_for_anything_else(domain, channel, amount):
    signature = sign_receipt(REQUESTER, DOMAIN, CHANNEL, 5 * TOKEN)
    with pytest.raises(InvalidReceipt, match="not the requester"):
        check_receipt_signer(domain, channel, amount, signature, REQUESTER.address)


def test_malformed_signatures_are_refused_like_the_contract_does():
    signature = sign_receipt(REQUESTER, DOMAIN, CHANNEL, TOKEN)
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    high_s = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # the malleable twin
    bad = {
        "65 bytes": signature[:64],
        "high s": high_s,
        "v=": r + signature[32:64] + bytes([v - 27]),
    }
    for reason, sig in bad.items():
        with pytest.raises(InvalidReceipt, match=reason):
            recover_receipt_signer(DOMAIN, CHANNEL, TOKEN, sig)


def test_bad_receipt_fields_are_refused():
    with pytest.raises(InvalidReceipt, match="32 bytes"):
        sign_receipt(REQUESTER, DOMAIN, b"short", 1)
    with pytest.raises(InvalidReceipt, match="uint256"):
        sign_receipt(REQUESTER, DOMAIN, CHANNEL, -1)


@pytest.mark.slow
def test_python_digest_equals_the_contracts(chain):
    client = chain.client()
    assert client.escrow.functions.domainSeparator().call() == domain_separator_by_hand(client.domain)
    for amount in (0, 123, 2**256 - 1):
        assert client.escrow.functions.receiptDigest(CHANNEL, amount).call() == receipt_digest(
            client.domain, CHANNEL, amount
        )


@pytest.mark.slow
def test_python_receipts_are_accepted_and_tampered_ones_rejected_on_chain(chain):
    requester = chain.client(chain.requester)
    worker = chain.client(chain.worker)
    channel_id = requester.open_channel(chain.worker.address, 10 * TOKEN, requester.chain_time() + 3600)
    signature = sign_receipt(chain.requester, requester.domain, channel_id, 3 * TOKEN)

    tampered = bytearray(signature)
    tampered[10] ^= 0x01
    state = worker.get_channel(channel_id)
    with pytest.raises(InvalidReceipt):
        worker.check_receipt(state, 3 * TOKEN, bytes(tampered))
    with pytest.raises(InvalidReceipt) as info:
        worker.claim(channel_id, 3 * TOKEN, bytes(tampered))
    assert info.value.error == "InvalidSignature"

    worker.check_receipt(state, 3 * TOKEN, signature)
    worker.claim(channel_id, 3 * TOKEN, signature)
    assert worker.token_balance(chain.worker.address) == 3 * TOKEN
