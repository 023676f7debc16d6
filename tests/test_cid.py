"""CIDs computed locally: known vectors, parsing, and the encodings underneath."""

from __future__ import annotations

import io
import random
import time

import pytest

from node.errors import ModelError
from node.models.cid import (
    CHUNK_SIZE,
    CID,
    MAX_CID_CHARS,
    encode_varint,
    file_cid,
    parse_cid,
    read_varint,
)
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
        ("Qm" + "0" * 44, "not valid base58"),  # 0 is not in base58
        ("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQ", "invalid CID"),  # one character short
        ("bafy!!!!notbase32", "invalid CID"),
        ("bafybeifvmoiokowzsdfjoiosxsk3t5p42iq6lajhmfld5v22b3osnrzm", "invalid CID"),  # truncated
        ("bagaaierasords4njcts6vs7qvdjfcvgnume4hqohf65zsfguprqphs3icwea", "codec"),  # dag-json, not a file
        ("z0OIl0OIl0OIl", "not valid base58btc"),
        ("zQmR58njnbf5NUQQ6uF9vkbHL4N1h3kFnkFcXdASEa8hQvY", "expected a CIDv0"),  # a v0 multihash is not a v1 CID
        ("b/ipfs/QmR58njnbf5NUQQ6uF9vkbHL4N1h3kFnkFcXdASEa8hQvY", "not valid base32"),  # no paths, only CIDs
        (" " * (MAX_CID_CHARS + 1), f"at most {MAX_CID_CHARS}"),
    ],
)
def test_malformed_cids_are_clear_errors(text, message):
    with pytest.raises(ModelError, match=message):
        parse_cid(text)


def test_varints():
    for n in (0, 1, 127, 128, 300, 2**35, 2**63):
        assert read_varint(encode_varint(n)) == (n, len(encode_varint(n)))
    assert read_varint(b"\x00" + encode_varint(300) + b"rest", 1) == (300, 3)
    for bad in (b"", b"\x80", b"\xff" * 11):
        with pytest.raises(ValueError, match="truncated or oversized varint"):
            read_varint(bad)


# Issue 9, item 6: `["model.block/1", {"cid": "z" + "2" * 1_048_000}]` froze a worker for 253 s,
# because base58 decoding takes time growing with the square of the input. Every input is
# now bounded before it is decoded.
@pytest.mark.parametrize("prefix", ["z", "b", "Qm"])
@pytest.mark.parametrize("length", [200_000, 1_048_000])
def test_huge_cid_strings_are_refused_before_decoding(prefix, length):
    text = prefix + "2" * length
    started = time.perf_counter()
    with pytest.raises(ModelError, match=f"characters\\): a CID is at most {MAX_CID_CHARS}") as info:
        parse_cid(text)
    assert time.perf_counter() - started < 0.1  # the old parser took 8 s for 200 KB, 253 s for 1 MB
    assert len(str(info.value)) < 200  # the error does not echo the input


def test_huge_binary_cids_and_varints_are_refused_before_decoding():
    started = time.perf_counter()
    with pytest.raises(ModelError, match="over the 64-byte limit"):
        CID.from_bytes(b"\x01\x70" + b"\xff" * 1_000_000)
    with pytest.raises(ValueError, match="oversized varint"):
        read_varint(b"\xff" * 1_000_000)  # an unbounded decoder would build a 7-million-bit integer
    assert time.perf_counter() - started < 0.1


def test_cids_in_binary():
    v0, v1 = parse_cid(DEFAULT_MODEL_CID_V0), parse_cid(DEFAULT_MODEL_CID)
    assert len(v0.to_bytes()) == 34 and len(v1.to_bytes()) == 36
    assert v1.to_bytes()[:4] == bytes([1, 0x70, 0x12, 32]) and v1.to_bytes()[4:] == v1.digest
    for raw, message in [
        (v1.to_bytes() + b"\0", "malformed binary CID"),  # trailing bytes
        (v1.to_bytes()[:-1], "malformed binary CID"),  # truncated
        (bytes([1, 0x71]) + v1.multihash, "unsupported CID codec dag-cbor"),
        (bytes([0x11, 20]) + bytes(20), "unsupported multihash sha1/20 bytes"),
    ]:
        with pytest.raises(ModelError, match=message):
            CID.from_bytes(raw)
