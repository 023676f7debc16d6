"""A libp2p host with the safety rails py-libp2p 0.8.1 does not have by default.

- **Noise only.** py-libp2p also accepts plaintext (and TLS, secio) unless told
  otherwise, and plaintext lets a peer claim any peer id.
- **yamux, one connection per peer** (which also skips a 250 ms dial delay).
- **Guards** (``node.net.guards``): every stream handler runs inside a guard,
  py-libp2p's own too (a peer's fault is one debug line, a bug its traceback; at most
  ``max_inbound_streams_per_peer`` open streams per peer); limits on inbound
  connections per IP and in all (``InboundGuard``, in place of py-libp2p's
  resource manager); yamux flow control enforced (``GuardedYamux``).
- **Deadlines** on connect and on opening streams: a listener that accepts TCP
  but never speaks would otherwise hold a dial for minutes.
- **GossipSub** for offers, with signed messages and a 1 s heartbeat; the mesh
  degree and the per-peer rate limit come from ``HostConfig``, and a topic may
  have its own rate limit (``set_topic_rate_limit``: py-libp2p has one for all).
- **Connection watermarks** from ``HostConfig`` (py-libp2p's 100/200 made
  every small market fully connected).
- **Addresses others can dial** (``node.net.addresses``): wildcards expanded,
  ``announce`` honoured; ``dial`` tries every address of a peer, best first and
  staggered, and names each failure; when all fail, ``open_stream`` asks
  ``find_peer`` where the peer is now.

A plain ``Host`` has no NAT traversal and no discovery: ``observed_addrs``,
``circuit_addrs`` and ``find_peer`` answer nothing and ``dial_circuit``
refuses. ``node.net.network.Network``, the host a node runs, fills them in
with AutoNAT, circuit relay v2, DCUtR, mDNS and the DHT.

``Host.run`` follows the trio start protocol: ``await nursery.start(host.run)``
returns once the host listens, is connected to its bootstrap peers (those that
answer) and its pubsub runs.
"""

from __future__ import annotations

import bisect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.tools.anyio_service import background_trio_service

from node.errors import NodeError, PeerUnreachable
from node.net import addresses
from node.net.config import HostConfig
from node.net.conns import ConnectionKind, connection_kind
from node.net.guards import InboundGuard, StreamLimit, adopt_yamux, guard_every_handler, guarded, guarded_yamux
from node.net.identity import Identity

log = logging.getLogger(__name__)


