"""Reachability and NAT traversal for a host: AutoNAT, circuit relay v2, DCUtR, composed.

``Nat`` is one service per host (``install()`` then ``run()``). It tells the node
whether it is publicly reachable, keeps relay reservations while it is not,
relays for others while it is (or may be), dials ``/p2p-circuit`` addresses and
upgrades relayed connections to direct ones. The parts are modules of their own,
each with a docstring that lists what it replaces in py-libp2p 0.8.1 and why:

- ``node.net.autonat``: is this node publicly reachable (``AutoNat``);
- ``node.net.relay``: relaying for others (``Relay``), reservations and
  circuits of our own (``RelayClient``);
- ``node.net.dcutr``: from relayed to direct connections (``HolePunching``).

``Nat`` wires them together: they share one ``Changes`` (peers coming and
going, the verdict moving), the relay serves while ``relay_service`` is on and
we are not known to be private, and reservations are kept while private.

Measured across network namespaces (a bridge as the internet; two homes behind
nftables ``masquerade`` routers; relay and client on ``0.0.0.0``): AutoNAT says
public on the public hosts and private behind the NATs (1.5 s after connecting
when the router answers the dial-back with RST, 6 s when it drops it: the
5 s dial-back deadline); a reservation follows 0.5 to 1 s later; a relayed dial
takes 50 to 100 ms; with one side public the connection is direct 0.5 to 0.9 s
later (the NATed side dials out). Both behind NATs: with routers that drop
unsolicited packets (home routers do) and keep ports (endpoint-independent),
direct 3.1 s later by TCP simultaneous open; behind routers that answer with RST
(a bare Linux masquerade) or randomise ports (``masquerade random``) there is
no direct connection, and the relayed one keeps working. Streams opened while
relayed survive an upgrade; new ones go direct.

``status()`` is JSON-able. No state lives at module level: two nodes may share a
process. ``force_reachability`` (constructor) or ``set_reachability()`` pins the
answer, for tests and for operators who know. ``relay_service``,
``hole_punching`` and ``config`` may be changed after construction, until
``run()`` starts (the first two register or remove their protocols at once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import multiaddr
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID
from libp2p.tools.anyio_service import background_trio_service

from node.net.autonat import AutoNat, Reachability
from node.net.config import NatConfig
from node.net.conns import Changes, ConnectionKind, connection_kind, is_relayed
from node.net.dcutr import HolePunching, keep_every_connection
from node.net.guards import ANY_FAULT, guarded
from node.net.relay import Relay, RelayClient, relay_limits

log = logging.getLogger(__name__)

__all__ = ["Nat", "NatConfig", "Reachability"]


class Nat:
    """AutoNAT, circuit relay v2 and DCUtR for one host (see the module docstring).

    ``libp2p`` is the host's py-libp2p host; ``connect`` dials a ``…/p2p/<peer id>``
    multiaddr (``node.net.host.Host.connect``: relays are dialled with the host's
    deadlines).
    """

    def __init__(
        self,
        libp2p,
        connect: Callable[[str], Awaitable[object]],
        *,
        relay_service: bool = True,
        force_reachability: Reachability | None = None,
        hole_punching: bool = True,
        config: NatConfig | None = None,
    ) -> None:
        self.libp2p = libp2p
        self.swarm = libp2p.get_network()
        self._config = config or NatConfig()
        self._relay_service = relay_service
        self.changes = Changes()
        self.autonat = AutoNat(libp2p, self._config, self.changes, force_reachability=force_reachability)
        self.relay = Relay(
            libp2p, self._config, hop_enabled=lambda: self.hop_enabled, observed_addrs=self.observed_addrs
        )
        self.client = RelayClient(
            libp2p, self._config, self.changes, reachability=lambda: self.reachability, connect=connect
        )
        self.punching = HolePunching(libp2p, self._config, enabled=hole_punching)
        self._installed = False

    # ---------------------------------------------------------- wiring

    def install(self) -> None:
        """Register protocol handlers and the swarm hooks; before the host runs or right after."""
        if self._installed:
            return
        self._installed = True
        self.libp2p.set_stream_handler(
            AUTONAT_PROTOCOL_ID, guarded(str(AUTONAT_PROTOCOL_ID), self.autonat.serve, faults=ANY_FAULT)
        )
        self.libp2p.set_stream_handler(STOP_PROTOCOL_ID, self.relay._handle_stop_stream)
        self._sync_handlers()
        self.swarm.register_notifee(_Notifee(self))
        keep_every_connection(self.swarm)  # node.net.dcutr says why

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the relay and DCUtR services and the AutoNAT, reservation and drain loops."""
        self.install()
        async with background_trio_service(self.relay), trio.open_nursery() as nursery:
            await nursery.start(self.punching.run)
            nursery.start_soon(self.autonat.run)
            nursery.start_soon(self.client.run)
            task_status.started(self)

    # relay_service, hole_punching and config may be changed until run() starts

    @property
    def relay_service(self) -> bool:
        return self._relay_service

    @relay_service.setter
    def relay_service(self, on: bool) -> None:
        self._relay_service = on
        self._sync_handlers()

    @property
    def hole_punching(self) -> bool:
        return self.punching.enabled

    @hole_punching.setter
    def hole_punching(self, on: bool) -> None:
        self.punching.enabled = on
        self._sync_handlers()

    @property
    def config(self) -> NatConfig:
        return self._config

    @config.setter
    def config(self, config: NatConfig) -> None:
        self._config = config
        self.autonat.config = self.client.config = self.relay.config = config
        self.relay.limits = self.relay.resource_manager.limits = relay_limits(config)
        self.punching.set_config(config)

    def _sync_handlers(self) -> None:
        """The hop and DCUtR protocols are offered only while relay_service and hole_punching are on."""
        if not self._installed:
            return
        for on, protocol, handler in (
            (self._relay_service, HOP_PROTOCOL_ID, self.relay._handle_hop_stream),
            (self.punching.enabled, DCUTR_PROTOCOL_ID, self.punching.dcutr._handle_dcutr_stream),
        ):
            if on:
                self.libp2p.set_stream_handler(protocol, handler)
            else:
                self.libp2p.remove_stream_handler(protocol)

    # ---------------------------------------------------------- reachability

    def set_reachability(self, value: Reachability | None) -> None:
        """Pin the reachability (tests; operators who know), or ``None`` to let AutoNAT decide."""
        self.autonat.set_reachability(value)

    @property
    def reachability(self) -> Reachability:
        return self.autonat.reachability

    @property
    def reason(self) -> str:
        return self.autonat.reason

    @property
    def hop_enabled(self) -> bool:
        return self._relay_service and self.reachability != "private"

    def observed_addrs(self) -> list[str]:
        """Addresses AutoNAT servers reached us at, beyond our listen addresses; only while public."""
        return self.autonat.observed_addrs()

    def circuit_addrs(self) -> list[str]:
        """``<relay addr>/p2p/<relay>/p2p-circuit`` for every reservation we hold (no /p2p/<us> suffix)."""
        return self.client.circuit_addrs()

    @property
    def held(self) -> dict:
        """The reservations we hold, by relay."""
        return self.client.held

    # ---------------------------------------------------------- connections

    def connection_kind(self, peer_id: str) -> ConnectionKind | None:
        return connection_kind(self.swarm, ID.from_base58(peer_id))

    async def dial(self, addr: str) -> None:
        """Connect to ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>`` through the relay (``RelayClient.dial``)."""
        await self.client.dial(addr)

    async def wait_direct(self, peer_id: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a direct connection to ``peer_id`` (``HolePunching.wait_direct``)."""
        return await self.punching.wait_direct(peer_id, timeout_s)

    # ---------------------------------------------------------- status

    def status(self) -> dict:
        now = time.time()
        peers = {}
        for peer in list(self.swarm.connections):
            kind = self.connection_kind(peer.to_base58())
            if kind:
                peers[peer.to_base58()] = kind
        reachability, reason = self.reachability, self.reason
        return {
            "reachability": reachability,
            "reason": reason,
            "observed_addrs": self.observed_addrs(),
            "circuit_addrs": self.circuit_addrs(),
            "relay_service": self._relay_service,
            "relaying": self.hop_enabled,
            "reservations": [
                {
                    "relay": relay.to_base58(),
                    "expires_at": held.expire,
                    "expires_in_s": max(0, int(held.expire - now)),
                    "addrs": list(held.addrs),
                    "limit": {"duration_s": held.limit[0], "data_bytes": held.limit[1]} if held.limit else None,
                }
                for relay, held in self.client.held.items()
            ],
            "relay_problems": self.client.problems(),
            "served": self.relay.served(),
            "peers": peers,
        }


class _Notifee(INotifee):
    """Wakes the AutoNAT and reservation loops when peers come and go; hands relayed connections to DCUtR."""

    def __init__(self, nat: Nat) -> None:
        self.nat = nat

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.nat.changes.poke()
        if is_relayed(conn):
            self.nat.punching.on_relayed(conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self.nat.changes.poke()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass
