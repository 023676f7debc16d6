"""DCUtR for one host: from a relayed connection to a direct one. Part of ``node.net.nat``.

**DCUtR** (``/libp2p/dcutr``): py-libp2p's ``DCUtRProtocol`` as it is (a direct
dial first, then TCP simultaneous open from the listen port; it tries relayed
peers every 2 s), except for two things. Its loop could fire before identify
had given it the peer's listen addresses, skip the direct dial and punch, and a
punch dial against an ordinary listener fails (both sides answer Noise), so an
upgrade sometimes took ~24 s; ``_go_direct`` therefore dials the peer's direct
addresses itself once identify has run on a new relayed connection. And what
happens once a direct connection exists: the host keeps one connection per
peer (``max_connections_per_peer=1``), and py-libp2p trims the surplus when a
connection is added: the oldest one, with the fewest streams, past a 20 s
grace, so a relayed connection carrying a job was closed under it; and DCUtR
itself closed relayed connections 60 s after an upgrade, streams or not. Here
neither closes anything (``keep_every_connection`` turns the trimming off on
this host's swarm, and DCUtR's relay close is off). Instead, once a peer has a
direct connection, each of its relayed connections is closed when it has
carried no stream for 2 s other than background protocols (gossipsub,
identify, ping, AutoNAT, DCUtR), which py-libp2p re-opens on the remaining connection. New streams already
prefer the direct connection (the swarm picks direct over relayed). Several
direct connections to one peer are left alone, as py-libp2p did within its
grace period. DCUtR's dial timeout is 3 s (``punch_dial_timeout_s``; py-libp2p:
10 s, spent on its first plain dial to addresses a NAT drops, before every
hole punch).

``HolePunching`` runs it (``run``), dials directly after identify
(``on_relayed``), waits for a direct connection on request (``wait_direct``)
and drains relayed connections that a direct one replaced.
"""

from __future__ import annotations

import logging

import trio
from libp2p.abc import INetConn, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service

from node.errors import one_line
from node.net import addresses
from node.net.config import NatConfig
from node.net.conns import connection_kind, is_relayed, live_conns, protocols, short, strip_p2p
from node.net.guards import ANY_FAULT, run_guarded

log = logging.getLogger(__name__)

# streams a relayed connection may carry and still be closed once a direct one exists
BACKGROUND_PROTOCOLS = (
    "/meshsub/",
    "/floodsub/",
    "/ipfs/id/",
    "/ipfs/ping/",
    "/libp2p/autonat/",
    "/libp2p/dcutr",
    "/libp2p/circuit/",
)


def keep_every_connection(swarm) -> None:
    """Stop py-libp2p from closing a peer's surplus connections as a new one is added (the one patch here).

    Why: the host allows one connection per peer (``max_connections_per_peer=1``,
    which also makes py-libp2p's dials stop at the first connection), so when
    DCUtR adds a direct connection beside a relayed one, py-libp2p 0.8.1's
    ``Swarm._trim_connections`` closes the older one with the fewest streams once
    past its grace period, even a relayed connection carrying a job. Its only
    knobs do not serve: ``ConnectionConfig.grace_period`` and tag-store
    protection also exempt connections from the swarm's global pruning, and
    raising ``max_connections_per_peer`` changes how every dial ends. So the
    method is replaced on this one swarm instance (not the class: other hosts
    in the process keep theirs); ``HolePunching`` closes the relayed
    connections a direct one replaced, once they are idle.
    """
    swarm._trim_connections = lambda peer_id: None


def busy(conn: INetConn) -> bool:
    """Whether ``conn`` carries a stream other than background protocols."""
    try:
        streams = conn.get_streams()
    except Exception:
        return True
    for stream in streams:
        try:
            protocol = stream.get_protocol()
        except Exception:
            protocol = None
        if not protocol or not str(protocol).startswith(BACKGROUND_PROTOCOLS):
            return True
    return False


