"""The Kademlia DHT on a host (``DhtService``): find a peer's current addresses, and providers of a CID.

py-libp2p's ``KadDHT``, in server mode on public and bootstrap nodes and
client mode otherwise; ``find_peer`` returns a peer's current addresses,
``provide``/``find_providers`` keep provider records keyed by a model's CID.
``node.net.network.Network`` runs it and feeds it new connections
(``peer_connected``).

DHT, and py-libp2p's quirks
---------------------------
- **The routing table is not fed on connect** in py-libp2p 0.8.1: peers land
  in it only when they query us, when we query them, or through a lookup. So
  a network notifee here sees each new connection, waits (up to
  ``IDENTIFY_WAIT_S``) for identify to report the peer's protocols, and adds
  it if it serves ``/ipfs/kad/1.0.0`` (a DHT server). When a server's table
  gets its first peer, one routing-table refresh (a lookup of our own id)
  runs, so the servers closest to it learn of it. Clients skip that: it
  would dial some 20 servers a requester never needs.
- **A querying peer enters the server's table** in py-libp2p, as if it were
  a server, so servers would hand out clients that cannot answer. Here the
  handler's ``add_peer`` is replaced: a querier is added only once identify
  lists the KAD protocol for it (``_admit`` adds it later otherwise). Peers
  named in other servers' answers are still added by py-libp2p's own lookups
  without that check; a client among them stays until a query to it fails.
- **The KAD handler is registered through ``Host.set_handler``** (replacing
  the one ``KadDHT`` registers itself), so it runs inside the host's guard
  (no exception escapes into py-libp2p, per-peer stream limit). A peer may
  hold ``KAD_STREAMS_PER_PEER`` KAD streams at once, each for at most
  ``KAD_STREAM_S``: py-libp2p's handler waits for the next message without a
  deadline, and 12 idle streams from anyone would take all of its slots. Its
  stream reads ``b""`` at the end (``_EndAsEmpty``): py-libp2p's handler
  expects that, gets ``StreamEOF``, and would log a warning per stream.
- **``KadDHT.find_peer`` answers from the local peerstore first**, and the
  peerstore already holds the addresses a requester just failed to dial (from
  the offer), so asking it after a failed dial returns the same dead
  addresses. ``find_peer`` here always asks the network: an iterative
  FIND_NODE lookup (``_lookup``: the closest known DHT servers first,
  ``ALPHA`` = 10 at a time, over ``Host.open_stream``, so the host's dial and
  stream deadlines apply) that returns the addresses other peers report for
  the target. py-libp2p's FIND_NODE handler includes the target whenever it
  knows its addresses, so a client-mode peer connected to a server is found.
- **Provider records are keyed by the CID's multihash** (``_encode_key`` in
  ``libp2p.kad_dht``: a CID string is parsed and its multihash used; any other
  string falls back to hex, then to its UTF-8 bytes). CIDv0 ``Qm…`` and CIDv1
  dag-pb ``bafy…`` of the same root therefore share records; a CIDv1 with raw
  leaves has another root (another multihash) and other records. ``provide``
  here refuses strings that are not CIDs, and is py-libp2p's: ADD_PROVIDER,
  fire and forget, to the closest peers its own lookup finds, with the
  addresses ``host.get_addrs()`` gives (the host's address factory).
  py-libp2p's ``find_providers`` files what it finds in the local store and
  from then on answers from the local store alone, for the records' 48 hours;
  ``find_providers`` here is a GET_PROVIDERS lookup (``_lookup`` again) that
  files nothing, merged with the records this node holds as a server. A
  server keeps at most 20 providers per key and ignores later ones until
  records expire (48 h), so 20 fresh peer ids can crowd out a model's real
  providers there.
- **The protocol is always ``/ipfs/kad/1.0.0``**: ``KadDHT`` takes a
  ``protocol_prefix`` but its queries and handler use the constant, so an
  llmarket DHT cannot have a protocol id of its own. It stays an llmarket DHT
  because llmarket nodes connect only to llmarket peers.
- KadDHT refreshes its routing table at start and every 10 minutes and
  republishes provider records every 22 hours; its own queries dial through
  py-libp2p directly, bounded by its 10 s query timeout. They also try
  connected client-mode peers when the table is small, which py-libp2p logs
  as warnings ("Failed to open stream … protocols not supported").
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import multiaddr
import trio
import varint
from libp2p.bitswap.cid import parse_cid
from libp2p.kad_dht.common import ALPHA, BUCKET_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT, _encode_key
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from node.errors import ConfigError, ModelError, NodeError
from node.net.addresses import MAX_ADDRS, dialable
from node.net.host import Host, Stream
from node.net.identity import valid_peer_id

log = logging.getLogger(__name__)

KAD_PROTOCOL = str(KAD_PROTOCOL_ID)

#: How long a new connection's peer gets to report its protocols (identify) before the DHT ignores it.
IDENTIFY_WAIT_S = 5.0
#: KAD streams one peer may hold open at once, and how long one may last.
KAD_STREAMS_PER_PEER = 4
KAD_STREAM_S = 30.0
#: The largest FIND_NODE answer read (20 peers with a few addresses and signed records take a few KiB).
MAX_KAD_REPLY = 256 * 1024
#: Rounds of an iterative FIND_NODE lookup (each asks up to ALPHA peers).
MAX_LOOKUP_ROUNDS = 10

DHT_MODES = ("client", "server")


class DhtService:
    """py-libp2p's KadDHT on one host: routing-table feeding, ``find_peer``, provider records."""

    def __init__(self, host: Host, mode: str = "client", *, query_timeout_s: float = 5.0) -> None:
        if mode not in DHT_MODES:
            raise ConfigError(f"DHT mode {mode!r} is not one of {', '.join(DHT_MODES)}")
        self.host = host
        self.mode = mode
        self.query_timeout_s = query_timeout_s
        self.dht = KadDHT(host.libp2p, DHTMode.SERVER if mode == "server" else DHTMode.CLIENT)
        if mode == "server":  # replaces the handler KadDHT registered itself (see the module docstring)
            host.set_handler(KAD_PROTOCOL, self._serve)
        self.dht.add_peer = self._add_querier  # what KadDHT's handler calls for every peer that asks it
        self._kad_streams: dict[str, int] = {}
        self._feed_send, self._feed_recv = trio.open_memory_channel[ID](1024)
        self._refreshed = False
        self.lookups = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dht), trio.open_nursery() as nursery:
            nursery.start_soon(self._feeder, nursery)
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------ the routing table

    def peer_connected(self, peer: ID) -> None:
        try:
            self._feed_send.send_nowait(peer)
        except trio.WouldBlock:  # a flood of connections: the table fills from lookups instead
            pass

    async def _feeder(self, nursery: trio.Nursery) -> None:
        async for peer in self._feed_recv:
            nursery.start_soon(self._admit, peer)

    async def _admit(self, peer: ID) -> None:
        """Add a newly connected peer to the routing table once identify says it is a DHT server."""
        if not await self._serves_kad(peer, wait_s=IDENTIFY_WAIT_S):
            return
        table = self.dht.routing_table
        was_empty = table.size() == 0
        try:
            added = await table.add_peer(peer)
        except Exception as err:  # py-libp2p's table: a full bucket pings, a missing address raises
            log.debug("DHT: could not add %s… to the routing table: %s", peer.to_base58()[:12], err)
            return
        if added and was_empty and self.mode == "server" and not self._refreshed:
            # a server's first peer: look ourselves up, so the servers closest to us learn of us (once)
            self._refreshed = True
            with trio.move_on_after(30):
                try:
                    await self.dht.refresh_routing_table()
                except Exception as err:
                    log.debug("DHT: routing-table refresh failed: %s", err)

    async def _serves_kad(self, peer: ID, *, wait_s: float = 0.0) -> bool:
        """Whether identify reported ``/ipfs/kad/1.0.0`` for ``peer``, waiting up to ``wait_s`` for identify."""
        deadline = trio.current_time() + wait_s
        while (serves := self._kad_known(peer)) is None and trio.current_time() < deadline:
            await trio.sleep(0.05)
        return bool(serves)

    def _kad_known(self, peer: ID) -> bool | None:
        """True if identify listed the KAD protocol for ``peer``, False if it did not, None before identify."""
        try:
            if KAD_PROTOCOL in self.host.libp2p.get_peerstore().get_protocols(peer):
                return True
        except Exception:  # PeerStoreError: not known (yet)
            pass
        identified = getattr(self.host.libp2p, "_identified_peers", None)  # py-libp2p 0.8.1's record of identify
        if identified is None or peer in identified:
            return False
        return None

    async def _add_querier(self, peer: ID, *, skip_server_mode_check: bool = False) -> bool:
        """Add a peer that sent us a KAD request only if identify says it is a DHT server (``_admit`` waits)."""
        if self._kad_known(peer):
            return await self.dht.routing_table.add_peer(peer)
        return False

    async def _serve(self, stream: Stream) -> None:
        """The KAD handler, inside the host's guard, with per-peer and duration limits."""
        peer = stream.peer_id
        if self._kad_streams.get(peer, 0) >= KAD_STREAMS_PER_PEER:
            await stream.reset()
            return
        self._kad_streams[peer] = self._kad_streams.get(peer, 0) + 1
        try:
            with trio.move_on_after(KAD_STREAM_S) as scope:
                await self.dht.handle_stream(_EndAsEmpty(stream.raw))
            if scope.cancelled_caught:
                await stream.reset()
        finally:
            self._kad_streams[peer] -= 1
            if not self._kad_streams[peer]:
                del self._kad_streams[peer]

    # ------------------------------------------------------------ peer routing

    async def find_peer(self, peer_id: str, timeout_s: float = 10.0) -> list[str]:
        """The addresses (without ``/p2p``) other peers report for ``peer_id``; ``[]`` if none within the time.

        Always asks the network, never our own peerstore (which holds what we
        knew already): an iterative FIND_NODE lookup from the closest known DHT
        servers that ends with the first round of answers naming the peer.
        """
        if not valid_peer_id(peer_id):
            return []
        target = ID.from_base58(peer_id)
        self.lookups += 1
        found: dict[str, None] = {}

        def note(reply: Message) -> bool:
            for entry in reply.closerPeers:
                if entry.id == target.to_bytes():
                    found.update(dict.fromkeys(_dialable_all(_multiaddr_text(b) for b in entry.addrs)))
            return bool(found)

        with trio.move_on_after(timeout_s):
            await self._lookup(Message.MessageType.FIND_NODE, target.to_bytes(), note, skip=target)
        return list(found)[:MAX_ADDRS]

    async def _lookup(self, kind: int, key: bytes, note: Callable[[Message], bool], *, skip: ID | None = None) -> None:
        """An iterative Kademlia lookup of ``key``: ask the closest peers known, ``ALPHA`` at a time.

        Starts from the routing table and the connected DHT servers; every
        answer's closer peers join the candidates. ``note`` sees each answer
        and returns True when the caller has what it wants, which ends the
        lookup after that round; so does having asked the ``BUCKET_SIZE``
        closest peers known, or ``MAX_LOOKUP_ROUNDS`` rounds.
        """
        me = self.host.libp2p.get_id()
        store = self.host.libp2p.get_peerstore()
        known: dict[ID, list[str]] = {}  # candidate → addresses to dial it by
        for peer in self.dht.routing_table.find_local_closest_peers(key, BUCKET_SIZE):
            known[peer] = _dialable_all(str(a) for a in _addrs_of(store, peer))
        for peer in self.host.libp2p.get_connected_peers():  # unless identify said they are clients
            if peer not in known and self._kad_known(peer) is not False:
                known[peer] = []
        asked: set[ID] = set()
        done = False

        async def ask(peer: ID) -> None:
            nonlocal done
            reply = await self._query(peer, known[peer], kind, key)
            if reply is None:
                return
            if note(reply):
                done = True
            for entry in reply.closerPeers[:BUCKET_SIZE]:
                pid = _peer_of(entry.id)
                if pid is not None and pid != me and pid not in known and len(known) < BUCKET_SIZE * MAX_LOOKUP_ROUNDS:
                    known[pid] = _dialable_all(_multiaddr_text(b) for b in entry.addrs)

        for _ in range(MAX_LOOKUP_ROUNDS):
            closest = [p for p in sort_peer_ids_by_distance(key, list(known)) if p not in (me, skip)][:BUCKET_SIZE]
            batch = [p for p in closest if p not in asked][:ALPHA]
            if not batch:
                return
            async with trio.open_nursery() as nursery:
                for peer in batch:
                    asked.add(peer)
                    nursery.start_soon(ask, peer)
            if done:
                return

    async def _query(self, peer: ID, addrs: list[str], kind: int, key: bytes) -> Message | None:
        """Ask ``peer`` (dialling ``addrs`` if not connected) one KAD question; None on any failure."""
        request = Message(type=kind, key=key).SerializeToString()
        try:
            stream = await self.host.open_stream(peer.to_base58(), KAD_PROTOCOL, addrs)
        except NodeError as err:
            log.debug("DHT: could not ask %s…: %s", peer.to_base58()[:12], err)
            return None
        answered = False
        try:
            with trio.fail_after(self.query_timeout_s):
                await stream.write(varint.encode(len(request)) + request)
                data = await _read_frame(stream, MAX_KAD_REPLY)
            reply = Message()
            reply.ParseFromString(data)
            answered = reply.type == kind
        except Exception as err:  # silence, a broken stream, a bad frame or protobuf
            log.debug("DHT: %s… gave no answer: %s", peer.to_base58()[:12], err.__class__.__name__)
        finally:
            if answered:
                await stream.close()
            else:
                await stream.reset()
        return reply if answered else None

    # -------------------------------------------------------- provider records

    async def provide(self, cid: str, timeout_s: float = 30.0) -> bool:
        """Tell the DHT servers closest to ``cid`` that we provide it; whether any took the record in time.

        py-libp2p's ``provide``: it also files our own record locally and
        republishes it every 22 hours while the DHT runs.
        """
        key = _cid_key(cid)
        with trio.move_on_after(timeout_s):
            return await self.dht.provider_store.provide(key)
        return False

    async def find_providers(
        self, cid: str, timeout_s: float = 10.0, count: int = BUCKET_SIZE
    ) -> list[tuple[str, list[str]]]:
        """Peers that provide ``cid``: (peer id, dialable addresses without ``/p2p``), ourselves left out.

        The records this node holds (as a DHT server) plus a GET_PROVIDERS
        lookup, which ends once ``count`` providers are known. Found records
        are not filed locally (py-libp2p's own ``find_providers`` would, and
        then answer from them alone for 48 hours).
        """
        key = _cid_key(cid)
        me = self.host.libp2p.get_id()
        found: dict[str, list[str]] = {}

        def add(peer: ID, addrs: list[str]) -> None:
            if peer != me and addrs and len(found) < count:
                found.setdefault(peer.to_base58(), addrs)

        for info in self.dht.provider_store.get_providers(key):
            add(info.peer_id, _dialable_all(str(a) for a in info.addrs))

        def note(reply: Message) -> bool:
            for entry in reply.providerPeers[:BUCKET_SIZE]:
                if (peer := _peer_of(entry.id)) is not None:
                    add(peer, _dialable_all(_multiaddr_text(b) for b in entry.addrs))
            return len(found) >= count

        self.lookups += 1
        with trio.move_on_after(timeout_s):
            await self._lookup(Message.MessageType.GET_PROVIDERS, key, note)
        return list(found.items())

    def status(self) -> dict:
        return {
            "mode": self.mode,
            "routing_table": self.dht.get_routing_table_size(),
            "provider_records": self.dht.provider_store.size(),
            "lookups": self.lookups,
        }


