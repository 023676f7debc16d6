"""Content identifiers, computed exactly as kubo's ``ipfs add`` does.

A model is named by the CID of its file as IPFS imports it (UnixFS, kubo's
defaults): the file is cut into 256 KiB chunks, the chunks become the leaves of
a *balanced* DAG whose inner nodes hold at most 174 links, and every node is
hashed with SHA-256. Two profiles matter, both reproduced here byte for byte:

- **CIDv0** (``ipfs add``): every node, leaves included, is a dag-pb node
  wrapping UnixFS ``Data``; the CID is the base58btc multihash (``Qm…``).
- **CIDv1** (``ipfs add --cid-version=1``, which implies raw leaves): leaves are
  raw blocks (codec ``raw``), inner nodes dag-pb; the CID is multibase base32
  (``bafy…`` for a DAG, ``bafk…`` for a file that fits in one raw block).

``FileHasher`` consumes a file as a stream (no second pass, constant memory),
so a download or a copy can be hashed while it is written. Nothing here does
I/O beyond what the caller feeds it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from node.errors import ModelError

CHUNK_SIZE = 262_144  # kubo's default chunker, size-262144
MAX_LINKS = 174  # kubo's default links per node (balanced layout)

CODEC_DAG_PB = 0x70
CODEC_RAW = 0x55
MH_SHA2_256 = 0x12

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


# ------------------------------------------------------------------ encodings


def varint(n: int) -> bytes:
    """Unsigned LEB128, as protobuf and multiformats use it."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: bytes, pos: int = 0) -> tuple[int, int]:
    """Decode a varint at ``buf[pos:]``; returns (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or oversized varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, rem = divmod(n, 58)
        out = _B58_ALPHABET[rem] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def b58decode(text: str) -> bytes:
    n = 0
    for char in text:
        if char not in _B58_INDEX:
            raise ValueError(f"{char!r} is not a base58 character")
        n = n * 58 + _B58_INDEX[char]
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


# ------------------------------------------------------------------------ CID


@dataclass(frozen=True)
class CID:
    """A parsed CID. Only SHA-256 multihashes, and the dag-pb and raw codecs, are used by IPFS files."""

    version: int
    codec: int
    digest: bytes  # the SHA-256 digest of the block

    @classmethod
    def v0(cls, digest: bytes) -> CID:
        return cls(0, CODEC_DAG_PB, digest)

    @classmethod
    def v1(cls, codec: int, digest: bytes) -> CID:
        return cls(1, codec, digest)

    @property
    def multihash(self) -> bytes:
        return bytes([MH_SHA2_256, 32]) + self.digest

    def to_bytes(self) -> bytes:
        """The binary CID, as dag-pb links and CAR files carry it."""
        if self.version == 0:
            return self.multihash
        return varint(1) + varint(self.codec) + self.multihash

    def __str__(self) -> str:
        if self.version == 0:
            return b58encode(self.multihash)
        return "b" + base64.b32encode(self.to_bytes()).decode().lower().rstrip("=")

    def verify_block(self, block: bytes) -> bool:
        return hashlib.sha256(block).digest() == self.digest

    @classmethod
    def from_bytes(cls, raw: bytes) -> CID:
        """Parse a binary CID (exactly, no trailing bytes)."""
        cid, end = cls.read(raw, 0)
        if end != len(raw):
            raise ModelError(f"binary CID has {len(raw) - end} trailing bytes")
        return cid

    @classmethod
    def read(cls, buf: bytes, pos: int) -> tuple[CID, int]:
        """Parse a binary CID at ``buf[pos:]``; returns (cid, position after it)."""
        try:
            if buf[pos : pos + 2] == bytes([MH_SHA2_256, 32]):
                digest = buf[pos + 2 : pos + 34]
                if len(digest) != 32:
                    raise ValueError("truncated multihash")
                return cls.v0(digest), pos + 34
            version, pos = read_varint(buf, pos)
            if version != 1:
                raise ValueError(f"CID version {version}")
            codec, pos = read_varint(buf, pos)
            hash_code, pos = read_varint(buf, pos)
            length, pos = read_varint(buf, pos)
        except (ValueError, IndexError) as err:
            raise ModelError(f"malformed binary CID: {err}") from None
        if hash_code != MH_SHA2_256 or length != 32:
            raise ModelError(f"unsupported multihash 0x{hash_code:x}/{length} bytes; llmarket uses SHA-256 CIDs")
        if codec not in (CODEC_DAG_PB, CODEC_RAW):
            raise ModelError(f"unsupported CID codec 0x{codec:x}; model files are dag-pb or raw")
        digest = buf[pos : pos + 32]
        if len(digest) != 32:
            raise ModelError("malformed binary CID: truncated digest")
        return cls.v1(codec, digest), pos + 32


def parse_cid(text: str) -> CID:
    """Parse a CID string: CIDv0 (``Qm…``), or CIDv1 in base32 (``b…``) or base58btc (``z…``).

    Raises:
        ModelError: not a CID llmarket can use, with what is wrong.
    """
    text = text.strip()
    hint = "expected a CIDv0 (Qm…, 46 characters) or a CIDv1 (bafy…/bafk…)"
    try:
        if len(text) == 46 and text.startswith("Qm"):
            raw = b58decode(text)
            if len(raw) != 34 or raw[:2] != bytes([MH_SHA2_256, 32]):
                raise ModelError("not a SHA-256 multihash")
            return CID.v0(raw[2:])
        if text[:1] in ("b", "B", "z") and len(text) > 8:
            if text[0] == "z":
                raw = b58decode(text[1:])
            else:
                body = text[1:].upper()
                raw = base64.b32decode(body + "=" * (-len(body) % 8))
            if raw[:1] != b"\x01":
                raise ModelError(hint)
            return CID.from_bytes(raw)
    except (ModelError, ValueError) as err:  # binascii.Error is a ValueError
        raise ModelError(f"invalid CID {text!r}: {err}") from None
    raise ModelError(f"invalid CID {text!r}: {hint}")


# ----------------------------------------------------------------- protobufs


def _pb_bytes(field_number: int, value: bytes) -> bytes:
    return varint(field_number << 3 | 2) + varint(len(value)) + value


def _pb_varint(field_number: int, value: int) -> bytes:
    return varint(field_number << 3) + varint(value)


def unixfs_file(data: bytes | None, filesize: int, blocksizes: list[int] = ()) -> bytes:
    """UnixFS ``Data`` of a file node: Type=File, the chunk (leaves), its size, the children's sizes."""
    out = _pb_varint(1, 2)  # Type = File
    if data:
        out += _pb_bytes(2, data)
    out += _pb_varint(3, filesize)
    for size in blocksizes:
        out += _pb_varint(4, size)
    return out


