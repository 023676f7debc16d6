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

**What is ours and what is not.** The encodings come from the multiformats
libraries that py-libp2p already installs: ``py-cid`` (module ``cid``) for the
CID layout, ``py-multibase`` and ``base58`` for the text forms,
``py-multihash`` and ``py-multicodec`` for the prefixes, ``varint`` for
varints. Kubo's balanced layout and the streaming hasher are ours: no library
reproduces them.

**Hostile input.** CIDs arrive from peers and HTTP clients. Every base58
decoder (ours before, ``base58``'s and py-cid's now) converts through one big
integer, which costs time growing with the square of the input: a 1 MB string
froze a worker for minutes. So every input is bounded *before* any decoding:
a CID string is at most ``MAX_CID_CHARS`` characters (a SHA-256 CID, the only
kind llmarket uses, is 46 to 59), a binary CID at most ``MAX_CID_BYTES``, and
a varint at most 10 bytes. Within those bounds, parsing takes microseconds, so
callers may parse on the event loop.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import base58
import cid as pycid
import multibase
import multihash
import varint as varint_codec

from node.errors import ModelError

CHUNK_SIZE = 262_144  # kubo's default chunker, size-262144
MAX_LINKS = 174  # kubo's default links per node (balanced layout)

CODEC_DAG_PB = 0x70
CODEC_RAW = 0x55
MH_SHA2_256 = 0x12

#: The longest CID string accepted. A SHA-256 CID is 46 characters as CIDv0,
#: 59 as base32 CIDv1 and 49 as base58btc CIDv1; the rest is slack.
MAX_CID_CHARS = 100
#: The longest binary CID accepted (a SHA-256 CID is 34 or 36 bytes).
MAX_CID_BYTES = 64
#: The longest varint accepted: 10 bytes hold any 64-bit value.
MAX_VARINT_BYTES = 10

_CODEC_NAMES = {CODEC_DAG_PB: "dag-pb", CODEC_RAW: "raw"}  # multicodec's names
_CODECS = {name: code for code, name in _CODEC_NAMES.items()}
_CID_HINT = "expected a CIDv0 (Qm…, 46 characters) or a CIDv1 (bafy…/bafk…)"


# ------------------------------------------------------------------ encodings


def encode_varint(n: int) -> bytes:
    """Unsigned LEB128, as protobuf and multiformats use it."""
    return varint_codec.encode(n)


def read_varint(buf: bytes, pos: int = 0) -> tuple[int, int]:
    """Decode the varint at ``buf[pos:]``; returns (value, position after it).

    Raises:
        ValueError: the varint is truncated or longer than ``MAX_VARINT_BYTES``.
    """
    # The library has no length limit (a long run of continuation bytes makes an
    # ever larger integer), so it only ever sees MAX_VARINT_BYTES bytes.
    window = io.BytesIO(buf[pos : pos + MAX_VARINT_BYTES])
    try:
        value = varint_codec.decode_stream(window)
    except (EOFError, TypeError):  # varint 1.0.2 fails with TypeError when its input runs out
        raise ValueError("truncated or oversized varint") from None
    return value, pos + window.tell()


# ------------------------------------------------------------------------ CID


@dataclass(frozen=True)
class CID:
    """A parsed CID. Only SHA-256 multihashes, and the dag-pb and raw codecs, are used by IPFS files.

    A small value type of our own (hashable, compared by value, cheap to make
    by the thousand while hashing a file); ``py-cid`` does its encodings.
    """

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
        return multihash.encode(self.digest, MH_SHA2_256)

    def _library(self) -> pycid.CIDv0 | pycid.CIDv1:
        if self.version == 0:
            return pycid.CIDv0(self.multihash)
        return pycid.CIDv1(_CODEC_NAMES[self.codec], self.multihash)

    def to_bytes(self) -> bytes:
        """The binary CID, as dag-pb links and CAR files carry it."""
        return self._library().buffer

    def __str__(self) -> str:
        if self.version == 0:
            return str(self._library())  # base58btc, no multibase prefix
        return self._library().encode("base32").decode()

    def verify_block(self, block: bytes) -> bool:
        return hashlib.sha256(block).digest() == self.digest

    @classmethod
    def from_bytes(cls, raw: bytes) -> CID:
        """Parse a binary CID (exactly, no trailing bytes).

        Raises:
            ModelError: not a CID llmarket can use, with what is wrong.
        """
        if len(raw) > MAX_CID_BYTES:
            raise ModelError(f"malformed binary CID: {len(raw):,} bytes, over the {MAX_CID_BYTES}-byte limit")
        try:
            # A CIDv1 starts with its version; a CIDv0 is a bare multihash.
            parsed = pycid.from_bytes_strict(raw) if raw[:1] == b"\x01" else pycid.CIDv0(raw)
            hashed = multihash.decode(parsed.multihash)
        except (ValueError, TypeError, KeyError) as err:  # the libraries raise these for malformed input
            raise ModelError(f"malformed binary CID: {err}") from None
        if hashed.code != MH_SHA2_256 or hashed.length != 32:
            raise ModelError(f"unsupported multihash {hashed.name}/{hashed.length} bytes; llmarket uses SHA-256 CIDs")
        if parsed.codec not in _CODECS:
            raise ModelError(f"unsupported CID codec {parsed.codec}; model files are dag-pb or raw")
        return cls(parsed.version, _CODECS[parsed.codec], hashed.digest)


def parse_cid(text: str) -> CID:
    """Parse a CID string: CIDv0 (``Qm…``), or CIDv1 in base32 (``b…``) or base58btc (``z…``).

    The length is checked before anything else (see the module docstring), and
    an over-long input is never echoed whole in the error.

    Raises:
        ModelError: not a CID llmarket can use, with what is wrong.
    """
    if len(text) > MAX_CID_CHARS:
        raise ModelError(f"invalid CID {text[:16]!r}… ({len(text):,} characters): a CID is at most {MAX_CID_CHARS}")
    text = text.strip()
    if len(text) == 46 and text.startswith("Qm"):
        decode, base = base58.b58decode, "base58"
    elif text[:1] in ("b", "B", "z") and len(text) > 8:
        decode, base = multibase.decode, "base58btc" if text[0] == "z" else "base32"
    else:
        raise ModelError(f"invalid CID {text!r}: {_CID_HINT}")
    try:
        raw = decode(text)
    except ValueError as err:  # base58's and multibase's decoding errors are ValueErrors
        raise ModelError(f"invalid CID {text!r}: not valid {base} ({err})") from None
    wants_v1 = not text.startswith("Qm")  # Qm… is a bare v0 multihash; b…/z… a v1 CID, version first
    if (raw[:1] == b"\x01") != wants_v1:
        raise ModelError(f"invalid CID {text!r}: {_CID_HINT}")
    try:
        return CID.from_bytes(raw)
    except ModelError as err:
        raise ModelError(f"invalid CID {text!r}: {err}") from None


# ----------------------------------------------------------------- protobufs


def _pb_bytes(field_number: int, value: bytes) -> bytes:
    return encode_varint(field_number << 3 | 2) + encode_varint(len(value)) + value


def _pb_varint(field_number: int, value: int) -> bytes:
    return encode_varint(field_number << 3) + encode_varint(value)


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
    unixfs_head = _pb_varint(1, 2) + (encode_varint(2 << 3 | 2) + encode_varint(size) if size else b"")
    unixfs_tail = _pb_varint(3, size)
    unixfs_len = len(unixfs_head) + size + len(unixfs_tail)
    head = encode_varint(1 << 3 | 2) + encode_varint(unixfs_len) + unixfs_head
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
