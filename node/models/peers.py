"""Models between peers over ``/llmarket/model/1.0.0``.

A worker serves every model in its cache. One stream is one request:

- ``BlockRequest(cid)`` → one ``DataChunk`` with the raw block, or ``NotFound``.
  Blocks served are the DAG's root and inner nodes (rebuilt from the cached
  file with the same importer that names it, and kept in memory) and, for a
  file of one chunk, the file's only block.
- ``CatRequest(cid)`` → the file as ``DataChunk``s of 256 KiB, then ``DataEnd``.

``PeerSource`` is the fetching side: a ``BlockSource`` the model store uses
like any other, so everything a peer sends is verified block by block exactly
as bytes from an IPFS daemon are (``node.models.dag``). The store is blocking
and runs in a worker thread; ``PeerSource`` reaches the trio host from there
with ``trio.from_thread``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from node.errors import ModelError, PeerUnreachable, WireError
from node.host import Host, Stream
from node.messages import BlockRequest, CatRequest, DataChunk, DataEnd, NotFound
from node.models.cid import CHUNK_SIZE, CID, FileHasher, dag_pb_node, parse_cid, unixfs_file
from node.models.store import ModelStore
from node.wire import MAX_FRAME, receive, send

log = logging.getLogger("node.models.peers")

MODEL_PROTOCOL = "/llmarket/model/1.0.0"
_READ = 1 << 20


def _blocks_of_file(path, cid: CID) -> dict[CID, bytes]:
    """The root and inner blocks of kubo's DAG for the file at ``path`` (and its only block if it has one)."""
    hasher = FileHasher(cid.version, keep_inner_blocks=True)
    first = b""
    with open(path, "rb") as f:
        while block := f.read(_READ):
            if not first:
                first = block[:CHUNK_SIZE]
            hasher.update(block)
    if hasher.cid() != cid:
        raise ModelError(f"cached file of {cid} no longer hashes to it")
    blocks = dict(hasher.inner_blocks)
    if hasher.size <= CHUNK_SIZE:  # a one-block file: the root is the leaf itself
        blocks[cid] = first if cid.version == 1 else dag_pb_node([], unixfs_file(first, len(first)))
    return blocks


@dataclass
class ModelServer:
    """Serve the models in ``store`` to peers."""

    host: Host
    store: ModelStore
    _blocks: dict[CID, dict[CID, bytes]] = field(default_factory=dict)
    _lock: trio.Lock = field(default_factory=trio.Lock)

    def install(self) -> None:
        self.host.set_handler(MODEL_PROTOCOL, self.handle)

    async def _dag(self, root: CID) -> dict[CID, bytes] | None:
        async with self._lock:  # one rebuild per model, however many peers ask at once
            if root not in self._blocks:
                entry = self.store.get(root)
                if entry is None:
                    return None
                self._blocks[root] = await trio.to_thread.run_sync(_blocks_of_file, entry.path, root)
            return self._blocks[root]

    async def handle(self, stream: Stream) -> None:
        with trio.fail_after(10):
            request = await receive(stream)
        if isinstance(request, BlockRequest):
            await self._block(stream, request)
        elif isinstance(request, CatRequest):
            await self._cat(stream, request)
        else:
            raise WireError(f"{request.TYPE} on {MODEL_PROTOCOL}")
        await stream.close()

    async def _block(self, stream: Stream, request: BlockRequest) -> None:
        wanted = parse_cid(request.cid)
        for root in [c for c in (wanted,) if self.store.get(c)] + list(self._blocks):
            blocks = await self._dag(root)
            if blocks and wanted in blocks:
                await send(stream, DataChunk(blocks[wanted]))
                return
        await send(stream, NotFound(request.cid, "no such block here"))

    async def _cat(self, stream: Stream, request: CatRequest) -> None:
        entry = self.store.get(request.cid)
        if entry is None:
            await send(stream, NotFound(request.cid, "no such model here"))
            return
        sent = 0
        with open(entry.path, "rb") as f:
            while chunk := await trio.to_thread.run_sync(f.read, CHUNK_SIZE):
                await send(stream, DataChunk(chunk))
                sent += len(chunk)
        await send(stream, DataEnd(sent))


class PeerSource:
    """Fetch a model from one peer (``node.models.dag.BlockSource``), from a worker thread."""

    def __init__(self, host: Host, peer_id: str, addrs: list[str] = (), *, timeout_s: float = 30.0) -> None:
        self.host, self.peer_id, self.addrs, self.timeout_s = host, peer_id, list(addrs), timeout_s
        self.name = f"peer {peer_id[:16]}…"

    async def _open(self, request) -> Stream:
        try:
            stream = await self.host.open_stream(self.peer_id, MODEL_PROTOCOL, self.addrs)
        except PeerUnreachable as err:
            raise ModelError(f"{self.name}: {err}") from None
        await send(stream, request)
        return stream

    async def _next(self, stream: Stream):
        try:
            with trio.fail_after(self.timeout_s):
                return await receive(stream, max_frame=MAX_FRAME)
        except trio.TooSlowError:
            raise ModelError(f"{self.name} sent nothing for {self.timeout_s:.0f}s") from None
        except (EOFError, ConnectionError, WireError) as err:
            raise ModelError(f"{self.name} broke off the transfer ({err})") from None

    async def _get_block(self, cid: CID) -> bytes:
        stream = await self._open(BlockRequest(str(cid)))
        try:
            reply = await self._next(stream)
        finally:
            await stream.close()
        if isinstance(reply, NotFound):
            raise ModelError(f"{self.name} does not have block {cid}")
        if not isinstance(reply, DataChunk):
            raise ModelError(f"{self.name} answered a block request with {reply.TYPE}")
        return reply.data

    def get_block(self, cid: CID) -> bytes:
        return trio.from_thread.run(self._get_block, cid)

    def cat(self, cid: CID) -> Iterator[bytes]:
        stream = trio.from_thread.run(self._open, CatRequest(str(cid)))
        finished = False
        try:
            while True:
                msg = trio.from_thread.run(self._next, stream)
                if isinstance(msg, DataEnd):
                    finished = True
                    return
                if isinstance(msg, NotFound):
                    raise ModelError(f"{self.name} does not have {cid}")
                if not isinstance(msg, DataChunk):
                    raise ModelError(f"{self.name} sent {msg.TYPE} inside a file")
                yield msg.data
        finally:  # a transfer we stop early (a bad chunk, say) is reset, not drained
            trio.from_thread.run(stream.close if finished else stream.reset)
