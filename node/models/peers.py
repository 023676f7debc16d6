"""Models between peers over ``/llmarket/model/1.0.0``.

A worker serves every model in its cache. One stream is one request:

- ``BlockRequest(cid)`` → one ``DataChunk`` with the raw block, or ``NotFound``.
  Blocks served are the DAG's root and inner nodes (rebuilt from the cached
  file with the same importer that names it, and kept in memory) and, for a
  file of one chunk, the file's only block.
- ``CatRequest(cid)`` → the file as ``DataChunk``s of 256 KiB, then ``DataEnd``.
- Anything else (a frame over ``MAX_REQUEST_FRAME`` bytes, another message, a
  CID that does not parse) → ``NotFound`` whose ``detail`` says what was wrong.

**Hostile peers.** Anyone who can dial a worker can speak this protocol, so
the server bounds the request before it does any work: the request frame may
hold at most ``MAX_REQUEST_FRAME`` bytes (a request is one CID, about 80
bytes) and the CID at most ``MAX_CID_CHARS`` characters (``node.models.cid``).
Hashing a model to rebuild its DAG and reading the file run in worker threads,
never on the event loop. After its answer, the server *resets* the stream
rather than only closing it: a closed stream's read side stays open in
py-libp2p's yamux, which keeps buffering whatever the peer pushes into it
(900 MiB in one test), and nothing would ever read it. The fetching side resets
its streams for the same reason once it has what it asked for.

``PeerSource`` is the fetching side: a ``BlockSource`` the model store uses
like any other, so everything a peer sends is verified block by block exactly
as bytes from an IPFS daemon are (``node.models.dag``), and a peer that is too
slow is dropped for the next source there. The store is blocking and runs in
a worker thread; ``PeerSource`` reaches the trio host from there with
``trio.from_thread``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from node.errors import ModelError, PeerUnreachable, WireError
from node.models.cid import CHUNK_SIZE, CID, MAX_CID_CHARS, FileHasher, dag_pb_node, parse_cid, unixfs_file
from node.models.store import ModelStore, StoredModel
from node.net.host import Host, Stream
from node.net.network import Network
from node.protocol.messages import BlockRequest, CatRequest, DataChunk, DataEnd, NotFound
from node.protocol.wire import MAX_FRAME, receive, send

log = logging.getLogger(__name__)

MODEL_PROTOCOL = "/llmarket/model/1.0.0"
#: The largest request frame a server reads. A request is one CID: about 80 bytes.
MAX_REQUEST_FRAME = 1024
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
    request_timeout_s: float = 10.0  # for the request to arrive, once the stream is open
    _blocks: dict[CID, dict[CID, bytes]] = field(default_factory=dict)
    _lock: trio.Lock = field(default_factory=trio.Lock)

    def install(self) -> None:
        self.host.set_handler(MODEL_PROTOCOL, self.handle)

    async def _cached(self, cid: CID) -> StoredModel | None:
        return await trio.to_thread.run_sync(self.store.get, cid)  # it reads the entry's meta.json

    async def _dag(self, root: CID) -> dict[CID, bytes] | None:
        async with self._lock:  # one rebuild per model, however many peers ask at once
            if root not in self._blocks:
                entry = await self._cached(root)
                if entry is None:
                    return None
                self._blocks[root] = await trio.to_thread.run_sync(_blocks_of_file, entry.path, root)
            return self._blocks[root]

    async def handle(self, stream: Stream) -> None:
        """Answer one request, then end the stream with a FIN and a reset, whatever happened.

        The reset drops our side of the stream, so nothing the peer sends
        afterwards is kept. The FIN goes first because py-libp2p's reader
        discards data still unread when a reset arrives, unless the stream was
        ended before it: an honest peer still reads the whole answer.
        """
        try:
            await self._answer(stream)
        finally:
            await stream.close_write()
            await stream.reset()

    async def _answer(self, stream: Stream) -> None:
        peer = stream.peer_id[:12]
        try:
            with trio.fail_after(self.request_timeout_s):
                request = await receive(stream, max_frame=MAX_REQUEST_FRAME)
        except trio.TooSlowError:
            log.debug("peer %s… sent no model request within %gs", peer, self.request_timeout_s)
            return
        except WireError as err:
            await self._refuse(stream, "", f"bad request: {err}")
            return
        if not isinstance(request, (BlockRequest, CatRequest)):
            await self._refuse(stream, "", f"bad request: {request.TYPE} is not a request on {MODEL_PROTOCOL}")
            return
        try:
            cid = parse_cid(request.cid)  # bounded: microseconds (node.models.cid)
        except ModelError as err:
            await self._refuse(stream, request.cid[:MAX_CID_CHARS], str(err))
            return
        if isinstance(request, BlockRequest):
            await self._block(stream, cid)
        else:
            await self._cat(stream, cid)

    async def _refuse(self, stream: Stream, cid: str, detail: str) -> None:
        log.debug("peer %s…: refused a model request: %s", stream.peer_id[:12], detail)
        await send(stream, NotFound(cid, detail))

    async def _block(self, stream: Stream, wanted: CID) -> None:
        roots = ([wanted] if await self._cached(wanted) else []) + list(self._blocks)
        for root in roots:
            blocks = await self._dag(root)
            if blocks and wanted in blocks:
                await send(stream, DataChunk(blocks[wanted]))
                return
        await send(stream, NotFound(str(wanted), "no such block here"))

    async def _cat(self, stream: Stream, cid: CID) -> None:
        entry = await self._cached(cid)
        if entry is None:
            await send(stream, NotFound(str(cid), "no such model here"))
            return
        sent = 0
        async with await trio.open_file(entry.path, "rb") as f:  # reads in a worker thread
            while chunk := await f.read(CHUNK_SIZE):
                await send(stream, DataChunk(chunk))
                sent += len(chunk)
        await send(stream, DataEnd(sent))


class PeerSource:
    """Fetch a model from one peer (``node.models.dag.BlockSource``), from a worker thread.

    Args:
        timeout_s: how long any one message may take to arrive. A peer that is
            slow without ever being silent that long is caught by the store's
            minimum rate (``node.models.dag.Pace``).
    """

    def __init__(
        self,
        host: Network,
        peer_id: str,
        addrs: list[str] = (),
        *,
        timeout_s: float = 30.0,
        direct_wait_s: float = 60.0,
    ) -> None:
        self.host, self.peer_id, self.addrs, self.timeout_s = host, peer_id, list(addrs), timeout_s
        self.direct_wait_s = direct_wait_s
        self.name = f"peer {peer_id[:16]}…"
        self._waited = False

    async def _prefer_direct(self) -> None:
        """Once: over a relayed connection, wait up to ``direct_wait_s`` for DCUtR's direct one.

        A model is gigabytes and a relay moves them slowly, at its operator's
        expense; the relay would not cut the transfer (``node.net.nat``), so without a
        direct connection the fetch goes on through it.
        """
        if self._waited:
            return
        self._waited = True
        if self.addrs:
            await self.host.dial(self.peer_id, self.addrs)
        if self.host.connection_kind(self.peer_id) == "relayed":
            log.info(
                "%s is reached through a relay; waiting up to %gs for a direct connection",
                self.name,
                self.direct_wait_s,
            )
            if not await self.host.wait_direct(self.peer_id, self.direct_wait_s):
                log.info("no direct connection to %s; fetching through the relay", self.name)

    async def _open(self, request) -> Stream:
        try:
            await self._prefer_direct()
            stream = await self.host.open_stream(self.peer_id, MODEL_PROTOCOL, self.addrs)
        except PeerUnreachable as err:
            raise ModelError(f"{self.name}: {err}") from None
        try:
            await send(stream, request)
        except ConnectionError as err:
            await stream.reset()
            raise ModelError(f"{self.name} broke off the request ({err})") from None
        return stream

    async def _next(self, stream: Stream):
        try:
            with trio.fail_after(self.timeout_s):
                return await receive(stream, max_frame=MAX_FRAME)
        except trio.TooSlowError:
            raise ModelError(f"{self.name} sent nothing for {self.timeout_s:g}s") from None
        except (EOFError, ConnectionError, WireError) as err:
            raise ModelError(f"{self.name} broke off the transfer ({err})") from None

    async def _get_block(self, cid: CID) -> bytes:
        stream = await self._open(BlockRequest(str(cid)))
        try:
            reply = await self._next(stream)
        finally:
            await stream.reset()  # one answer is all we read
        if isinstance(reply, NotFound):
            raise ModelError(f"{self.name} does not have block {cid}")
        if not isinstance(reply, DataChunk):
            raise ModelError(f"{self.name} answered a block request with {reply.TYPE}")
        return reply.data

    def get_block(self, cid: CID) -> bytes:
        return trio.from_thread.run(self._get_block, cid)

    def cat(self, cid: CID) -> Iterator[bytes]:
        stream = trio.from_thread.run(self._open, CatRequest(str(cid)))
        try:
            while True:
                msg = trio.from_thread.run(self._next, stream)
                if isinstance(msg, DataEnd):
                    return
                if isinstance(msg, NotFound):
                    raise ModelError(f"{self.name} does not have {cid}")
                if not isinstance(msg, DataChunk):
                    raise ModelError(f"{self.name} sent {msg.TYPE} inside a file")
                yield msg.data
        finally:  # finished or stopped early (a bad chunk, too slow), nothing more is read: reset, never drain
            trio.from_thread.run(stream.reset)
