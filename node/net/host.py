"""A libp2p host with the safety rails py-libp2p 0.8.1 does not have by default.

- **Noise only.** py-libp2p also accepts plaintext (and TLS, secio) unless told
  otherwise, and plaintext lets a peer claim any peer id.
- **yamux, one connection per peer** (which also skips a 250 ms dial delay).
- **Guarded handlers.** An exception escaping a stream handler can kill the
  process or wedge the connection in py-libp2p, so every handler runs inside a
  guard that logs, resets the stream and carries on. A peer's fault (a bad
  frame, a broken stream, silence past a deadline) is one debug line with its
  peer id; anything else is a bug and logged with its traceback. A peer may
  hold at most ``max_inbound_streams_per_peer`` open streams; more are reset at once.
- **Deadlines** on connect and on opening streams: a listener that accepts TCP
  but never speaks would otherwise hold a dial for minutes.
- **Inbound connection limits** (``InboundGuard``). py-libp2p admits 250
  inbound connections in all, holds each one that does not speak for 10 s, and
  keeps every inbound connection's slot until the host stops, even after the
  connection closed. The guard gives each remote IP at most
  ``max_connections_per_ip`` inbound connections, ``connection_rate_per_ip``
  new ones a second (bursts of ``connection_burst_per_ip``) and
  ``max_pending_per_ip`` still upgrading (Noise + yamux); ``max_pending``
  upgrading in all; and ``upgrade_timeout_s`` to finish. When a limit on
  upgrading connections is reached, the oldest upgrading connection of the IP with the most of them is
  closed to make room, so a flood of idle connections cannot keep out a peer
  that completes its handshake. A slot is freed when its connection closes.
  (``libp2p.rcmgr`` does not serve here: it has no per-IP limit, only fixed
  CIDR totals; its pending-connection limit is not wired into the swarm; and a
  cancelled inbound upgrade leaks its admission slot, so that after 1,000 of
  them every inbound connection is refused. The host runs without it.)
- **Yamux flow control enforced** (``GuardedYamux``). py-libp2p's yamux logs
  "peer exceeded receive window" and keeps appending. Here a peer that sends a
  stream more than the receive window we granted loses its connection; and as
  a second line of defence a stream may buffer at most twice its window plus
  one frame, a connection ``max_buffered_per_connection``, all connections
  ``max_buffered_total``.
- **GossipSub** for offers, with signed messages and a 1 s heartbeat.
- **Addresses others can dial** (``node.net.addresses``): wildcards expanded,
  ``announce`` honoured, relay addresses added; ``dial`` tries every address
  of a peer, best first and staggered, and names each failure; when all fail,
  ``open_stream`` asks the DHT where the peer is now.
- **Reachability and discovery**: every host runs ``node.net.nat.Nat`` (AutoNAT,
  circuit relay v2, DCUtR) and ``node.net.discovery.Discovery`` (mDNS when
  ``mdns``, the Kademlia DHT); ``status()`` reports them.

``Host.run`` follows the trio start protocol: ``await nursery.start(host.run)``
returns once the host listens, is connected to its bootstrap peers (those that
answer) and its pubsub runs.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IMuxedConn
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
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, MAX_MESSAGE_SIZE, Yamux
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.tools.anyio_service import background_trio_service

from node.net import addresses
from node.concurrency import TokenBucket
from node.net.discovery import SERVICE_TYPE, Discovery
from node.errors import NodeError, PeerUnreachable
from node.net.identity import Identity
from node.net.nat import Nat, NatConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostConfig:
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()  # replaces the advertised direct addresses (node.addresses)
    mdns: bool = False  # find and announce peers on the LAN (node.discovery); the CLI turns it on
    mdns_service: str = ""  # the mDNS service type; "" is llmarket's (tests use their own, to meet only themselves)
    relay_service: bool = True  # relay for peers behind NAT unless AutoNAT finds us private (node.nat)
    dht_server: bool = False  # answer DHT queries (workers, which are the bootstrap peers); else a client
    find_peer_timeout_s: float = 5.0  # a DHT lookup when a peer's given addresses all fail
    nat: NatConfig = NatConfig()  # AutoNAT, relay and hole-punching timings and caps (node.nat)
    connect_timeout_s: float = 10.0  # per address dialled
    dial_stagger_s: float = 0.5  # the next address of a peer is tried after this long (or once one fails)
    stream_timeout_s: float = 10.0
    max_inbound_streams_per_peer: int = 16
    # inbound connections, per remote IP and in all (InboundGuard)
    upgrade_timeout_s: float = 4.0  # from TCP accept to Noise + yamux done
    max_pending_per_ip: int = 8  # connections still upgrading, per remote IP
    max_pending: int = 64  # connections still upgrading, in all
    max_connections_per_ip: int = 32  # inbound connections, upgrading or not, per remote IP
    connection_rate_per_ip: float = 5.0  # new inbound connections a second per remote IP (on average)…
    connection_burst_per_ip: float = 20.0  # …in bursts of up to this many
    # what yamux may buffer unread (GuardedYamux); a stream's own cap follows its window
    max_buffered_per_connection: int = 32 << 20
    max_buffered_total: int = 256 << 20


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
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            listen_addrs=[multiaddr.Multiaddr(a) for a in self.config.listen],
            addrs_factory=self._direct_multiaddrs,  # what identify tells peers, too
        )
        # off with py-libp2p's default resource manager (see the module docstring): InboundGuard, the
        # stream limit per peer and GuardedYamux take its place
        self.libp2p.get_network().set_resource_manager(None)
        self.inbound = InboundGuard(self.config, self.libp2p.get_network())
        self.inbound.install()
        self._guard_yamux()
        self.gossipsub = GossipSub(
            protocols=[GOSSIPSUB_V11, GOSSIPSUB_V10], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1
        )
        self.pubsub = Pubsub(self.libp2p, self.gossipsub, strict_signing=True)
        self._inbound: Counter[str] = Counter()
        self.ready = trio.Event()
        # reachability and NAT traversal, then discovery (they register handlers, so they come last)
        self.nat = Nat(self, relay_service=self.config.relay_service, config=self.config.nat)
        self.nat.install()
        self.discovery = Discovery(
            self,
            mdns=self.config.mdns,
            dht_mode="server" if self.config.dht_server else "client",
            service_type=self.config.mdns_service or SERVICE_TYPE,
        )

    def _guard_yamux(self) -> None:
        """Make every yamux connection a ``GuardedYamux`` (py-libp2p ignores ``muxer_opt`` for yamux)."""
        muxers = self.libp2p.get_network().upgrader.muxer_multistream
        new_conn = muxers.new_conn

        async def guarded_new_conn(conn, peer_id):
            muxed = await new_conn(conn, peer_id)
            if type(muxed) is Yamux:
                self.yamux.adopt(muxed)
            return muxed

        muxers.new_conn = guarded_new_conn

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
        nat = getattr(self, "nat", None)  # absent while the host is being built
        return addresses.advertised(
            self.listening(),
            announce=self.config.announce,
            observed=nat.observed_addrs() if nat else [],
            circuits=nat.circuit_addrs() if nat else [],
        )

    def _direct_multiaddrs(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """py-libp2p's address factory: identify tells peers these (relay addresses travel in offers only)."""
        if not hasattr(self, "libp2p"):  # called once while new_host builds the host
            return candidates
        return [multiaddr.Multiaddr(a) for a in self.advertised() if not addresses.is_circuit(a)]

    def addrs(self) -> list[str]:
        """The full multiaddrs others dial (``…/p2p/<peer id>``)."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.advertised()]

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self.libp2p.run(listen_addrs=[multiaddr.Multiaddr(a) for a in self.config.listen]):
            async with (
                background_trio_service(self.pubsub),
                background_trio_service(self.gossipsub),
                trio.open_nursery() as nursery,
            ):
                await self.pubsub.wait_until_ready()
                await nursery.start(self.nat.run)
                for addr in self.config.bootstrap:
                    try:
                        await self.connect(addr)
                    except PeerUnreachable as err:
                        log.warning("bootstrap peer %s: %s", addr, err)
                await nursery.start(self.discovery.run)
                self.ready.set()
                task_status.started(self)
                await trio.sleep_forever()

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
            await self.nat.dial(f"{addr}/p2p/{peer.to_base58()}")
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
        """The peer's current addresses from the DHT, when the ones we were given fail (``[]`` if none)."""
        if not self.discovery.running:
            return []
        try:
            return await self.discovery.find_peer(peer_id, self.config.find_peer_timeout_s)
        except NodeError as err:
            log.debug("DHT lookup of %s… failed: %s", peer_id[:12], err)
            return []

    def status(self) -> dict:
        """How others reach this node, JSON-able (``llmarket net status``)."""
        nat = self.nat.status()
        return {
            "peer_id": self.peer_id,
            "listen": self.listening(),
            "announce": list(self.config.announce),
            "advertised": self.advertised(),
            "nat": nat,
            "peers": [{"peer_id": p, "connection": kind} for p, kind in sorted(nat.get("peers", {}).items())],
            "discovery": self.discovery.status(),
        }

    def set_handler(self, protocol: str, handler: Handler) -> None:
        """Serve ``protocol`` with ``handler``; no exception from it can escape into libp2p."""

        async def guarded(raw) -> None:
            stream = Stream(raw)
            peer = stream.peer_id
            if self._inbound[peer] >= self.config.max_inbound_streams_per_peer:
                log.debug("peer %s… has too many open streams; resetting %s", peer[:12], protocol)
                await stream.reset()
                return
            self._inbound[peer] += 1
            try:
                await handler(stream)
            except Exception as err:
                if peer_fault(err):
                    log.debug("%s from %s… ended: %s", protocol, peer[:12], describe_fault(err))
                else:
                    log.exception("%s handler failed for peer %s…", protocol, peer[:12])
                await stream.reset()
            finally:
                self._inbound[peer] -= 1
                if not self._inbound[peer]:
                    del self._inbound[peer]

        self.libp2p.set_stream_handler(TProtocol(protocol), guarded)

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


# ------------------------------------------------------------------ faults

PEER_FAULTS = (EOFError, ConnectionError, NodeError, trio.TooSlowError)


def peer_fault(err: BaseException) -> bool:
    """Whether ``err`` is the peer's doing (bad input, a broken stream, silence past a deadline), not a bug.

    An exception group counts if every exception in it does.
    """
    if isinstance(err, BaseExceptionGroup):
        return all(peer_fault(e) for e in err.exceptions)
    return isinstance(err, PEER_FAULTS)


def describe_fault(err: BaseException) -> str:
    if isinstance(err, BaseExceptionGroup):
        return "; ".join(describe_fault(e) for e in err.exceptions)
    if isinstance(err, trio.TooSlowError):
        return "it said nothing before the deadline"
    return str(err) or err.__class__.__name__


# ------------------------------------------------------- inbound connections


@dataclass(eq=False)
class _Inbound:
    ip: str
    order: int
    rwc: object  # the accepted TCP stream
    scope: trio.CancelScope  # around py-libp2p's handler; its deadline is the upgrade deadline
    muxed: object = None
    established: trio.Event = field(default_factory=trio.Event)
    dropped: str = ""


def _close_now(rwc) -> None:
    """Close an accepted TCP stream at once, whatever task is using it."""
    try:
        rwc.stream.socket.close()  # py-libp2p's TrioTCPStream around a trio SocketStream
    except Exception:  # another transport: its handler's own close will do
        pass


