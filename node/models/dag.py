"""Fetching a file by CID from an untrusted source, verifying every block as it arrives.

A source needs two primitives (``BlockSource``): ``get_block(cid)``, one raw
block, and ``cat(cid)``, the file's bytes in order. Fetching then goes:

1. **Plan.** Get the root and the inner nodes of the DAG, block by block. Each
   block is checked against the CID its parent names before it is decoded.
   The inner nodes name every leaf in file order, with its size. The plan is
   accepted only if it is exactly the DAG kubo's default import makes of such
   leaves (256 KiB chunks, balanced, 174 links per node): the root is rebuilt
   from the leaves' CIDs and must come out as the CID asked for.
2. **Stream.** Read the file's bytes and cut them at the planned leaf sizes.
   Each chunk is hashed into its leaf CID and compared with the plan before it
   is written; the first mismatch aborts the fetch, naming the block, the file
   and the source. Hashing and writing run one chunk behind the reading (on a
   helper thread), so verification costs almost no extra time over the
   transfer itself.

The leaves are most of the bytes and come over the fastest path the source
has (``cat``); only the inner nodes, about 0.02% of a file, come block by block.

**Slow sources.** A source could stay just under its own per-message timeout
forever (64 bytes every 20 s held a new worker for good). So every source must
keep up a minimum rate (``Pace``): each ``window_s`` seconds spent *waiting on
it* must bring ``min_bytes_per_s × window_s`` bytes, or the fetch fails with a
"too slow" error and the store moves on to the next source. Only time blocked
on the source counts, not our own hashing and writing, and a block answered in
the plan counts as a whole chunk (its cost is a round trip, not its few bytes).
The check runs whenever something arrives, so a source that sends nothing at
all is left to its own per-message timeout. Windows are counted one after the
other, and bytes sent fast early in a window can carry it, so a source that
slows down is dropped at most two windows plus one such timeout later.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from node.errors import ModelError
from node.models.cid import (
    CHUNK_SIZE,
    CID,
    CODEC_DAG_PB,
    CODEC_RAW,
    MAX_LINKS,
    FileHasher,
    Link,
    leaf_link_of_pieces,
    read_varint,
)
from node.progress import NO_PROGRESS, Progress

_UNIXFS_RAW = 0
_IN_FLIGHT = 8  # chunks read but not yet verified and written: at most 2 MiB
_UNIXFS_FILE = 2

T = TypeVar("T")


@dataclass(frozen=True)
class Pace:
    """The slowest a source may deliver before the fetch gives up on it (see the module docstring).

    The default, 64 KiB/s over 30 s, only rules out sources that are useless
    (a 1 GB model would take 4.5 hours at that rate); honest peers and daemons
    are hundreds of times faster.
    """

    min_bytes_per_s: float = 64 * 1024
    window_s: float = 30.0


class _Meter:
    """Counts what a source delivers against the time spent waiting on it, one window at a time."""

    def __init__(self, pace: Pace, source_name: str) -> None:
        self.pace, self.source_name = pace, source_name
        self.waited = 0.0  # seconds spent waiting on the source in the current window
        self.credit = 0  # bytes it delivered in them

    def timed(self, call: Callable[[], T], credit: Callable[[T], int]) -> T:
        """``call()``, timed; what it returns is credited with ``credit(result)`` bytes."""
        started = time.monotonic()
        result = call()
        self.add(time.monotonic() - started, credit(result))
        return result

    def add(self, waited: float, nbytes: int) -> None:
        self.waited += waited
        self.credit += nbytes
        if self.waited < self.pace.window_s:
            return
        if self.credit < self.pace.min_bytes_per_s * self.waited:
            raise ModelError(
                f"{self.source_name} is too slow: {self.credit:,} bytes in {self.waited:.1f}s, "
                f"under the minimum of {self.pace.min_bytes_per_s:,.0f} bytes/s; nothing was kept"
            )
        self.waited, self.credit = 0.0, 0


DEFAULT_PACE = Pace()


class BlockSource(Protocol):
    """Where a CID's blocks and bytes can come from (an IPFS daemon, a peer)."""

    name: str

    def get_block(self, cid: CID) -> bytes:
        """The raw block ``cid`` (unverified). Raises ``ModelError`` if it cannot."""

    def cat(self, cid: CID) -> Iterable[bytes]:
        """The file's bytes in order, in chunks of any size (unverified). Raises ``ModelError`` if it cannot."""


# --------------------------------------------------------------- decoding