def dag_pb_node(links: list[tuple[CID, int]], data: bytes) -> bytes:
    """A dag-pb node in canonical form: links first (Hash, empty Name, Tsize), then Data."""
    out = b""
    for cid, tsize in links:
        link = _pb_bytes(1, cid.to_bytes()) + _pb_bytes(2, b"") + _pb_varint(3, tsize)
        out += _pb_bytes(2, link)
    return out + _pb_bytes(1, data)


# ---------------------------------------------------------------- the hasher


@dataclass(frozen=True)
class Link:
    """A finished node of a file's DAG, as its parent links to it."""

    cid: CID
    filesize: int  # file bytes under it
    tsize: int  # encoded bytes under it, itself included


def leaf_link(chunk: bytes, version: int) -> Link:
    """The leaf block kubo makes of one chunk: raw (CIDv1) or dag-pb wrapping UnixFS data (CIDv0)."""
    return leaf_link_of_pieces([chunk], len(chunk), version)


def leaf_link_of_pieces(pieces: Sequence[bytes | memoryview], size: int, version: int) -> Link:
    """``leaf_link`` of the concatenation of ``pieces`` (``size`` bytes), without joining them."""
    digest = hashlib.sha256()
    if version == 1:
        for piece in pieces:
            digest.update(piece)
        return Link(CID.v1(CODEC_RAW, digest.digest()), size, size)
    # dag-pb { Data (1): UnixFS { Type (1) = File, Data (2) = chunk, filesize (3) } }, as in dag_pb_node/unixfs_file
    unixfs_head = _pb_varint(1, 2) + (varint(2 << 3 | 2) + varint(size) if size else b"")
    unixfs_tail = _pb_varint(3, size)
    unixfs_len = len(unixfs_head) + size + len(unixfs_tail)
    head = varint(1 << 3 | 2) + varint(unixfs_len) + unixfs_head
    digest.update(head)
    for piece in pieces:
        digest.update(piece)
    digest.update(unixfs_tail)
    return Link(CID.v0(digest.digest()), size, len(head) + size + len(unixfs_tail))