class InboundGuard:
    """Limits on inbound TCP connections, around py-libp2p's swarm (see the module docstring).

    It wraps two methods of the swarm instance: ``_handle_inbound_connection``
    (admission, the upgrade deadline, eviction, and ending the handler when its
    connection closes) and ``upgrade_inbound_raw_conn`` (to learn when the
    upgrade is done). A dropped connection's handler is cancelled and its socket
    closed. (Cancelling an upgrade leaks its admission slot in py-libp2p's
    default resource manager, and after 1,000 such leaks every inbound
    connection is refused; ``Host`` runs without it.) Connections that arrive
    already multiplexed (QUIC) are left to py-libp2p; llmarket listens on TCP only.
    """

    def __init__(self, config: HostConfig, swarm) -> None:
        self.config = config
        self.swarm = swarm
        self._handle = swarm._handle_inbound_connection
        self._upgrade = swarm.upgrade_inbound_raw_conn
        self.pending: dict[object, _Inbound] = {}  # by the task handling the connection
        self.per_ip: Counter[str] = Counter()  # inbound connections, upgrading or not
        self.refused: Counter[str] = Counter()  # why connections were refused or dropped before they were up
        self._arrivals = 0
        self._rates: dict[str, TokenBucket] = {}  # per remote IP

    def install(self) -> None:
        self.swarm._handle_inbound_connection = self.handle
        self.swarm.upgrade_inbound_raw_conn = self.upgrade

    async def handle(self, rwc, maddr) -> None:
        if isinstance(rwc, IMuxedConn):
            await self._handle(rwc, maddr)
            return
        try:
            ip = str(rwc.get_remote_address()[0])
        except Exception:  # no address: count it under one name
            ip = "?"
        reason = ""
        if self.per_ip[ip] >= self.config.max_connections_per_ip:
            reason = f"{self.config.max_connections_per_ip} connections from it already"
        elif not self._rate(ip).take(trio.current_time()):
            reason = "it connects too often"
        if reason:
            self.refused[reason] += 1
            log.debug("refusing an inbound connection from %s: %s", ip, reason)
            _close_now(rwc)
            return
        here = [r for r in self.pending.values() if r.ip == ip]
        if len(here) >= self.config.max_pending_per_ip:
            self._drop(min(here, key=lambda r: r.order), "evicted: too many upgrading connections per IP")
        if len(self.pending) >= self.config.max_pending:
            crowd = Counter(r.ip for r in self.pending.values())
            busiest = max(crowd, key=crowd.__getitem__)
            oldest = min((r for r in self.pending.values() if r.ip == busiest), key=lambda r: r.order)
            self._drop(oldest, "evicted: too many upgrading connections")
        self._arrivals += 1
        deadline = trio.current_time() + self.config.upgrade_timeout_s
        record = _Inbound(ip, self._arrivals, rwc, trio.CancelScope(deadline=deadline))
        task = trio.lowlevel.current_task()
        self.pending[task] = record
        self.per_ip[ip] += 1
        try:
            with record.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._end_with_connection, record, nursery.cancel_scope)
                    await self._handle(rwc, maddr)
                    nursery.cancel_scope.cancel()
        finally:
            self.pending.pop(task, None)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
            if record.scope.cancelled_caught and not record.established.is_set() and not record.dropped:
                self.refused["upgrade timeout"] += 1
                log.debug(
                    "closing an inbound connection from %s: no handshake within %gs", ip, self.config.upgrade_timeout_s
                )
            _close_now(rwc)

    async def upgrade(self, raw_conn, maddr):
        muxed = await self._upgrade(raw_conn, maddr)
        record = self.pending.pop(trio.lowlevel.current_task(), None)
        if record is not None:
            record.scope.deadline = math.inf
            record.muxed = muxed
            record.established.set()
        return muxed

    def _drop(self, record: _Inbound, reason: str) -> None:
        """Close an upgrading connection now."""
        for task, r in list(self.pending.items()):
            if r is record:
                del self.pending[task]
        record.dropped = reason
        self.refused[reason] += 1
        log.debug("closing an inbound connection from %s: %s", record.ip, reason)
        record.scope.cancel()
        _close_now(record.rwc)

    @staticmethod
    async def _end_with_connection(record: _Inbound, scope: trio.CancelScope) -> None:
        """Once the connection is up, end py-libp2p's handler when it closes (it would wait until the host stops)."""
        await record.established.wait()
        closed = getattr(record.muxed, "event_closed", None)
        shutting_down = getattr(record.muxed, "event_shutting_down", None)
        if closed is None:
            return
        while not closed.is_set():
            with trio.move_on_after(10):
                await closed.wait()
            if shutting_down is not None and shutting_down.is_set():
                break
        scope.cancel()

    def _rate(self, ip: str) -> TokenBucket:
        bucket = self._rates.get(ip)
        if bucket is None:
            if len(self._rates) >= 4096:  # forget addresses whose bucket has filled up again
                now = trio.current_time()
                for old in [a for a, b in self._rates.items() if now - (b.stamp or now) > b.burst / b.rate]:
                    del self._rates[old]
            bucket = self._rates[ip] = TokenBucket(
                self.config.connection_rate_per_ip, self.config.connection_burst_per_ip
            )
        return bucket