class _EndAsEmpty:
    """A raw stream whose ``read`` returns ``b""`` at the end (py-libp2p raises ``StreamEOF``).

    py-libp2p's KAD handler treats ``b""`` as the clean end of a stream, but
    its streams raise ``StreamEOF``, which it logs as a warning on every stream
    a client closes.
    """

    def __init__(self, raw) -> None:
        self._raw = raw

    def __getattr__(self, name: str):
        return getattr(self._raw, name)

    async def read(self, n: int | None = None) -> bytes:
        try:
            return await self._raw.read(n)
        except StreamEOF:
            return b""


def _cid_key(cid: str) -> bytes:
    """The DHT key of a CID: its multihash (as py-libp2p keys provider records)."""
    try:
        parse_cid(cid)
    except Exception:  # py-cid raises several types
        raise ModelError(f"{cid!r} is not a CID; give the model's CID (Qm… or bafy…)") from None
    return _encode_key(cid)


def _peer_of(raw: bytes) -> ID | None:
    """The peer id in a KAD answer's ``id`` field, or None if it is not one."""
    try:
        peer = ID(raw)
    except Exception:
        return None
    return peer if valid_peer_id(peer.to_base58()) else None


def _addrs_of(store, peer: ID) -> list:
    try:
        return store.addrs(peer)
    except Exception:  # PeerStoreError: no addresses
        return []


def _multiaddr_text(raw: bytes) -> str:
    try:
        return str(multiaddr.Multiaddr(raw))
    except Exception:
        return ""


def _dialable_all(addrs) -> list[str]:
    return list(dict.fromkeys(a for a in map(dialable, addrs) if a is not None))[:MAX_ADDRS]


async def _read_frame(stream: Stream, limit: int) -> bytes:
    """One varint-length-prefixed message from ``stream``."""
    length, shift = 0, 0
    while True:
        byte = await stream.read(1)
        if not byte:
            raise EOFError("stream ended before a length")
        length |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
        shift += 7
        if shift > 28:
            raise ValueError("length varint too long")
    if length > limit:
        raise ValueError(f"message of {length} bytes is over {limit}")
    data = b""
    while len(data) < length:
        chunk = await stream.read(length - len(data))
        if not chunk:
            raise EOFError("stream ended inside a message")
        data += chunk
    return data
