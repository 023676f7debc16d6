"""A node's network: the libp2p host with NAT traversal and discovery (``Network``).

``Network`` is the ``node.net.host.Host`` a node runs (it is one, so whatever
takes a ``Host`` takes a ``Network``), composed with:

- ``node.net.nat.Nat``: AutoNAT, circuit relay v2 and DCUtR. The host
  advertises the addresses AutoNAT confirmed and its relay addresses, and dials
  ``/p2p-circuit`` addresses through a relay;
- ``node.net.dht.DhtService``: the Kademlia DHT (server mode when
  ``HostConfig.dht_server``). When every address a peer gave fails, the host
  asks the DHT where it is now; ``provide`` and ``find_providers`` keep
  provider records of models;
- ``node.net.mdns.LanDiscovery`` when ``HostConfig.mdns``: peers on the LAN.

Callers ask the ``Network`` itself (``connection_kind``, ``wait_direct``,
``reachability``, ``provide``, ``find_providers``, ``wait_for_peer``,
``greet_lan_peers``); the parts are attributes (``nat``, ``dht``, ``lan``) for
tests and status only.

``Network.run`` follows the trio start protocol, like ``Host.run``: NAT
traversal starts before the bootstrap peers are dialled (so AutoNAT sees them
connect), discovery after. Two networks in one process share nothing.
"""

from __future__ import annotations

import logging

import trio
from libp2p.abc import INotifee
from libp2p.peer.id import ID

from node.net.autonat import Reachability
from node.net.dht import DhtService
from node.net.host import Host
from node.net.mdns import SERVICE_TYPE, LanDiscovery, OnPeer
from node.net.nat import Nat

log = logging.getLogger(__name__)


class Network(Host):
    """A ``Host`` with NAT traversal, the DHT and (when configured) mDNS; see the module docstring."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # they register handlers and notifees on the host, so they come after it
        self.nat = Nat(self.libp2p, self.connect, relay_service=self.config.relay_service, config=self.config.nat)
        self.nat.install()
        self.dht = DhtService(self, "server" if self.config.dht_server else "client")
        self.lan: LanDiscovery | None = None
        if self.config.mdns:
            self.lan = LanDiscovery(
                self.peer_id,
                self.addrs,
                self.connect,
                is_connected=self._is_connected,
                service_type=self.config.mdns_service or SERVICE_TYPE,
            )
        self._notifee = _ConnectionNotifee(self)
        self._peer_changed = trio.Event()
        self.discovering = False

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self.serving() as nursery:
            await nursery.start(self.nat.run)
            await self.bootstrap()
            await nursery.start(self._discover)
            self.ready.set()
            task_status.started(self)
            await trio.sleep_forever()

    # ------------------------------------------------------ NAT traversal

    def observed_addrs(self) -> list[str]:
        return self.nat.observed_addrs()

    def circuit_addrs(self) -> list[str]:
        return self.nat.circuit_addrs()

    async def dial_circuit(self, addr: str) -> None:
        await self.nat.dial(addr)

    @property
    def reachability(self) -> Reachability:
        """ "public", "private" or "unknown" (AutoNAT's verdict, or what the configuration pinned)."""
        return self.nat.reachability

    @property
    def reachability_reason(self) -> str:
        """Why ``reachability`` is what it is, in a few words."""
        return self.nat.reason

    async def wait_direct(self, peer_id: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a direct connection to ``peer_id`` (asking DCUtR for one); whether one exists.

        False at once when not connected at all. New streams opened after True use
        the direct connection.
        """
        return await self.nat.wait_direct(peer_id, timeout_s)

    # ------------------------------------------------------ discovery

    def greet_lan_peers(self, callback: OnPeer | None) -> None:
        """Run ``callback(peer_id)`` once each peer mDNS found is connected, whoever dialled, and after each
        reconnection (e.g. to ask it for its offers). No effect without mDNS."""
        if self.lan is not None:
            self.lan.on_peer = callback

    async def find_peer(self, peer_id: str, timeout_s: float = 10.0) -> list[str]:
        """The addresses (without ``/p2p``) DHT peers report for ``peer_id``; ``[]`` if none in time or not running."""
        if not self.discovering:
            return []
        return await self.dht.find_peer(peer_id, timeout_s)

    async def provide(self, cid: str, timeout_s: float = 30.0) -> bool:
        """Tell the DHT servers closest to ``cid`` that we provide it; whether any took the record in time."""
        return await self.dht.provide(cid, timeout_s)

    async def find_providers(self, cid: str, timeout_s: float = 10.0) -> list[tuple[str, list[str]]]:
        """Peers that provide ``cid``: (peer id, dialable addresses without ``/p2p``), ourselves left out."""
        return await self.dht.find_providers(cid, timeout_s)

    async def wait_for_peer(self, timeout_s: float) -> list[str]:
        """The connected peers' ids, once there is at least one (found by mDNS or any other way); ``[]`` on timeout."""
        with trio.move_on_after(timeout_s):
            while not self.connected_peers():
                if self._peer_changed.is_set():
                    self._peer_changed = trio.Event()
                await self._peer_changed.wait()
        return self.connected_peers()

    def _is_connected(self, peer_id: str) -> bool:
        try:
            return ID.from_base58(peer_id) in self.libp2p.get_connected_peers()
        except Exception:
            return False

    def _connected(self, peer: ID) -> None:
        self.dht.peer_connected(peer)
        self._peer_changed.set()
        if self.lan is not None:
            self.lan.poke()

    async def _discover(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the DHT and mDNS until cancelled; ``started`` once both run."""
        network = self.libp2p.get_network()
        network.register_notifee(self._notifee)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.dht.run)
                for peer in self.libp2p.get_connected_peers():  # connected before we ran (bootstrap)
                    self.dht.peer_connected(peer)
                if self.lan is not None:
                    await nursery.start(self.lan.run)
                self.discovering = True
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.discovering = False
            network.remove_notifee(self._notifee)

    # ------------------------------------------------------ status

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
            "discovery": {
                "mdns": self.lan.status() if self.lan is not None else {"state": "off"},
                "dht": self.dht.status(),
                "connected": len(self.libp2p.get_connected_peers()),
            },
        }


class _ConnectionNotifee(INotifee):
    """Hands each new connection's peer id to the DHT feeder, and wakes ``wait_for_peer`` and mDNS."""

    def __init__(self, network: Network) -> None:
        self.network = network

    async def connected(self, network, conn) -> None:
        self.network._connected(conn.muxed_conn.peer_id)

    async def disconnected(self, network, conn) -> None:
        pass

    async def opened_stream(self, network, stream) -> None:
        pass

    async def closed_stream(self, network, stream) -> None:
        pass

    async def listen(self, network, multiaddr) -> None:
        pass

    async def listen_close(self, network, multiaddr) -> None:
        pass