# -------------------------------------------------------------------- yamux


class _StreamBuffer(bytearray):
    """A yamux stream's receive buffer that asks its connection before it grows."""

    def __init__(self, conn: GuardedYamux, stream_id: int, initial: bytes = b"") -> None:
        super().__init__(initial)
        self._conn = conn
        self._stream_id = stream_id

    def extend(self, data) -> None:
        if self._conn._may_buffer(self._stream_id, len(self), len(data)):
            super().extend(data)


class _StreamBuffers(dict):
    """Yamux's ``stream_buffers``: every buffer put in it becomes a ``_StreamBuffer``."""

    def __init__(self, conn: GuardedYamux) -> None:
        super().__init__()
        self._conn = weakref.proxy(conn)

    def __setitem__(self, stream_id: int, buffer) -> None:
        super().__setitem__(stream_id, _StreamBuffer(self._conn, stream_id, bytes(buffer)))


class GuardedYamux(Yamux):
    """py-libp2p's yamux, with caps on what it buffers (see the module docstring).

    The caps are checked where a DATA frame's bytes would be appended to a
    stream's buffer; past a cap the bytes are dropped and the connection is
    closed (once), with one info line naming the peer. ``guarded_yamux`` makes
    the class for one host, carrying its limits and its set of connections.

    py-libp2p 0.8.1 ignores the muxer class it is given for ``/yamux/1.0.0``
    (``MuxerMultistream.new_conn`` constructs ``Yamux`` itself), so ``adopt``
    turns each new, not yet started ``Yamux`` into this class; it adds methods
    and two attributes, and changes nothing else.
    """

    config: HostConfig = HostConfig()
    connections: weakref.WeakSet | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._guard()

    @classmethod
    def adopt(cls, conn: Yamux) -> GuardedYamux:
        conn.__class__ = cls
        conn._guard()
        return conn

    def _guard(self) -> None:
        self.stream_buffers = _StreamBuffers(self)
        self.violation: str = ""
        if self.connections is not None:
            self.connections.add(self)

    def buffered(self) -> int:
        return sum(len(b) for b in list(self.stream_buffers.values()))

    def _may_buffer(self, stream_id: int, buffered: int, size: int) -> bool:
        if self.violation:
            return False
        stream = self.streams.get(stream_id)
        if stream is not None and getattr(stream, "closed", False):
            return False  # py-libp2p keeps appending to a reset stream for up to 90 s; nobody will read it
        credit = getattr(stream, "recv_window", DEFAULT_WINDOW_SIZE)  # what we granted and it has not used
        window = getattr(stream, "target_recv_window", DEFAULT_WINDOW_SIZE)
        problem = ""
        if size > credit:
            problem = f"sent past the receive window of stream {stream_id} ({size - max(credit, 0)} bytes over)"
        elif buffered + size > 2 * window + MAX_MESSAGE_SIZE:
            problem = f"has {buffered + size} bytes unread on stream {stream_id}"
        else:
            mine = self.buffered() + size
            if mine > self.config.max_buffered_per_connection:
                problem = f"has {mine} bytes unread on one connection"
            elif mine > 1 << 20 and self.connections is not None:
                total = sum(c.buffered() for c in list(self.connections) if c is not self) + mine
                if total > self.config.max_buffered_total:
                    problem = f"has {mine} bytes unread while all connections hold {total}"
        if not problem:
            return True
        self.violation = problem
        log.info("closing the connection of peer %s…: it %s", self.peer_id.to_base58()[:12], problem)
        if self._nursery is not None:
            self._nursery.start_soon(self._close_for_violation)
        return False

    async def _close_for_violation(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await self.secured_conn.close()  # the read loop then fails and tears the connection down
            except Exception:
                pass


def guarded_yamux(config: HostConfig) -> type[GuardedYamux]:
    """A ``GuardedYamux`` class for one host: its limits, and a set of its live connections."""
    return type("GuardedYamux", (GuardedYamux,), {"config": config, "connections": weakref.WeakSet()})
