"""CIDs computed locally: known vectors, parsing, and the encodings underneath."""

from __future__ import annotations

import io
import random

import pytest

from node.errors import ModelError
from node.models.cid import CHUNK_SIZE, CID, b58decode, b58encode, file_cid, parse_cid, read_varint, varint
from node.models.default import DEFAULT_MODEL_CID, DEFAULT_MODEL_CID_V0, DEFAULT_MODEL_SIZE

# Vectors anyone can check with `ipfs add` (kubo defaults):
EMPTY_V0 = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
EMPTY_V1 = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


def test_empty_file_vectors():
    assert str(file_cid(io.BytesIO(b""), 0)) == EMPTY_V0
    assert str(file_cid(io.BytesIO(b""), 1)) == EMPTY_V1


def test_default_model_cids(default_model_file):
    assert default_model_file.stat().st_size == DEFAULT_MODEL_SIZE
    with open(default_model_file, "rb") as f:
        assert str(file_cid(f, 0)) == DEFAULT_MODEL_CID_V0
    with open(default_model_file, "rb") as f:
        assert str(file_cid(f, 1)) == DEFAULT_MODEL_CID


def test_hashing_does_not_depend_on_how_the_bytes_are_fed():
    data = random.Random(7).randbytes(3 * CHUNK_SIZE + 17)
    expected = file_cid(io.BytesIO(data), 1)
    for block_size in (1000, 4096, CHUNK_SIZE, CHUNK_SIZE + 1, len(data)):
        assert file_cid(io.BytesIO(data), 1, block_size=block_size) == expected


def test_cid_strings_round_trip():
    for text in (EMPTY_V0, EMPTY_V1, DEFAULT_MODEL_CID, DEFAULT_MODEL_CID_V0):
        cid = parse_cid(text)
        assert str(cid) == text
        assert CID.from_bytes(cid.to_bytes()) == cid
    assert parse_cid(DEFAULT_MODEL_CID.upper()) == parse_cid(DEFAULT_MODEL_CID)  # base32 is case-insensitive
    # js-ipfs prints CIDv1 in base58btc by default; it is the same CID
    assert parse_cid("zdj7WhdxvqVnv6rBRjQrhSYrs5tLVhUWbZWbsGahxVgL9T3kS") == parse_cid(DEFAULT_MODEL_CID)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "invalid CID"),
        ("hello", "invalid CID"),
        ("Qm" + "0" * 44, "not a base58 character"),  # 0 is not in base58
        ("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQ", "invalid CID"),  # one character short
        ("bafy!!!!notbase32", "invalid CID"),
        ("bafybeifvmoiokowzsdfjoiosxsk3t5p42iq6lajhmfld5v22b3osnrzm", "invalid CID"),  # truncated
        ("bagaaierasords4njcts6vs7qvdjfcvgnume4hqohf65zsfguprqphs3icwea", "codec"),  # dag-json, not a file
        ("z0OIl0OIl0OIl", "base58"),
    ],
)
def test_malformed_cids_are_clear_errors(text, message):
    with pytest.raises(ModelError, match=message):
        parse_cid(text)


def test_varint_and_base58():
    for n in (0, 1, 127, 128, 300, 2**35):
        assert read_varint(varint(n)) == (n, len(varint(n)))
    for data in (b"", b"\0\0abc", bytes(range(40))):
        assert b58decode(b58encode(data)) == data