class Stream:
    """A libp2p stream with the plain ``read``/``write`` that ``node.protocol.wire`` expects.

    ``read`` returns ``b""`` at end of stream (py-libp2p raises ``StreamEOF``),
    and every stream error becomes ``EOFError`` or ``ConnectionError``.
    """

    def __init__(self, raw) -> None:
        self.raw = raw
        self.peer_id: str = raw.muxed_conn.peer_id.to_base58()

    async def read(self, n: int) -> bytes:
        try:
            return await self.raw.read(n)
        except StreamEOF:
            return b""
        except StreamError as err:
            raise ConnectionError(f"stream from {self.peer_id[:12]}… broke: {err.__class__.__name__}") from None

    async def write(self, data: bytes) -> None:
        """Write all of ``data``; a cancellation waits for the write to finish (up to 30 s).

        py-libp2p's yamux writes a frame in several steps; a write cancelled half-way
        leaves a partial frame on the shared connection and breaks every stream on
        it. So writes are shielded from cancellation; a peer that stops reading
        for 30 s gets its stream reset instead.
        """
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(30):
                    await self.raw.write(data)
            except StreamError as err:
                raise ConnectionError(f"stream to {self.peer_id[:12]}… broke: {err.__class__.__name__}") from None
            except trio.TooSlowError:
                await self.reset()
                raise ConnectionError(f"peer {self.peer_id[:12]}… stopped reading for 30 s") from None
        await trio.lowlevel.checkpoint_if_cancelled()

    async def close_write(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):  # a close is a frame too
            try:
                await self.raw.close_write()
            except StreamError:
                pass

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await self.raw.close()
            except StreamError:
                pass

    async def reset(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.raw.reset()
            except Exception:  # a reset of a dead stream may fail in several ways; it is dead either way
                pass


Handler = Callable[[Stream], Awaitable[None]]


class TopicRateGossipSub(GossipSub):
    """py-libp2p's GossipSub with a rate limit per topic (``topic_rate_limits``) where one is set.

    py-libp2p drops (does not forward, and penalises its sender for) a message once a
    peer has forwarded ``max_messages_per_topic_per_second`` on its topic within the
    last second, the same number for every topic. The offers topic needs far more
    (node/market/offers.py, ``GOSSIP_RATE_LIMIT``) than a default that suits rare messages.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.topic_rate_limits: dict[str, float] = {}

    def _check_spam_protection(self, peer_id: ID, msg) -> bool:
        if not self.spam_protection_enabled:
            return True
        now = time.time()
        for topic in msg.topicIDs:
            limit = self.topic_rate_limits.get(topic, self.max_messages_per_topic_per_second)
            timestamps = self.message_rate_limits[peer_id][topic]  # appended in time order
            del timestamps[: bisect.bisect_right(timestamps, now - 1.0)]
            if len(timestamps) >= limit:
                log.debug("%s… forwards more than %g messages a second on %s", str(peer_id)[:12], limit, topic)
                if self.scorer is not None:
                    self.scorer.penalize_behavior(peer_id, 5.0)
                return False
            timestamps.append(now)
        return True


class GuardedPubsub(Pubsub):
    """py-libp2p's Pubsub, for which a peer's stream that fails in a way it does not expect (a malformed
    RPC raises protobuf's ``DecodeError``) is a dead peer, as a broken stream is: the guard around every
    handler (``guard_every_handler``) logs it and resets the stream."""

    async def stream_handler(self, stream) -> None:
        try:
            await super().stream_handler(stream)
        except Exception:
            self._handle_dead_peer(stream.muxed_conn.peer_id)
            raise


@dataclass
class Host:
    """One node's libp2p presence: streams by protocol, and GossipSub."""

    identity: Identity
    config: HostConfig = field(default_factory=HostConfig)

    def __post_init__(self) -> None:
        key_pair = self.identity.key_pair
        self.yamux = guarded_yamux(self.config)
        self.libp2p = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
            muxer_opt={YAMUX_PROTOCOL_ID: self.yamux},
            connection_config=ConnectionConfig(
                max_connections_per_peer=1,
                min_connections=self.config.min_connections,
                low_watermark=self.config.low_watermark,
                high_watermark=self.config.high_watermark,
                max_connections=self.config.max_connections,
            ),
            listen_addrs=[multiaddr.Multiaddr(a) for a in self.config.listen],
            addrs_factory=self._direct_multiaddrs,  # what identify tells peers, too
        )
        # off with py-libp2p's default resource manager (node.net.guards): InboundGuard, the
        # stream limit per peer and GuardedYamux take its place
        swarm = self.libp2p.get_network()
        swarm.set_resource_manager(None)
        self.inbound = InboundGuard(self.config, swarm)
        self.inbound.install()
        adopt_yamux(swarm, self.yamux)
        self.streams = StreamLimit(self.config.max_inbound_streams_per_peer)
        self.gossipsub = TopicRateGossipSub(
            protocols=[GOSSIPSUB_V11, GOSSIPSUB_V10],
            degree=self.config.gossip_degree,
            degree_low=self.config.gossip_degree_low,
            degree_high=self.config.gossip_degree_high,
            heartbeat_interval=self.config.gossip_heartbeat_s,
            max_messages_per_topic_per_second=self.config.gossip_rate_limit,
        )
        guard_every_handler(self.libp2p)  # before Pubsub registers its handlers
        self.pubsub = GuardedPubsub(self.libp2p, self.gossipsub, strict_signing=True)
        self.ready = trio.Event()

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def listening(self) -> list[str]:
        """The bound transport addresses (a wildcard listen address stays a wildcard here)."""
        return [str(a) for a in self.libp2p.get_transport_addrs()]

    def advertised(self) -> list[str]:
        """The addresses to put in offers, best first, without ``/p2p/<peer id>`` (``node.net.addresses``).

        The direct ones (listen addresses on every interface, or ``announce``), then
        the addresses AutoNAT confirmed, then relay addresses while we hold reservations.
        """
        return addresses.advertised(
            self.listening(),
            announce=self.config.announce,
            observed=self.observed_addrs(),
            circuits=self.circuit_addrs(),
        )

    def _direct_multiaddrs(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """py-libp2p's address factory: identify tells peers these (relay addresses travel in offers only)."""
        if not hasattr(self, "libp2p"):  # called once while new_host builds the host
            return candidates
        return [multiaddr.Multiaddr(a) for a in self.advertised() if not addresses.is_circuit(a)]

    def addrs(self) -> list[str]:
        """The full multiaddrs others dial (``…/p2p/<peer id>``)."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.advertised()]

    # ------------------------------------------- what node.net.network.Network adds

    def observed_addrs(self) -> list[str]:
        """Addresses AutoNAT confirmed beyond the listen addresses; a plain host has none."""
        return []

    def circuit_addrs(self) -> list[str]:
        """Relay addresses of the reservations held; a plain host holds none."""
        return []

    async def dial_circuit(self, addr: str) -> None:
        """Connect through a relay (``…/p2p-circuit/p2p/<peer>``); a plain host cannot."""
        raise PeerUnreachable(f"{addr} is a relay address, and this host does not dial through relays")

    async def find_peer(self, peer_id: str, timeout_s: float = 10.0) -> list[str]:
        """Where the network says ``peer_id`` is now (addresses without ``/p2p``); a plain host cannot ask."""
        return []

    # ---------------------------------------------------------------- running

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self.serving():
            await self.bootstrap()
            self.ready.set()
            task_status.started(self)
            await trio.sleep_forever()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[trio.Nursery]:
        """The host listening, its pubsub running, and a nursery for services beside them, until the block ends."""
        async with self.libp2p.run(listen_addrs=[multiaddr.Multiaddr(a) for a in self.config.listen]):
            async with (
                background_trio_service(self.pubsub),
                background_trio_service(self.gossipsub),
                trio.open_nursery() as nursery,
            ):
                await self.pubsub.wait_until_ready()
                yield nursery

    async def bootstrap(self) -> None:
        """Connect to the configured bootstrap peers; one that does not answer is a warning."""
        for addr in self.config.bootstrap:
            try:
                await self.connect(addr)
            except PeerUnreachable as err:
                log.warning("bootstrap peer %s: %s", addr, err)

    async def connect(self, addr: str) -> str:
        """Dial a ``…/p2p/<peer id>`` multiaddr; returns the peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as err:  # multiaddr raises several types for bad input
            raise PeerUnreachable(f"{addr!r} is not a multiaddr ending in /p2p/<peer id> ({err})") from None
        peer_id = info.peer_id.to_base58()
        await self.dial(peer_id, [addr.removesuffix(f"/p2p/{peer_id}")])
        return peer_id

    async def dial(self, peer_id: str, addrs: list[str]) -> None:
        """Connect to ``peer_id`` through any of ``addrs`` unless already connected.

        Addresses are tried best first (``node.net.addresses.dial_rank``: public,
        private, local, relayed), the next one ``dial_stagger_s`` after the
        previous started or at once when it failed, so an address that never
        answers costs little; the first connection wins. py-libp2p's own
        ``connect`` is not used: it dials at most one address per transport
        from its peerstore and then refuses to dial the peer for 60 s.
        Raises ``PeerUnreachable`` naming every address tried and why it failed.
        """
        peer = ID.from_base58(peer_id)
        if peer in self.libp2p.get_connected_peers():
            return
        candidates = sorted(dict.fromkeys(a for a in addrs if a), key=addresses.dial_rank)
        if not candidates:
            raise PeerUnreachable(f"peer {peer_id[:12]}… has no address to dial")
        failures: dict[str, str] = {}
        won = trio.Event()

        async def attempt(addr: str, failed: trio.Event) -> None:
            try:
                with trio.fail_after(self.config.connect_timeout_s):
                    await self._dial_one(peer, addr)
            except trio.TooSlowError:
                failures[addr] = f"no handshake within {self.config.connect_timeout_s:g}s"
            except Exception as err:  # py-libp2p's dial errors have no common base we can rely on
                failures[addr] = _dial_error(err)
            else:
                won.set()
                nursery.cancel_scope.cancel()
            failed.set()

        async with trio.open_nursery() as nursery:
            for addr in candidates:
                failed = trio.Event()
                nursery.start_soon(attempt, addr, failed)
                with trio.move_on_after(self.config.dial_stagger_s):
                    await failed.wait()
        if won.is_set() or peer in self.libp2p.get_connected_peers():
            return
        tried = "; ".join(f"{a} ({why})" for a, why in failures.items())
        raise PeerUnreachable(f"could not connect to peer {peer_id[:12]}…: tried {tried}")

    async def _dial_one(self, peer: ID, addr: str) -> None:
        if addresses.is_circuit(addr):
            await self.dial_circuit(f"{addr}/p2p/{peer.to_base58()}")
            return
        maddr = multiaddr.Multiaddr(addr)
        self.libp2p.get_peerstore().add_addrs(peer, [maddr], 600)
        await self.libp2p.get_network().dial_addr(maddr, peer)

    async def open_stream(self, peer_id: str, protocol: str, addrs: list[str] = ()) -> Stream:
        """Open a stream to ``peer_id`` (dialling ``addrs`` first if not connected), within the deadline."""
        peer = ID.from_base58(peer_id)
        if addrs and peer not in self.libp2p.get_connected_peers():
            try:
                await self.dial(peer_id, list(addrs))
            except PeerUnreachable as given:
                found = [a for a in await self._find_elsewhere(peer_id) if a not in addrs]
                if not found:
                    raise
                log.info("peer %s… moved: dialling the addresses the DHT gave", peer_id[:12])
                try:
                    await self.dial(peer_id, found)
                except PeerUnreachable as elsewhere:
                    raise PeerUnreachable(f"{given}; and at the addresses the DHT gave: {elsewhere}") from None
        try:
            with trio.fail_after(self.config.stream_timeout_s):
                raw = await self.libp2p.new_stream(peer, [TProtocol(protocol)])
        except trio.TooSlowError:
            raise PeerUnreachable(
                f"peer {peer_id[:12]}… did not open {protocol} within {self.config.stream_timeout_s:.0f}s"
            ) from None
        except Exception as err:
            raise PeerUnreachable(f"peer {peer_id[:12]}… refused {protocol}: {err.__class__.__name__}") from None
        return Stream(raw)

    async def _find_elsewhere(self, peer_id: str) -> list[str]:
        """The peer's current addresses from ``find_peer``, when the ones we were given fail (``[]`` if none)."""
        try:
            return await self.find_peer(peer_id, self.config.find_peer_timeout_s)
        except NodeError as err:
            log.debug("DHT lookup of %s… failed: %s", peer_id[:12], err)
            return []

    def status(self) -> dict:
        """How others reach this node, JSON-able (``llmarket net status``)."""
        peers = {p: kind for p in self.connected_peers() if (kind := self.connection_kind(p))}
        return {
            "peer_id": self.peer_id,
            "listen": self.listening(),
            "announce": list(self.config.announce),
            "advertised": self.advertised(),
            "peers": [{"peer_id": p, "connection": kind} for p, kind in sorted(peers.items())],
        }

    def set_topic_rate_limit(self, topic: str, per_s: float) -> None:
        """Let each peer forward us up to ``per_s`` messages a second on ``topic`` (else ``gossip_rate_limit``)."""
        self.gossipsub.topic_rate_limits[topic] = per_s

    def set_handler(self, protocol: str, handler: Handler) -> None:
        """Serve ``protocol`` with ``handler``; no exception from it can escape into libp2p (``node.net.guards``)."""

        async def serve(raw) -> None:
            await handler(Stream(raw))

        self.libp2p.set_stream_handler(TProtocol(protocol), guarded(protocol, serve, limit=self.streams))

    async def ping(self, peer_id: str, addrs: list[str] = ()) -> float:
        """Round-trip time to ``peer_id`` in milliseconds (libp2p ping protocol)."""
        stream = await self.open_stream(peer_id, "/ipfs/ping/1.0.0", addrs)
        payload = secrets.token_bytes(32)
        try:
            with trio.fail_after(self.config.stream_timeout_s):
                started = time.perf_counter()
                await stream.write(payload)
                echoed = b""
                while len(echoed) < 32:
                    chunk = await stream.read(32 - len(echoed))
                    if not chunk:
                        raise PeerUnreachable(f"peer {peer_id[:12]}… closed the ping")
                    echoed += chunk
                rtt_ms = 1000 * (time.perf_counter() - started)
        except trio.TooSlowError:
            raise PeerUnreachable(f"peer {peer_id[:12]}… did not answer a ping") from None
        finally:
            await stream.close()
        if echoed != payload:
            raise PeerUnreachable(f"peer {peer_id[:12]}… answered the ping with other bytes")
        return rtt_ms

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.libp2p.get_connected_peers()]

    def connection_kind(self, peer_id: str) -> ConnectionKind | None:
        """How we are connected to ``peer_id``: "direct" (any direct connection), "relayed", or None (not)."""
        return connection_kind(self.libp2p.get_network(), ID.from_base58(peer_id))


def _dial_error(err: BaseException) -> str:
    """A short reason for a failed dial: py-libp2p and trio wrap the OS error several levels down."""
    found = _os_error(err, depth=0)
    if found is not None:
        return found.strerror or str(found) or found.__class__.__name__
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{err.__class__.__name__}: {text}"[:160] if text else err.__class__.__name__


def _os_error(err: BaseException | None, depth: int) -> OSError | None:
    """The innermost ``OSError`` with an error string under ``err`` (causes, contexts, groups)."""
    if err is None or depth > 12:
        return None
    inner = [err.__cause__, err.__context__] + list(getattr(err, "exceptions", ()))
    for nested in inner:
        if (found := _os_error(nested, depth + 1)) is not None:
            return found
    return err if isinstance(err, OSError) and err.strerror else None