class HolePunching:
    """DCUtR for one host, and what happens to relayed connections once a direct one exists (module docstring).

    ``enabled`` may be changed until ``run`` starts (``node.net.nat.Nat.hole_punching``).
    """

    def __init__(self, libp2p, config: NatConfig, *, enabled: bool = True) -> None:
        self.libp2p = libp2p
        self.swarm = libp2p.get_network()
        self.config = config
        self.enabled = enabled
        # dial_timeout bounds DCUtR's first, plain direct dial (to addresses a NAT drops silently) and each punch dial
        self.dcutr = _DCUtR(libp2p, dial_timeout=config.punch_dial_timeout_s)
        self._idle_since: dict[int, float] = {}  # id(relayed conn) → trio time it was first seen idle
        self._nursery: trio.Nursery | None = None

    def set_config(self, config: NatConfig) -> None:
        self.config = config
        self.dcutr.dial_timeout = config.punch_dial_timeout_s

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run DCUtR (when enabled) and the drain loop until cancelled."""
        async with trio.open_nursery() as nursery:
            if self.enabled:
                await nursery.start(self._run_dcutr)
            self._nursery = nursery
            nursery.start_soon(self._drain)
            task_status.started()

    async def _run_dcutr(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dcutr):
            task_status.started()
            await trio.sleep_forever()

    def on_relayed(self, conn: INetConn) -> None:
        """A relayed connection came up: dial the peer directly once identify has run (when enabled and running)."""
        if self.enabled and self._nursery is not None:
            self._nursery.start_soon(self._go_direct, conn.muxed_conn.peer_id)

    async def wait_direct(self, peer_id: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a direct connection to ``peer_id`` (asking DCUtR for one); whether one exists.

        False at once when not connected at all. New streams opened after True use
        the direct connection.
        """
        peer = ID.from_base58(peer_id)
        kicked = False
        with trio.move_on_after(timeout_s):
            while True:
                kind = connection_kind(self.swarm, peer)
                if kind == "direct":
                    return True
                if kind is None:
                    return False
                if not kicked and self.enabled and self._nursery is not None:
                    kicked = True
                    self._nursery.start_soon(self._punch, peer)
                await trio.sleep(0.1)
        return connection_kind(self.swarm, peer) == "direct"

    async def _go_direct(self, peer: ID) -> None:
        """Once identify has run on a new relayed connection, dial the peer's direct addresses (once).

        DCUtR's loop alone sometimes fires before identify has told it the peer's
        listen addresses; it then skips its plain dial and starts a hole punch
        that fails against an ordinary listener (both sides answer Noise), and
        the upgrade took about 24 s instead of 1.5 s (bench/network.py). This dial
        does what DCUtR's first step should: when one side is reachable (a public
        requester), the private side's dial out to it is the direct connection.
        """
        deadline = trio.current_time() + self.config.dial_timeout_s
        with trio.move_on_at(deadline):
            while protocols(self.libp2p, peer) is None:  # identify not done yet
                await trio.sleep(0.1)
        candidates = [
            a
            for a in self.libp2p.get_peerstore().addrs(peer)
            if "/p2p-circuit" not in str(a) and not addresses.is_wildcard(str(a))
        ]
        for addr in sorted(candidates, key=lambda a: addresses.dial_rank(str(a))):
            if connection_kind(self.swarm, peer) != "relayed" or trio.current_time() > deadline:
                return
            with trio.move_on_after(self.config.punch_dial_timeout_s):
                try:
                    await self.swarm.dial_addr(strip_p2p(addr), peer)
                    log.debug("direct connection to %s at %s after identify", short(peer), addr)
                    return
                except Exception as err:  # py-libp2p's dial errors have no common base
                    log.debug("direct dial to %s at %s failed: %s", short(peer), addr, one_line(err, with_type=True))

    async def _punch(self, peer: ID) -> None:
        try:
            await self.dcutr.initiate_hole_punch(peer)
        except Exception as err:
            log.debug("hole punch to %s failed: %s", short(peer), err)

    async def _drain(self) -> None:
        """Close a peer's relayed connections once it has a direct one and they are idle (module docstring)."""
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            idle: dict[int, float] = {}
            for peer in list(self.swarm.connections):
                conns = live_conns(self.swarm, peer)
                if all(is_relayed(c) for c in conns):
                    continue
                for conn in conns:
                    if not is_relayed(conn) or busy(conn):
                        continue
                    since = idle[id(conn)] = self._idle_since.get(id(conn), now)
                    if now - since >= 2.0:
                        log.debug("closing the relayed connection to %s: a direct one took over", short(peer))
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            try:
                                await conn.close()
                            except Exception:
                                pass
            self._idle_since = idle


class _DCUtR(DCUtRProtocol):
    """py-libp2p's DCUtR, except that it does not close relayed connections (``HolePunching._drain`` does)."""

    def _schedule_relay_close(self, peer_id: ID) -> None:
        pass

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        await run_guarded(str(DCUTR_PROTOCOL_ID), super()._handle_dcutr_stream, stream, faults=ANY_FAULT)