@dataclass(frozen=True)
class FileNode:
    """A decoded UnixFS file node."""

    links: list[tuple[CID, int]]  # (child, tsize)
    data: bytes
    filesize: int
    blocksizes: list[int]


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def decode_file_node(block: bytes) -> FileNode:
    """Decode a dag-pb block holding UnixFS file data. Raises ``ValueError`` if it is anything else."""
    links: list[tuple[CID, int]] = []
    unixfs = None
    for number, wire, value in _fields(block):
        if number == 2 and wire == 2:
            cid, tsize = None, 0
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    cid = CID.from_bytes(v)
                elif n == 3 and w == 0:
                    tsize = v
            if cid is None:
                raise ValueError("a link without a hash")
            links.append((cid, tsize))
        elif number == 1 and wire == 2:
            unixfs = value
        else:
            raise ValueError(f"unexpected dag-pb field {number}")
    if unixfs is None:
        raise ValueError("no UnixFS data")
    kind, data, filesize, blocksizes = None, b"", None, []
    for number, wire, value in _fields(unixfs):
        if number == 1 and wire == 0:
            kind = value
        elif number == 2 and wire == 2:
            data = value
        elif number == 3 and wire == 0:
            filesize = value
        elif number == 4 and wire == 0:
            blocksizes.append(value)
    if kind not in (_UNIXFS_FILE, _UNIXFS_RAW):
        raise ValueError(f"UnixFS type {kind} is not a file (a directory CID?)")
    filesize = len(data) if filesize is None else filesize
    if links and (len(blocksizes) != len(links) or sum(blocksizes) + len(data) != filesize):
        raise ValueError("child sizes do not add up to the file size")
    return FileNode(links, data, filesize, blocksizes)


# ------------------------------------------------------------------ planning


@dataclass(frozen=True)
class FilePlan:
    """What a verified fetch will write: the file's size and its leaves in order."""

    root: CID
    size: int
    leaves: list[Link]
    inline: bytes | None  # the whole file, when it fits in the root block


def _depth(leaves: int) -> int:
    depth, capacity = 0, 1
    while capacity < leaves:
        depth, capacity = depth + 1, capacity * MAX_LINKS
    return depth


