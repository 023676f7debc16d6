"""Verifying a UnixFS file DAG block by block, as it arrives from an untrusted source.

``DagAssembler`` is given the root CID and a file to write into. Each block fed
to it must be one it expects (the root, or a child named by a block already
verified), must hash to its CID, and must be a well-formed UnixFS file node
whose sizes agree with what its parent declared. Leaf data is written at its
offset in the file as soon as it is verified; identical chunks (deduplicated to
one block) are written at every offset that uses them. The first bad block
raises ``ModelError`` naming the block, the root and the source.

Blocks may arrive in any order as long as a parent comes before its children,
which is the order of ``ipfs dag export`` and of our peer protocol.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from node.errors import ModelError
from node.models.cid import CID, CODEC_DAG_PB, CODEC_RAW, read_varint

#: The largest block accepted: kubo's chunks are 256 KiB; a node of 174 links is ~8 KiB.
MAX_BLOCK_SIZE = 1 << 20

_UNIXFS_RAW = 0
_UNIXFS_FILE = 2


@dataclass(frozen=True)
class PbNode:
    links: list[tuple[CID, int]]  # (child, tsize)
    data: bytes


@dataclass(frozen=True)
class UnixfsData:
    type: int
    data: bytes
    filesize: int | None
    blocksizes: list[int]


def _fields(buf: bytes):
    """Iterate (field number, wire type, value) over a protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated length-delimited field")
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def decode_dag_pb(block: bytes) -> PbNode:
    links, data = [], b""
    for number, wire, value in _fields(block):
        if number == 2 and wire == 2:
            cid, tsize = None, 0
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    cid = CID.from_bytes(v)
                elif n == 3 and w == 0:
                    tsize = v
            if cid is None:
                raise ValueError("link without a hash")
            links.append((cid, tsize))
        elif number == 1 and wire == 2:
            data = value
        else:
            raise ValueError(f"unexpected dag-pb field {number}")
    return PbNode(links, data)


def decode_unixfs(data: bytes) -> UnixfsData:
    kind, payload, filesize, blocksizes = None, b"", None, []
    for number, wire, value in _fields(data):
        if number == 1 and wire == 0:
            kind = value
        elif number == 2 and wire == 2:
            payload = value
        elif number == 3 and wire == 0:
            filesize = value
        elif number == 4 and wire == 0:
            blocksizes.append(value)
        elif number == 4 and wire == 2:  # packed encoding
            pos = 0
            while pos < len(value):
                size, pos = read_varint(value, pos)
                blocksizes.append(size)
    if kind is None:
        raise ValueError("UnixFS data without a type")
    return UnixfsData(kind, payload, filesize, blocksizes)


class DagAssembler:
    """Verify a file's DAG block by block and write the file as it goes.

    Args:
        root: the CID asked for.
        fd: an open, writable file descriptor to write the file into.
        source: a name for where blocks come from, for error messages.
    """

    def __init__(self, root: CID, fd: int, source: str) -> None:
        self.root = root
        self.fd = fd
        self.source = source
        self.size: int | None = None  # the file's size, once the root is seen
        self.written = 0
        # CID -> the (offset, expected file size) of every place the file uses it
        self._expected: dict[CID, list[tuple[int, int | None]]] = {root: [(0, None)]}

    def _fail(self, cid: CID, what: str) -> ModelError:
        return ModelError(f"{self.source} sent a bad block {cid} for {self.root}: {what}; nothing was kept")

    def feed(self, cid: CID, block: bytes) -> None:
        """Verify one block and write the file data it carries. Raises ``ModelError`` on any mismatch."""
        places = self._expected.pop(cid, None)
        if places is None:
            raise self._fail(cid, "it is not part of this file (or was sent twice)")
        if len(block) > MAX_BLOCK_SIZE:
            raise self._fail(cid, f"{len(block)} bytes is over the {MAX_BLOCK_SIZE} byte block limit")
        if not cid.verify_block(block):
            raise self._fail(cid, "its bytes do not hash to its CID")
        if cid.codec == CODEC_RAW:
            self._write_leaf(cid, block, places)
            return
        if cid.codec != CODEC_DAG_PB:
            raise self._fail(cid, f"codec 0x{cid.codec:x} is not a UnixFS file block")
        try:
            node = decode_dag_pb(block)
            unixfs = decode_unixfs(node.data)
        except (ValueError, ModelError) as err:
            raise self._fail(cid, f"it is not a valid UnixFS node ({err})") from None
        if unixfs.type not in (_UNIXFS_FILE, _UNIXFS_RAW):
            raise self._fail(cid, f"UnixFS type {unixfs.type} is not a file (a directory CID?)")
        filesize = unixfs.filesize if unixfs.filesize is not None else len(unixfs.data)
        if cid == self.root:
            self.size = filesize
        for _, expected_size in places:
            if expected_size is not None and expected_size != filesize:
                raise self._fail(cid, f"it holds {filesize} bytes where its parent declared {expected_size}")
        if not node.links:
            if len(unixfs.data) != filesize:
                raise self._fail(cid, f"its data is {len(unixfs.data)} bytes but it declares {filesize}")
            self._write_leaf(cid, unixfs.data, places)
            return
        if len(unixfs.blocksizes) != len(node.links) or sum(unixfs.blocksizes) + len(unixfs.data) != filesize:
            raise self._fail(cid, "its child sizes do not add up to its file size")
        if unixfs.data:
            raise self._fail(cid, "inner nodes with inline data are not supported")
        for offset, _ in places:
            child_offset = offset
            for (child, _tsize), child_size in zip(node.links, unixfs.blocksizes, strict=True):
                self._expected.setdefault(child, []).append((child_offset, child_size))
                child_offset += child_size

    def _write_leaf(self, cid: CID, data: bytes, places: list[tuple[int, int | None]]) -> None:
        if cid == self.root:
            self.size = len(data)
        for offset, expected_size in places:
            if expected_size is not None and expected_size != len(data):
                raise self._fail(cid, f"it holds {len(data)} bytes where its parent declared {expected_size}")
            written = os.pwrite(self.fd, data, offset)
            if written != len(data):
                raise ModelError(f"short write to the model cache ({written} of {len(data)} bytes); is the disk full?")
            self.written += len(data)

    def finish(self) -> int:
        """Check that the whole file arrived; returns its size."""
        if self._expected:
            missing = next(iter(self._expected))
            raise ModelError(
                f"{self.source} ended the transfer of {self.root} with {len(self._expected)} blocks missing "
                f"(first: {missing}); nothing was kept"
            )
        assert self.size is not None
        if self.written != self.size:
            raise ModelError(f"{self.source}: assembled {self.written} bytes of {self.size} for {self.root}")
        return self.size