class FileHasher:
    """Streaming UnixFS import: ``update()`` with the file's bytes, then ``cid()``.

    Args:
        version: 0 for kubo's default CIDv0, 1 for ``--cid-version=1`` (raw leaves).

    The tree is the balanced layout built bottom-up: leaves fill an inner node of
    up to 174 links; a full node becomes a child one level up, and so on. That
    is exactly the tree kubo's top-down balanced builder produces. Leaves can
    also be given ready-made (``add_leaf``), which is how a fetched DAG is
    checked for the default layout without hashing its data twice.
    """

    def __init__(self, version: int = 1, *, keep_inner_blocks: bool = False) -> None:
        if version not in (0, 1):
            raise ValueError("CID version must be 0 or 1")
        self.version = version
        #: With ``keep_inner_blocks``, every inner node's block by CID (≈ 8 KiB per 44 MiB of file).
        self.inner_blocks: dict[CID, bytes] | None = {} if keep_inner_blocks else None
        self.size = 0
        self._buffer = bytearray()
        self._levels: list[list[Link]] = []  # the open node's children, per height; 0 holds leaves
        self._leaves = 0
        self._done: CID | None = None

    def update(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= CHUNK_SIZE:
            chunk = bytes(self._buffer[:CHUNK_SIZE])
            del self._buffer[:CHUNK_SIZE]
            self.add_leaf(leaf_link(chunk, self.version))

    def add_leaf(self, leaf: Link) -> None:
        if self._done is not None:
            raise ValueError("FileHasher already finished")
        self.size += leaf.filesize
        self._leaves += 1
        self._add(leaf, 0)

    def cid(self) -> CID:
        """Finish and return the root CID (idempotent)."""
        if self._done is None:
            if self._buffer or self._leaves == 0:
                self.add_leaf(leaf_link(bytes(self._buffer), self.version))
                self._buffer.clear()
            self._done = self._finish()
        return self._done

    # Each node is built only from finished children, so the running state is
    # one partly filled node per level: O(log n) memory for any file size.

    def _inner(self, children: list[Link]) -> Link:
        filesize = sum(c.filesize for c in children)
        block = dag_pb_node(
            [(c.cid, c.tsize) for c in children], unixfs_file(None, filesize, [c.filesize for c in children])
        )
        digest = hashlib.sha256(block).digest()
        cid = CID.v0(digest) if self.version == 0 else CID.v1(CODEC_DAG_PB, digest)
        if self.inner_blocks is not None:
            self.inner_blocks[cid] = block
        return Link(cid, filesize, len(block) + sum(c.tsize for c in children))

    def _add(self, node: Link, height: int) -> None:
        if height == len(self._levels):
            self._levels.append([])
        level = self._levels[height]
        level.append(node)
        # A full node is closed only once a sibling follows it: if nothing
        # follows, it is the top of the tree and must become the root itself.
        if len(level) > MAX_LINKS:
            self._levels[height] = level[MAX_LINKS:]
            self._add(self._inner(level[:MAX_LINKS]), height + 1)

    def _finish(self) -> CID:
        if self._leaves == 1:
            return self._levels[0][0].cid  # a one-chunk file is its own root
        height = 0
        while True:  # close the partly filled node of each level, bottom-up
            is_top = height == len(self._levels) - 1
            node = self._inner(self._levels[height])
            self._levels[height] = []
            if is_top:
                return node.cid
            self._add(node, height + 1)
            height += 1


def file_cid(stream: BinaryIO, version: int = 1, *, block_size: int = 1 << 20) -> CID:
    """The CID of everything readable from ``stream``."""
    hasher = FileHasher(version)
    while chunk := stream.read(block_size):
        hasher.update(chunk)
    return hasher.cid()
