"""A libp2p host with the safety rails py-libp2p 0.8.1 does not have by default.

- **Noise only.** py-libp2p also accepts plaintext (and TLS, secio) unless told
  otherwise, and plaintext lets a peer claim any peer id.
- **yamux, one connection per peer** (which also skips a 250 ms dial delay).
- **Guarded handlers.** An exception escaping a stream handler can kill the
  process or wedge the connection in py-libp2p, so every handler runs inside a
  guard that logs, resets the stream and carries on. A peer may hold at most
  ``max_inbound_streams_per_peer`` open streams; more are reset at once.
- **Deadlines** on connect and on opening streams: a listener that accepts TCP
  but never speaks would otherwise hold a dial for minutes.
- **GossipSub** for offers, with signed messages and a 1 s heartbeat.

``Host.run`` follows the trio start protocol: ``await nursery.start(host.run)``
returns once the host listens, is connected to its bootstrap peers (those that
answer) and its pubsub runs.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
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
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from node.errors import NodeError, PeerUnreachable
from node.identity import Identity

log = logging.getLogger("node.host")


@dataclass(frozen=True)
class HostConfig:
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    connect_timeout_s: float = 10.0
    stream_timeout_s: float = 10.0
    max_inbound_streams_per_peer: int = 16


class Stream:
    """A libp2p stream with the plain ``read``/``write`` that ``node.wire`` expects.

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
        self.libp2p = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            listen_addrs=[multiaddr.Multiaddr(a) for a in self.config.listen],
        )
        self.gossipsub = GossipSub(
            protocols=[GOSSIPSUB_V11, GOSSIPSUB_V10], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1
        )
        self.pubsub = Pubsub(self.libp2p, self.gossipsub, strict_signing=True)
        self._inbound: Counter[str] = Counter()
        self.ready = trio.Event()

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def addrs(self) -> list[str]:
        """The full multiaddrs others dial (``…/p2p/<peer id>``)."""
        return [str(a) for a in self.libp2p.get_addrs()]

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self.libp2p.run(listen_addrs=[multiaddr.Multiaddr(a) for a in self.config.listen]):
            async with background_trio_service(self.pubsub), background_trio_service(self.gossipsub):
                await self.pubsub.wait_until_ready()
                for addr in self.config.bootstrap:
                    try:
                        await self.connect(addr)
                    except PeerUnreachable as err:
                        log.warning("bootstrap peer %s: %s", addr, err)
                self.ready.set()
                task_status.started(self)
                await trio.sleep_forever()

    async def connect(self, addr: str) -> str:
        """Dial a ``…/p2p/<peer id>`` multiaddr; returns the peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as err:  # multiaddr raises several types for bad input
            raise PeerUnreachable(f"{addr!r} is not a multiaddr ending in /p2p/<peer id> ({err})") from None
        try:
            with trio.fail_after(self.config.connect_timeout_s):
                await self.libp2p.connect(info)
        except trio.TooSlowError:
            raise PeerUnreachable(
                f"{addr} did not complete a handshake within {self.config.connect_timeout_s:.0f}s"
            ) from None
        except Exception as err:  # py-libp2p's dial errors have no common base we can rely on
            raise PeerUnreachable(f"could not connect to {addr}: {err.__class__.__name__}: {err}") from None
        return info.peer_id.to_base58()

    async def open_stream(self, peer_id: str, protocol: str, addrs: list[str] = ()) -> Stream:
        """Open a stream to ``peer_id`` (dialling ``addrs`` first if not connected), within the deadline."""
        peer = ID.from_base58(peer_id)
        if addrs and peer not in self.libp2p.get_connected_peers():
            for addr in addrs:
                full = addr if "/p2p/" in addr else f"{addr}/p2p/{peer_id}"
                try:
                    await self.connect(full)
                    break
                except PeerUnreachable as err:
                    last = err
            else:
                raise last
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
            except (EOFError, ConnectionError, NodeError) as err:
                log.debug("%s from %s… ended: %s", protocol, peer[:12], err)
                await stream.reset()
            except Exception:
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