class _Fetcher:
    def __init__(self, root: CID, source: BlockSource, pace: Pace) -> None:
        self.root, self.source = root, source
        self.version = root.version
        self.meter = _Meter(pace, source.name)
        self.received = 0  # bytes the source delivered: blocks and file bytes

    def fail(self, cid: CID, what: str) -> ModelError:
        return ModelError(f"{self.source.name} sent a bad block {cid} of {self.root}: {what}; nothing was kept")

    def block(self, cid: CID) -> bytes:
        block = self.meter.timed(lambda: self.source.get_block(cid), lambda b: max(len(b), CHUNK_SIZE))
        self.received += len(block)
        if not cid.verify_block(block):
            raise self.fail(cid, "its bytes do not hash to its CID")
        return block

    def node(self, cid: CID) -> FileNode:
        if cid.codec != CODEC_DAG_PB:
            raise self.fail(cid, f"codec 0x{cid.codec:x} where an inner file node belongs")
        try:
            return decode_file_node(self.block(cid))
        except ValueError as err:
            raise self.fail(cid, f"it is not a UnixFS file node ({err})") from None

    def plan(self) -> FilePlan:
        if self.root.codec == CODEC_RAW:  # a one-block CIDv1 file
            data = self.block(self.root)
            return FilePlan(self.root, len(data), [], data)
        root = self.node(self.root)
        if not root.links:  # a one-block CIDv0 file
            return FilePlan(self.root, root.filesize, [], root.data)
        depth = _depth(-(-root.filesize // CHUNK_SIZE))
        level: list[FileNode] = [root]
        known: dict[CID, FileNode] = {self.root: root}  # identical subtrees are fetched once
        for _ in range(1, depth):
            children = []
            for parent in level:
                for cid, _ in parent.links:
                    if cid not in known:
                        known[cid] = self.node(cid)
                    if not known[cid].links:
                        raise self._not_default()
                    children.append(known[cid])
            level = children
        leaves = [
            Link(cid, size, tsize)
            for parent in level
            for (cid, tsize), size in zip(parent.links, parent.blocksizes, strict=True)
        ]
        self._check_default_layout(root.filesize, leaves)
        return FilePlan(self.root, root.filesize, leaves, None)

    def leaves_in_order(self, root: FileNode) -> Iterator[Link]:
        """The file's leaves in order, fetching inner nodes only as the walk reaches them (a prefix needs
        one path down the DAG, not the whole plan). Every node is checked against the CID its parent
        names, and what is walked must be laid out as kubo's default import lays it out: inner nodes hold
        links only, every leaf sits at the depth the file's size gives, and every leaf but the file's last
        holds a whole chunk. So the bytes cut at these sizes are the file's, at their offsets."""
        depth = _depth(-(-root.filesize // CHUNK_SIZE))
        offset = 0
        stack: list[tuple[int, Iterator[tuple[tuple[CID, int], int]]]] = [
            (1, iter(zip(root.links, root.blocksizes, strict=True)))
        ]
        while stack:
            level, children = stack[-1]
            step = next(children, None)
            if step is None:
                stack.pop()
                continue
            (cid, tsize), size = step
            if level < depth:
                node = self.node(cid)
                if not node.links or node.data or node.filesize != size or len(node.links) > MAX_LINKS:
                    raise self._not_default()
                stack.append((level + 1, iter(zip(node.links, node.blocksizes, strict=True))))
                continue
            last = offset + size == root.filesize
            if not (size == CHUNK_SIZE or (last and 0 < size < CHUNK_SIZE)):
                raise self._not_default()
            if (cid.codec == CODEC_RAW) != (self.version == 1):
                raise self._not_default()
            offset += size
            yield Link(cid, size, tsize)
        if offset != root.filesize:
            raise self._not_default()

    def _not_default(self) -> ModelError:
        return ModelError(
            f"{self.root} is not laid out with kubo's default import settings (256 KiB chunks, balanced DAG), "
            "which llmarket requires; re-add the file with a plain `ipfs add` (or `--cid-version=1`)"
        )

    def _check_default_layout(self, size: int, leaves: list[Link]) -> None:
        if any(leaf.filesize != CHUNK_SIZE for leaf in leaves[:-1]) or not 0 < leaves[-1].filesize <= CHUNK_SIZE:
            raise self._not_default()
        if any((leaf.cid.codec == CODEC_RAW) != (self.version == 1) for leaf in leaves):
            raise self._not_default()
        rebuilt = FileHasher(self.version)
        for leaf in leaves:
            rebuilt.add_leaf(leaf)
        if rebuilt.cid() != self.root or rebuilt.size != size:
            raise self._not_default()

    def write(self, plan: FilePlan, fd: int, progress: Progress) -> None:
        progress.start(plan.size, f"fetching {str(self.root)[:16]}… from {self.source.name}")
        if plan.inline is not None:
            _write_all(fd, [plan.inline])
            progress.advance(len(plan.inline))
            return
        stream = iter(self.source.cat(self.root))
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmarket-verify") as pool:
                pending: deque[Future] = deque()
                for index, chunk in enumerate(_rechunk(self._metered(stream), plan, self)):
                    if len(pending) == _IN_FLIGHT:
                        pending.popleft().result()  # raises the first bad chunk's error
                    pending.append(pool.submit(self._check_and_write, fd, plan.leaves[index], chunk, progress))
                for future in pending:
                    future.result()
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def _metered(self, stream: Iterator[bytes]) -> Iterator[bytes]:
        while True:
            piece = self.meter.timed(lambda: next(stream, None), lambda p: len(p or b""))
            if piece is None:
                return
            self.received += len(piece)
            yield piece

    def _check_and_write(self, fd: int, leaf: Link, pieces: list[memoryview], progress: Progress) -> None:
        if leaf_link_of_pieces(pieces, leaf.filesize, self.version).cid != leaf.cid:
            raise self.fail(leaf.cid, "its bytes do not hash to its CID")
        _write_all(fd, pieces)
        progress.advance(leaf.filesize)


def _rechunk(stream: Iterator[bytes], plan: FilePlan, fetcher: _Fetcher) -> Iterator[list[memoryview]]:
    """Cut the byte stream at the planned leaf boundaries, as views on what arrived (no copies)."""
    return (pieces for _, pieces in _cut(stream, plan.leaves, plan.size, fetcher))


def _cut(
    stream: Iterator[bytes], leaves: Iterable[Link], size: int, fetcher: _Fetcher
) -> Iterator[tuple[Link, list[memoryview]]]:
    """Each leaf with its bytes cut from the stream; ``leaves`` is read lazily, as the cutting reaches them."""
    pieces: list[memoryview] = []
    have = done = 0
    for leaf in leaves:
        while have < leaf.filesize:
            more = next(stream, None)
            if more is None:
                raise ModelError(
                    f"{fetcher.source.name} ended {fetcher.root} early, after {done + have} of {size} bytes; "
                    "nothing was kept"
                )
            pieces.append(memoryview(more))
            have += len(more)
        excess = have - leaf.filesize
        rest = pieces[-1][len(pieces[-1]) - excess :] if excess else None
        if excess:
            pieces[-1] = pieces[-1][: len(pieces[-1]) - excess]
        yield leaf, pieces
        done += leaf.filesize
        pieces = [rest] if rest is not None else []
        have = excess
    if have or next(stream, None):
        raise ModelError(f"{fetcher.source.name} sent more than the {size} bytes of {fetcher.root}; nothing was kept")


def _write_all(fd: int, pieces: Sequence[bytes | memoryview]) -> None:
    views = [memoryview(p) for p in pieces if len(p)]
    while views:
        written = os.writev(fd, views)
        if written <= 0:
            raise ModelError("could not write to the model cache; is the disk full?")
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


def fetch_verified(
    source: BlockSource, root: CID, fd: int, progress: Progress = NO_PROGRESS, *, pace: Pace = DEFAULT_PACE
) -> int:
    """Write the file ``root`` names into ``fd`` (at its current position), verifying every block.

    Returns:
        The file's size.

    Raises:
        ModelError: the source failed, was slower than ``pace``, sent a block
            that does not hash to its CID, or serves a DAG not laid out with
            kubo's defaults.
    """
    fetcher = _Fetcher(root, source, pace)
    plan = fetcher.plan()
    fetcher.write(plan, fd, progress)
    return plan.size


@dataclass(frozen=True)
class Prefix:
    """The verified head of a file (``fetch_prefix``)."""

    data: bytes  # the file's first bytes, every one verified; whole leaves, so usually more than was needed
    size: int  # the whole file's size
    received: int  # bytes the source delivered (DAG blocks and file bytes), what was read past ``data`` included


def fetch_prefix(
    source: BlockSource,
    root: CID,
    enough: Callable[[bytearray], bool],
    *,
    max_bytes: int,
    pace: Pace = DEFAULT_PACE,
) -> Prefix:
    """The first bytes of the file ``root`` names, verified leaf by leaf, up to what ``enough`` asks for.

    The DAG is walked down its left edge only as far as the bytes read need
    (``_Fetcher.leaves_in_order``), the file's bytes come through the source's
    ``cat``, and each leaf is hashed and compared with its CID before it is
    added. After each leaf, ``enough(prefix)`` is called with all the verified
    bytes so far (the same bytearray, grown: it may keep state between calls);
    once it returns True the ``cat`` is closed (a peer's stream is reset), so a
    source sends little more than the leaves asked for.

    Returns:
        The verified prefix: the whole file if it ends before ``enough`` is satisfied.

    Raises:
        ModelError: the source failed, was slower than ``pace``, sent a block
            that does not hash to its CID, serves a DAG not laid out as kubo's
            default, or ``max_bytes`` were read and ``enough`` still wants more.
            (``enough`` may raise ``ModelError`` itself.)
    """
    fetcher = _Fetcher(root, source, pace)
    prefix = bytearray()
    if root.codec == CODEC_RAW:  # a one-block CIDv1 file
        prefix += fetcher.block(root)
        enough(prefix)
        return Prefix(bytes(prefix), len(prefix), fetcher.received)
    node = fetcher.node(root)
    if not node.links:  # a one-block CIDv0 file
        prefix += node.data
        enough(prefix)
        return Prefix(bytes(prefix), node.filesize, fetcher.received)
    if node.data or len(node.links) > MAX_LINKS or _depth(-(-node.filesize // CHUNK_SIZE)) == 0:
        raise fetcher._not_default()
    stream = iter(source.cat(root))
    try:
        for leaf, pieces in _cut(fetcher._metered(stream), fetcher.leaves_in_order(node), node.filesize, fetcher):
            if leaf_link_of_pieces(pieces, leaf.filesize, fetcher.version).cid != leaf.cid:
                raise fetcher.fail(leaf.cid, "its bytes do not hash to its CID")
            for piece in pieces:
                prefix += piece
            if enough(prefix):
                break
            if len(prefix) >= max_bytes:
                raise ModelError(f"read {len(prefix):,} bytes of {root} and still not enough; gave up")
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return Prefix(bytes(prefix), node.filesize, fetcher.received)
