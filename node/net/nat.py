"""Reachability and NAT traversal for a ``Host``: AutoNAT, circuit relay v2, DCUtR.

``Nat`` is one service per host (``install()`` then ``run()``). It tells the node
whether it is publicly reachable, keeps relay reservations while it is not,
relays for others while it is (or may be), dials ``/p2p-circuit`` addresses and
upgrades relayed connections to direct ones. It builds on py-libp2p 0.8.1's
``AutoNATService``, ``CircuitV2Protocol`` and ``DCUtRProtocol``, but replaces the
parts of them that are wrong for llmarket; each replacement is listed here.

**AutoNAT** (``/libp2p/autonat/1.0.0``). Every node serves it and asks its
directly connected peers (at most ``autonat_servers`` at a time, each at most
once per ``autonat_interval_s``, more often while the answer is unknown, and as
soon as a new peer connects).

- py-libp2p's server "dials back" with ``host.connect``, which returns at once
  when a connection to the peer already exists, and it always does (the request
  came over it): every dial-back "succeeds", so every node would think itself
  public. Here the dial-back is a fresh TCP connection plus a Noise handshake
  that must prove the peer's key, then closed (no muxer, so it never becomes a
  second connection; the dialled node's py-libp2p logs "fail to upgrade mux"
  at ERROR once per dial-back).
  Each address gets ``dialback_timeout_s``; at most 4 addresses are tried; a
  peer may ask once per 10 s, and at most 8 dial-backs run at once.
- The server dials only addresses whose IP it observes for the requester
  (spec; kept from py-libp2p). So the client asks to be dialled at the listen
  addresses that are not wildcards, and at ``<ip>:<listen port>`` for every IP
  it may be seen at: the local IP of each direct connection (a host on
  ``0.0.0.0`` with a public IP on an interface) and each IP that identify says
  peers observed (behind a NAT: the NAT's IP; a dial-back to the NAT's IP and
  our listen port fails, so the node is private; with a 1:1 NAT or a port
  forward it succeeds, and the node is public, as it should be).
- Verdicts: the latest answer per server, for ``verdict_ttl_s``. Public when at
  least one server dialled us back and no more servers failed than succeeded;
  private when more failed; unknown when no server has answered yet.
  Refusals (a rate limit, no address with the observed IP) and unanswered
  requests are no verdict. One server is enough (py-libp2p's default needs 4
  to agree, and a small market may have only a bootstrap peer): a dial-back is
  positive proof, so ties go to public. A server on the same LAN reaches us
  at a LAN address, which is "public" to that LAN only.
- ``observed_addrs()`` is what AutoNAT confirmed (the address a server reached
  us at) beyond the host's own listen addresses, only while public. Identify's
  observed addresses are not used directly: py-libp2p lists them only after 4
  distinct observers (``ACTIVATION_THRESHOLD``), and behind a NAT their port is
  the NAT's port for that one outgoing connection, which nobody else can dial.

**Circuit relay v2** (``/libp2p/circuit/relay/0.2.0/{hop,stop}``).

- Hop (relaying for others) is served while ``relay_service`` is on and the
  node is not known to be private (public, or unknown: a reservation needs a
  connection to the relay, so a relay nobody can reach costs nothing). The hop
  protocol is registered only while ``relay_service`` is on, so identify does
  not advertise it otherwise.
- A private node reserves on up to ``max_relays`` of its directly connected
  peers that speak hop (those we dialled first), refreshes each reservation
  when half its time is left, drops it when the connection to the relay goes,
  and reserves elsewhere (a relay that refused is not asked again for 5 min).
  ``circuit_addrs()`` lists ``<relay addr>/p2p/<relay>/p2p-circuit``: the
  address we dialled the relay at, plus the addresses the relay gave.
- ``dial()`` opens the circuit itself (hop CONNECT on a stream to the relay,
  then Noise + yamux over it through the swarm's upgrader, so relayed
  connections are ``GuardedYamux`` too; InboundGuard sees only TCP). Not
  ``CircuitV2Transport.dial``: with the client role it makes a reservation on
  the relay before every dial, it writes never-expiring circuit addresses into
  the peerstore, and its stored-address path reads without a deadline.
  ``RelayDiscovery`` is not used either (our own reservation loop above).
- The relay side replaces py-libp2p's hop handlers: its ``_active_relays`` is
  keyed by peer, so when one circuit to a peer ended it closed another
  circuit to the same peer; a RESERVE could name another peer id; reservations
  of peers that left kept their slots until they expired; there was no cap on
  circuits in all; and its default is 4 reservations per relay. Kept from
  py-libp2p: the reservation book and signed vouchers (``RelayResourceManager``)
  and the stop side (upgrading an inbound circuit), with a cap on relayed
  inbound connections around it.

**Relay limits: no limit per circuit; caps on how many.** A relayed connection
is one circuit carrying a whole multiplexed connection (jobs, offers, model
transfers), so any per-circuit duration or data limit cuts whatever runs on it
when it hits, and no moment is safe. The spec's "limited relay" (2 min, 128 KiB)
would cut a job in its first minutes. py-libp2p 0.8.1 does enforce its own
limits (3,600 s and 1 GiB per circuit by default: a circuit past the data
budget is reset at once; one past its duration is reset at its next read),
and 1 GiB is less than a model. So our relays set none (``circuit_duration_s``
and ``circuit_data_bytes`` are 0, and no ``Limit`` is sent, which the spec reads
as unlimited); an operator may set them. What keeps a relay from being
exhausted is counting: ``max_reservations`` (128) and ``max_reservations_per_ip``
(16); circuits ``max_circuits`` (128) in all, ``max_circuits_per_peer`` (32) to
one reserved peer, ``max_circuits_per_source`` (8) from one peer and
``max_circuits_per_ip`` (32) from one IP. A circuit whose destination does not
read for 60 s is reset. Bandwidth is what a Python relay can move: 64 MiB
went through one at 5.2 MiB/s and directly at 55 MiB/s (separate processes in
network namespaces, 2 cores); 7 to 9 MiB/s with all three nodes in one
process (tests/test_nat.py). Moving gigabytes through a relay is possible but
slow, so model transfers call ``wait_direct(peer, timeout_s)`` first and use
the direct connection DCUtR makes; only if none comes do they go through the
relay, which will not cut them.

**DCUtR** (``/libp2p/dcutr``): py-libp2p's ``DCUtRProtocol`` as it is (a direct
dial first, then TCP simultaneous open from the listen port; it tries relayed
peers every 2 s), except for two things. Its loop could fire before identify
had given it the peer's listen addresses, skip the direct dial and punch, and a
punch dial against an ordinary listener fails (both sides answer Noise), so an
upgrade sometimes took ~24 s; ``_go_direct`` therefore dials the peer's direct
addresses itself once identify has run on a new relayed connection. And what
happens once a direct connection exists: the host keeps one connection per peer (``max_connections_per_peer=1``), and
py-libp2p trims the surplus when a connection is added: the oldest one, with
the fewest streams, past a 20 s grace, so a relayed connection carrying a job
was closed under it; and DCUtR itself closed relayed connections 60 s after an
upgrade, streams or not. Here neither closes anything (``install()`` replaces
the swarm's ``_trim_connections`` on this host's swarm with a no-op, and
DCUtR's relay close is off). Instead, once a peer has a direct connection, each
of its relayed connections is closed when it has carried no stream for 2 s
other than background protocols (gossipsub, identify, ping, AutoNAT, DCUtR),
which py-libp2p re-opens on the remaining connection. New streams already
prefer the direct connection (the swarm picks direct over relayed). Several
direct connections to one peer are left alone, as py-libp2p did within its
grace period. DCUtR's dial timeout is 3 s (``punch_dial_timeout_s``; py-libp2p:
10 s, spent on its first plain dial to addresses a NAT drops, before every
hole punch).

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
from dataclasses import dataclass, field
from typing import Literal

import multiaddr
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.connection_types import ConnectionType
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService, _is_relayed_stream
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from node.net import addresses
from node.errors import PeerUnreachable, one_line

log = logging.getLogger(__name__)

Reachability = Literal["public", "private", "unknown"]

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
READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class NatConfig:
    # AutoNAT client
    autonat_servers: int = 3  # peers asked at once
    autonat_interval_s: float = 300.0  # how often a peer is asked again
    autonat_retry_s: float = 30.0  # …while reachability is unknown
    autonat_timeout_s: float = 20.0  # for one answer
    verdict_ttl_s: float = 1800.0  # how long an answer counts
    # AutoNAT server
    dialback_timeout_s: float = 5.0  # per address
    # reservations (as a private node)
    max_relays: int = 2
    relay_backoff_s: float = 300.0  # after a relay refused or failed
    # dialling and relaying
    dial_timeout_s: float = 10.0
    punch_dial_timeout_s: int = 3  # DCUtR's dials (py-libp2p: 10 s, which delayed every hole punch by 10 s)
    relay_write_timeout_s: float = 60.0  # a destination that reads nothing this long loses its circuit
    # our relay's limits (see the module docstring); 0 is unlimited
    reservation_ttl_s: int = 3600
    max_reservations: int = 128
    max_reservations_per_ip: int = 16
    max_circuits: int = 128
    max_circuits_per_peer: int = 32  # to one reserved peer
    max_circuits_per_source: int = 8  # from one peer
    max_circuits_per_ip: int = 32  # from one IP
    circuit_duration_s: int = 0
    circuit_data_bytes: int = 0
    max_relayed_inbound: int = 64  # relayed connections to us (as a destination)


@dataclass
class _Verdict:
    ok: bool
    addr: str  # the address dialled back (ok), or what we asked to be dialled at
    at: float  # trio time


@dataclass
class _Held:
    """A reservation we hold on a relay."""

    expire: int  # unix seconds, from the relay
    granted_at: float  # unix seconds
    addrs: list[str]  # the relay's addresses, without /p2p
    limit: tuple[int, int] | None  # (duration s, data bytes) if the relay set any


@dataclass(eq=False)
class _Circuit:
    source: ID
    dest: ID
    ip: str
    started: float = field(default_factory=time.monotonic)
    bytes: int = 0


# --------------------------------------------------------------- helpers


def _is_relayed(conn: INetConn) -> bool:
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
    except Exception:
        pass
    try:
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return False


def _busy(conn: INetConn) -> bool:
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


def _local_ip(conn: INetConn) -> str | None:
    """The local IP of a TCP connection (py-libp2p has no accessor: walk to the socket)."""
    obj: object = getattr(conn, "muxed_conn", None)
    for _ in range(8):
        if obj is None:
            return None
        if isinstance(obj, trio.SocketStream):
            try:
                return str(obj.socket.getsockname()[0])
            except OSError:
                return None
        obj = next(
            (getattr(obj, a) for a in ("secured_conn", "conn", "stream", "read_write_closer") if hasattr(obj, a)), None
        )
    return None


def _ip_port(addr: multiaddr.Multiaddr) -> tuple[str, str, int] | None:
    """("ip4" or "ip6", ip, tcp port) of a TCP multiaddr."""
    for proto in ("ip4", "ip6"):
        try:
            ip = addr.value_for_protocol(proto)
            port = addr.value_for_protocol("tcp")
        except Exception:
            continue
        if ip and port:
            return proto, str(ip), int(port)
    return None


def _strip_p2p(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    try:
        value = addr.value_for_protocol("p2p")
    except Exception:
        value = None
    return addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{value}")) if value else addr


def _status_name(code: int) -> str:
    try:
        return StatusCode(code).name
    except ValueError:
        return f"status {code}"


def _short(peer: ID | str) -> str:
    text = peer.to_base58() if isinstance(peer, ID) else peer
    return f"{text[:12]}…"


async def _close(stream: INetStream | None, *, reset: bool = False) -> None:
    if stream is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        try:
            await (stream.reset() if reset else stream.close())
        except Exception:  # a dead stream fails to close in several ways; it is closed either way
            pass


# ------------------------------------------------------------ the service


class Nat:
    """AutoNAT, circuit relay v2 and DCUtR for one ``node.net.host.Host`` (see the module docstring)."""

    def __init__(
        self,
        host,
        *,
        relay_service: bool = True,
        force_reachability: Reachability | None = None,
        hole_punching: bool = True,
        config: NatConfig | None = None,
    ) -> None:
        self.host = host
        self.libp2p = host.libp2p
        self.swarm = self.libp2p.get_network()
        self._config = config or NatConfig()
        self._relay_service = relay_service
        self._forced: Reachability | None = force_reachability
        self._hole_punching = hole_punching
        self.relay = _Relay(self)
        self.autonat = _AutoNAT(self)
        # dial_timeout bounds DCUtR's first, plain direct dial (to addresses a NAT drops silently) and each punch dial
        self.dcutr = _DCUtR(self.libp2p, dial_timeout=self._config.punch_dial_timeout_s)
        self._verdicts: dict[ID, _Verdict] = {}
        self._asked: dict[ID, float] = {}  # server → when we last asked (trio time)
        self._last_refusal = ""
        self._served_at: dict[ID, float] = {}  # AutoNAT requesters → when served (trio time)
        self._dialbacks = trio.Semaphore(8)
        self.held: dict[ID, _Held] = {}
        self._relay_backoff: dict[ID, float] = {}  # relay → trio time before which it is not asked
        self._relay_problem: dict[ID, str] = {}
        self._idle_since: dict[int, float] = {}  # id(relayed conn) → trio time it was first seen idle
        self._changed = trio.Event()  # a peer connected or left, or reachability changed
        self._nursery: trio.Nursery | None = None
        self._installed = False

    # ---------------------------------------------------------- wiring

    def install(self) -> None:
        """Register protocol handlers and the swarm hooks; before the host runs or right after."""
        if self._installed:
            return
        self._installed = True
        self.libp2p.set_stream_handler(AUTONAT_PROTOCOL_ID, self._serve_autonat)
        self.libp2p.set_stream_handler(STOP_PROTOCOL_ID, self.relay._handle_stop_stream)
        self._sync_handlers()
        self.swarm.register_notifee(_Notifee(self))
        # py-libp2p trims a peer's surplus connections as one is added, streams or not (module docstring)
        self.swarm._trim_connections = lambda peer_id: None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the relay and DCUtR services and the AutoNAT, reservation and drain loops."""
        self.install()
        async with background_trio_service(self.relay), trio.open_nursery() as nursery:
            if self.hole_punching:
                await nursery.start(self._run_dcutr)
            self._nursery = nursery
            nursery.start_soon(self._autonat_loop)
            nursery.start_soon(self._reservation_loop)
            nursery.start_soon(self._drain_loop)
            task_status.started(self)

    async def _run_dcutr(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dcutr):
            task_status.started()
            await trio.sleep_forever()

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
        return self._hole_punching

    @hole_punching.setter
    def hole_punching(self, on: bool) -> None:
        self._hole_punching = on
        self._sync_handlers()

    @property
    def config(self) -> NatConfig:
        return self._config

    @config.setter
    def config(self, config: NatConfig) -> None:
        self._config = config
        self.relay.limits = self.relay.resource_manager.limits = _relay_limits(config)
        self.dcutr.dial_timeout = config.punch_dial_timeout_s

    def _sync_handlers(self) -> None:
        """The hop and DCUtR protocols are offered only while relay_service and hole_punching are on."""
        if not self._installed:
            return
        for on, protocol, handler in (
            (self._relay_service, HOP_PROTOCOL_ID, self.relay._handle_hop_stream),
            (self._hole_punching, DCUTR_PROTOCOL_ID, self.dcutr._handle_dcutr_stream),
        ):
            if on:
                self.libp2p.set_stream_handler(protocol, handler)
            else:
                self.libp2p.remove_stream_handler(protocol)

    def set_reachability(self, value: Reachability | None) -> None:
        """Pin the reachability (tests; operators who know), or ``None`` to let AutoNAT decide."""
        self._forced = value
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---------------------------------------------------------- reachability

    @property
    def reachability(self) -> Reachability:
        return self._assess()[0]

    @property
    def reason(self) -> str:
        return self._assess()[1]

    @property
    def hop_enabled(self) -> bool:
        return self._relay_service and self.reachability != "private"

    def _fresh_verdicts(self) -> dict[ID, _Verdict]:
        now = trio.current_time()
        return {p: v for p, v in self._verdicts.items() if now - v.at <= self.config.verdict_ttl_s}

    def _assess(self) -> tuple[Reachability, str]:
        if self._forced is not None:
            return self._forced, f"set to {self._forced} by configuration"
        verdicts = self._fresh_verdicts()
        ok = {p: v for p, v in verdicts.items() if v.ok}
        failed = {p: v for p, v in verdicts.items() if not v.ok}
        if ok and len(ok) >= len(failed):
            addrs = sorted({v.addr for v in ok.values()})
            peers = "1 peer" if len(ok) == 1 else f"{len(ok)} peers"
            extra = f" ({len(failed)} could not)" if failed else ""
            return "public", f"{peers} dialled back {', '.join(addrs)}{extra}"
        if failed:
            if len(failed) == 1:
                peer, verdict = next(iter(failed.items()))
                return "private", f"dial-back from {_short(peer)} to {verdict.addr} failed"
            return "private", f"dial-back from {len(failed)} peers failed ({len(ok)} succeeded)"
        if not self._asked:
            return "unknown", "no AutoNAT server asked yet"
        detail = f" (last: {self._last_refusal})" if self._last_refusal else ""
        return "unknown", f"no peer has answered an AutoNAT request yet{detail}"

    def observed_addrs(self) -> list[str]:
        """Addresses AutoNAT servers reached us at, beyond our listen addresses; only while public."""
        if self.reachability != "public":
            return []
        own = {str(a) for a in self.libp2p.get_transport_addrs()}
        found = {v.addr for v in self._fresh_verdicts().values() if v.ok}
        return sorted(a for a in found if a not in own)

    def _dialback_candidates(self) -> list[multiaddr.Multiaddr]:
        """The addresses we ask AutoNAT servers to dial (module docstring)."""
        listen = [a for a in self.libp2p.get_transport_addrs() if "/p2p-circuit" not in str(a)]
        ports: set[tuple[str, int]] = set()
        out: list[multiaddr.Multiaddr] = []
        for addr in listen:
            parsed = _ip_port(addr)
            if parsed is None:
                continue
            proto, ip, port = parsed
            ports.add((proto, port))
            if ip not in ("0.0.0.0", "::"):
                out.append(_strip_p2p(addr))
        ips: set[str] = set()
        for conns in list(self.swarm.connections.values()):
            for conn in conns:
                if not _is_relayed(conn):
                    ip = _local_ip(conn)
                    if ip:
                        ips.add(ip)
        manager = getattr(self.libp2p, "_observed_addr_manager", None)
        if manager is not None:
            for addr in manager.addrs(min_observers=1):
                parsed = _ip_port(addr)
                if parsed:
                    ips.add(parsed[1])
        for ip in sorted(ips):
            proto = "ip6" if ":" in ip else "ip4"
            for family, port in sorted(ports):
                if family == proto:
                    out.append(multiaddr.Multiaddr(f"/{proto}/{ip}/tcp/{port}"))
        seen: set[str] = set()
        unique = []
        for addr in out:
            if str(addr) not in seen:
                seen.add(str(addr))
                unique.append(addr)
        return unique[:8]

    async def _autonat_loop(self) -> None:
        while True:
            changed = self._changed
            if self._forced is None:
                await self._probe()
            known = self.reachability != "unknown"
            with trio.move_on_after(self.config.autonat_interval_s if known else self.config.autonat_retry_s):
                await changed.wait()
            await trio.sleep(1.0)  # let identify finish with a new peer (protocols, observed address)

    async def _probe(self) -> None:
        now = trio.current_time()
        c = self.config
        self._verdicts = self._fresh_verdicts()
        self._asked = {p: t for p, t in self._asked.items() if now - t < max(c.verdict_ttl_s, c.autonat_interval_s)}
        known = self.reachability != "unknown"
        recent = sum(1 for v in self._verdicts.values() if now - v.at < c.autonat_interval_s)
        if known and recent >= c.autonat_servers:
            return  # enough fresh answers; new peers are asked once some grow old
        due = c.autonat_interval_s if known else c.autonat_retry_s
        servers = []
        for peer in self._direct_peers():
            if now - self._asked.get(peer, -1e9) < due:
                continue
            protocols = self._protocols(peer)
            if protocols is not None and AUTONAT_PROTOCOL_ID not in protocols:
                continue
            servers.append(peer)
        if not servers:
            return
        candidates = [a.to_bytes() for a in self._dialback_candidates()]
        if not candidates:
            self._last_refusal = "we have no TCP listen address to be dialled at"
            return
        async with trio.open_nursery() as nursery:
            for peer in servers[: self.config.autonat_servers]:
                self._asked[peer] = now
                nursery.start_soon(self._ask, peer, candidates)

    async def _ask(self, server: ID, candidates: list[bytes]) -> None:
        before = self.reachability
        try:
            status, addr = await self.autonat.query_server(
                server, addrs=candidates, timeout=self.config.autonat_timeout_s
            )
        except Exception as err:  # no answer: not a verdict
            self._last_refusal = f"{_short(server)} did not answer ({err.__class__.__name__})"
            log.debug("AutoNAT request to %s failed: %s", _short(server), err)
            return
        finally:
            self.autonat.dial_results.pop(server, None)  # py-libp2p's own tally, unused here (it would only grow)
        if status == AutoNATMessage.OK:
            text = str(multiaddr.Multiaddr(addr)) if addr else "?"
            self._verdicts[server] = _Verdict(True, text, trio.current_time())
        elif status == AutoNATMessage.E_DIAL_ERROR:
            asked = ", ".join(str(multiaddr.Multiaddr(a)) for a in candidates[:2])
            self._verdicts[server] = _Verdict(False, asked, trio.current_time())
        else:
            self._last_refusal = f"{_short(server)} refused: {AutoNATMessage.ResponseStatus.Name(status)}"
        after = self.reachability
        if after != before:
            log.info("reachability: %s (%s)", after, self.reason)
            self._poke()

    async def _serve_autonat(self, stream: INetStream) -> None:
        """The AutoNAT server: one request per peer per 10 s, 8 dial-backs at once."""
        peer = stream.muxed_conn.peer_id
        now = trio.current_time()
        try:
            if now - self._served_at.get(peer, -1e9) < 10.0:
                await _close(stream, reset=True)
                return
            try:
                self._dialbacks.acquire_nowait()
            except trio.WouldBlock:
                await _close(stream, reset=True)
                return
            try:
                self._served_at[peer] = now
                if len(self._served_at) > 4096:
                    self._served_at = {p: t for p, t in self._served_at.items() if now - t < 10.0}
                with trio.fail_after(30):
                    await self.autonat.handle_stream(stream)
            finally:
                self._dialbacks.release()
        except Exception as err:
            log.debug("AutoNAT request from %s ended: %s", _short(peer), err)
            await _close(stream, reset=True)

    async def dial_back(self, peer: ID, addr: multiaddr.Multiaddr) -> bool:
        """Whether a fresh TCP connection to ``addr`` reaches ``peer`` (Noise proves its key); closed after."""
        if "/p2p-circuit" in str(addr) or _ip_port(addr) is None:
            return False
        transport = self.swarm.transport_manager.transport_for_dialing(addr)
        if transport is None:
            return False
        raw = None
        try:
            with trio.fail_after(self.config.dialback_timeout_s):
                raw = await transport.dial(_strip_p2p(addr))
                secured = await self.swarm.upgrader.upgrade_security(raw, True, peer)
                return secured.get_remote_peer() == peer
        except Exception as err:  # dial errors, handshake failures, the deadline
            log.debug("dial-back to %s at %s failed: %s", _short(peer), addr, err)
            return False
        finally:
            if raw is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await raw.close()
                    except Exception:
                        pass

    # ---------------------------------------------------------- connections

    def _conns(self, peer: ID) -> list[INetConn]:
        return [c for c in self.swarm.connections.get(peer, []) if not c.is_closed]

    def _direct_peers(self) -> list[ID]:
        me = self.libp2p.get_id()
        return [p for p in list(self.swarm.connections) if p != me and any(not _is_relayed(c) for c in self._conns(p))]

    def _protocols(self, peer: ID) -> set[str] | None:
        """The peer's protocols from identify, or None if not known yet."""
        try:
            protocols = self.libp2p.get_peerstore().get_protocols(peer)
        except Exception:
            return None
        return {str(p) for p in protocols} if protocols else None

    def connection_kind(self, peer_id: str) -> Literal["direct", "relayed"] | None:
        conns = self._conns(ID.from_base58(peer_id))
        if not conns:
            return None
        return "relayed" if all(_is_relayed(c) for c in conns) else "direct"

    async def wait_direct(self, peer_id: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a direct connection to ``peer_id`` (asking DCUtR for one); whether one exists.

        False at once when not connected at all. New streams opened after True use
        the direct connection.
        """
        peer = ID.from_base58(peer_id)
        kicked = False
        with trio.move_on_after(timeout_s):
            while True:
                kind = self.connection_kind(peer_id)
                if kind == "direct":
                    return True
                if kind is None:
                    return False
                if not kicked and self.hole_punching and self._nursery is not None:
                    kicked = True
                    self._nursery.start_soon(self._punch, peer)
                await trio.sleep(0.1)
        return self.connection_kind(peer_id) == "direct"

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
            while self._protocols(peer) is None:  # identify not done yet
                await trio.sleep(0.1)
        candidates = [
            a
            for a in self.libp2p.get_peerstore().addrs(peer)
            if "/p2p-circuit" not in str(a) and not addresses.is_wildcard(str(a))
        ]
        for addr in sorted(candidates, key=lambda a: addresses.dial_rank(str(a))):
            if self.connection_kind(peer.to_base58()) != "relayed" or trio.current_time() > deadline:
                return
            with trio.move_on_after(self.config.punch_dial_timeout_s):
                try:
                    await self.swarm.dial_addr(_strip_p2p(addr), peer)
                    log.debug("direct connection to %s at %s after identify", _short(peer), addr)
                    return
                except Exception as err:  # py-libp2p's dial errors have no common base
                    log.debug("direct dial to %s at %s failed: %s", _short(peer), addr, one_line(err, with_type=True))

    async def _punch(self, peer: ID) -> None:
        try:
            await self.dcutr.initiate_hole_punch(peer)
        except Exception as err:
            log.debug("hole punch to %s failed: %s", _short(peer), err)

    async def _drain_loop(self) -> None:
        """Close a peer's relayed connections once it has a direct one and they are idle (module docstring)."""
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            idle: dict[int, float] = {}
            for peer in list(self.swarm.connections):
                conns = self._conns(peer)
                if all(_is_relayed(c) for c in conns):
                    continue
                for conn in conns:
                    if not _is_relayed(conn) or _busy(conn):
                        continue
                    since = idle[id(conn)] = self._idle_since.get(id(conn), now)
                    if now - since >= 2.0:
                        log.debug("closing the relayed connection to %s: a direct one took over", _short(peer))
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            try:
                                await conn.close()
                            except Exception:
                                pass
            self._idle_since = idle

    # ---------------------------------------------------------- dialling circuits

    async def dial(self, addr: str) -> None:
        """Connect to ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>`` through the relay.

        Returns at once if the peer is connected already. Raises ``PeerUnreachable``.
        """
        try:
            ma = multiaddr.Multiaddr(addr)
            text = str(ma)
            relay_part, sep, rest = text.partition("/p2p-circuit")
            if not sep or not rest.startswith("/p2p/") or "/p2p-circuit" in rest:
                raise ValueError("not …/p2p-circuit/p2p/<peer id>")
            dest = ID.from_base58(rest[len("/p2p/") :].strip("/"))
            relay_ma = multiaddr.Multiaddr(relay_part)
            relay = ID.from_base58(relay_ma.value_for_protocol("p2p"))
        except Exception as err:  # multiaddr raises several types for bad input
            raise PeerUnreachable(
                f"{addr!r} is not a circuit address …/p2p/<relay>/p2p-circuit/p2p/<peer> ({err})"
            ) from None
        if dest == self.libp2p.get_id():
            raise PeerUnreachable(f"{addr} is our own address")
        if relay == dest:
            raise PeerUnreachable(f"{addr} relays a peer through itself")
        if self._conns(dest):
            return
        if not any(not _is_relayed(c) for c in self._conns(relay)):
            if _ip_port(relay_ma) is None and not relay_part.startswith(("/dns", "/ip")):
                raise PeerUnreachable(f"not connected to relay {_short(relay)} and {addr} has no address for it")
            await self.host.connect(relay_part)  # PeerUnreachable as it is
        stream = None
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                try:
                    stream = await self.libp2p.new_stream(relay, [HOP_PROTOCOL_ID])
                except Exception as err:  # py-libp2p's stream errors have no common base
                    raise PeerUnreachable(f"{_short(relay)} does not relay: {one_line(err, with_type=True)}") from None
                await write_delimited_msg(
                    stream, HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=dest.to_bytes()))
                )
                reply = await read_delimited_msg(stream, HopMessage)
                code = reply.status if reply.HasField("status") else StatusCode.OK
                if reply.type != HopMessage.STATUS or code != StatusCode.OK:
                    raise PeerUnreachable(
                        f"relay {_short(relay)} would not connect us to {_short(dest)}: {_status_name(code)}"
                    )
                raw = RawConnection(
                    stream=stream,
                    initiator=True,
                    connection_type=ConnectionType.RELAYED,
                    addresses=[multiaddr.Multiaddr(f"/p2p/{relay.to_base58()}/p2p-circuit/p2p/{dest.to_base58()}")],
                )
                await self.libp2p.upgrade_outbound_connection(raw, dest)
                stream = None  # the connection owns it now (identify starts as it is added)
        except PeerUnreachable:
            await _close(stream, reset=True)
            raise
        except trio.TooSlowError:
            await _close(stream, reset=True)
            raise PeerUnreachable(
                f"no circuit to {_short(dest)} through relay {_short(relay)} within {self.config.dial_timeout_s:.0f}s"
            ) from None
        except Exception as err:  # stream, protocol and upgrade errors have no common base
            await _close(stream, reset=True)
            raise PeerUnreachable(
                f"no circuit to {_short(dest)} through relay {_short(relay)}: {one_line(err, with_type=True)}"
            ) from None

    # ---------------------------------------------------------- reservations

    def circuit_addrs(self) -> list[str]:
        """``<relay addr>/p2p/<relay>/p2p-circuit`` for every reservation we hold (no /p2p/<us> suffix)."""
        now = time.time()
        out = []
        for relay, held in self.held.items():
            if held.expire > now:
                out.extend(f"{a}/p2p/{relay.to_base58()}/p2p-circuit" for a in held.addrs)
        return out

    async def _reservation_loop(self) -> None:
        while True:
            changed = self._changed
            try:
                await self._keep_reservations()
            except Exception:  # a bug here must not stop the node; it is logged with its traceback
                log.exception("reservation upkeep failed")
            with trio.move_on_after(10.0):
                await changed.wait()
            await trio.sleep(0.5)

    async def _keep_reservations(self) -> None:
        now = time.time()
        direct = set(self._direct_peers())
        for relay in list(self.held):
            if relay not in direct or self.held[relay].expire <= now:
                why = "expired" if relay in direct else "disconnected"
                log.info("lost the reservation on relay %s (%s)", _short(relay), why)
                del self.held[relay]
        if self.reachability != "private":
            if self.held:
                log.info("not private any more: letting %d reservation(s) lapse", len(self.held))
                self.held.clear()
            return
        for relay, held in list(self.held.items()):
            if held.expire - now < (held.expire - held.granted_at) / 2:
                await self._reserve(relay)
        if len(self.held) >= self.config.max_relays:
            return
        clock = trio.current_time()
        self._relay_backoff = {r: t for r, t in self._relay_backoff.items() if t > clock}
        self._relay_problem = {r: p for r, p in self._relay_problem.items() if r in self._relay_backoff}
        candidates = []
        for peer in direct:
            if peer in self.held or self._relay_backoff.get(peer, 0) > clock:
                continue
            protocols = self._protocols(peer)
            if protocols is None or HOP_PROTOCOL_ID not in protocols:
                continue
            outbound = any(getattr(c, "direction", "") == "outbound" and not _is_relayed(c) for c in self._conns(peer))
            candidates.append((not outbound, peer.to_base58(), peer))
        for _, _, peer in sorted(candidates):
            if len(self.held) >= self.config.max_relays:
                break
            await self._reserve(peer)

    async def _reserve(self, relay: ID) -> bool:
        stream = None
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                try:
                    stream = await self.libp2p.new_stream(relay, [HOP_PROTOCOL_ID])
                except Exception as err:  # py-libp2p's stream errors have no common base
                    raise PeerUnreachable(f"{_short(relay)} does not relay: {one_line(err, with_type=True)}") from None
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                reply = await read_delimited_msg(stream, HopMessage)
            code = reply.status if reply.HasField("status") else StatusCode.OK
            if reply.type != HopMessage.STATUS or code != StatusCode.OK or not reply.HasField("reservation"):
                raise PeerUnreachable(f"refused: {_status_name(code)}")
        except Exception as err:
            problem = str(err) if isinstance(err, PeerUnreachable) else f"failed: {one_line(err, with_type=True)}"
            log.debug("relay %s %s", _short(relay), problem)
            self._relay_problem[relay] = problem
            self._relay_backoff[relay] = trio.current_time() + self.config.relay_backoff_s
            self.held.pop(relay, None)
            return False
        finally:
            await _close(stream)
        limit = None
        if reply.HasField("limit") and (reply.limit.duration or reply.limit.data):
            limit = (int(reply.limit.duration), int(reply.limit.data))
        renewed = relay in self.held
        self.held[relay] = _Held(
            expire=int(reply.reservation.expire),
            granted_at=time.time(),
            addrs=self._relay_addrs(relay, list(reply.reservation.addrs)),
            limit=limit,
        )
        self._relay_problem.pop(relay, None)
        if not renewed:
            log.info("reserved a slot on relay %s: %s", _short(relay), ", ".join(self.circuit_addrs()))
        return True

    def _relay_addrs(self, relay: ID, given: list[bytes]) -> list[str]:
        """Where others reach the relay: the address we dialled it at first, then those it gave."""
        out: list[str] = []
        for conn in self._conns(relay):
            if getattr(conn, "direction", "") == "outbound" and not _is_relayed(conn):
                try:
                    out.extend(str(_strip_p2p(a)) for a in conn.get_transport_addresses())
                except Exception:
                    pass
        for raw in given:
            try:
                out.append(str(_strip_p2p(multiaddr.Multiaddr(raw))))
            except Exception:
                continue
        seen: list[str] = []
        for addr in out:
            ok = "/p2p-circuit" not in addr and "/ip4/0.0.0.0/" not in addr and "/ip6/::/" not in addr
            if ok and addr not in seen:
                seen.append(addr)
        return seen[:4]

    # ---------------------------------------------------------- status

    def status(self) -> dict:
        now = time.time()
        peers = {}
        for peer in list(self.swarm.connections):
            kind = self.connection_kind(peer.to_base58())
            if kind:
                peers[peer.to_base58()] = kind
        reachability, reason = self._assess()
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
                for relay, held in self.held.items()
            ],
            "relay_problems": {r.to_base58(): p for r, p in self._relay_problem.items()},
            "served": self.relay.served(),
            "peers": peers,
        }


class _Notifee(INotifee):
    """Wakes the AutoNAT and reservation loops when peers come and go."""

    def __init__(self, nat: Nat) -> None:
        self.nat = nat

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.nat._poke()
        if _is_relayed(conn) and self.nat.hole_punching and self.nat._nursery is not None:
            self.nat._nursery.start_soon(self.nat._go_direct, conn.muxed_conn.peer_id)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self.nat._poke()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr) -> None:
        pass


# --------------------------------------------------------------- AutoNAT


class _AutoNAT(AutoNATService):
    """py-libp2p's AutoNAT with a real dial-back (module docstring); served by ``Nat._serve_autonat``."""

    def __init__(self, nat: Nat) -> None:
        super().__init__(nat.libp2p, serve=False, confirmations=1)
        self.nat = nat

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs[:4]:
            try:
                addr = multiaddr.Multiaddr(raw)
            except Exception:
                continue
            if await self.nat.dial_back(peer_id, addr):
                return bytes(raw)
        return None


# --------------------------------------------------------------- DCUtR


class _DCUtR(DCUtRProtocol):
    """py-libp2p's DCUtR, except that it does not close relayed connections (``Nat._drain_loop`` does)."""

    def _schedule_relay_close(self, peer_id: ID) -> None:
        pass

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        try:
            await super()._handle_dcutr_stream(stream)
        except Exception as err:
            log.debug("DCUtR stream from %s ended: %s", _short(stream.muxed_conn.peer_id), err)
            await _close(stream, reset=True)


# --------------------------------------------------------------- relay


def _relay_limits(c: NatConfig) -> RelayLimits:
    return RelayLimits(
        duration=c.circuit_duration_s,
        data=c.circuit_data_bytes,
        max_circuit_conns=c.max_circuits_per_peer,
        max_reservations=c.max_reservations,
        reservation_ttl=c.reservation_ttl_s,
    )


class _Relay(CircuitV2Protocol):
    """Circuit relay v2: our hop side (limits in ``NatConfig``) and py-libp2p's stop side, guarded."""

    def __init__(self, nat: Nat) -> None:
        # allow_hop=False: Nat registers the hop handler itself, while relay_service is on
        super().__init__(nat.libp2p, limits=_relay_limits(nat.config), allow_hop=False)
        self.nat = nat
        self.circuits: list[_Circuit] = []
        self.reservation_ip: dict[ID, str] = {}
        self.relayed_inbound = 0

    def served(self) -> dict:
        self._prune()
        peers = sorted(p.to_base58() for p in self.resource_manager._reservations)
        return {
            "reservations": len(peers),
            "peers": peers,
            "circuits": len(self.circuits),
            "circuit_bytes": sum(c.bytes for c in self.circuits),
        }

    def _prune(self) -> None:
        """Forget reservations that expired or whose peer left (py-libp2p keeps their slots until expiry)."""
        book = self.resource_manager._reservations
        now = time.time()
        connected = self.nat.swarm.connections
        for peer in [p for p, r in book.items() if r.expires_at < now or not connected.get(p)]:
            del book[peer]
            self.reservation_ip.pop(peer, None)

    async def _status(self, stream: INetStream, code: StatusCode, *, limit: bool = False, reservation=None) -> None:
        msg = HopMessage(type=HopMessage.STATUS, status=to_proto_status(code))
        if reservation is not None:
            msg.reservation.CopyFrom(reservation)
        if limit and (self.limits.duration or self.limits.data):
            msg.limit.CopyFrom(Limit(duration=self.limits.duration, data=self.limits.data))
        with trio.fail_after(10):
            await write_delimited_msg(stream, msg)

    async def _handle_hop_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            if _is_relayed_stream(stream) or not self.nat.hop_enabled:
                await self._status(stream, StatusCode.PERMISSION_DENIED)
                await _close(stream)
                return
            with trio.fail_after(10):
                msg = await read_delimited_msg(stream, HopMessage)
            try:
                ip = str(stream.get_remote_address()[0])
            except Exception:
                ip = "?"
            if msg.type == HopMessage.RESERVE:
                await self._reserve(stream, peer, ip)
                await _close(stream)
            elif msg.type == HopMessage.CONNECT:
                await self._connect(stream, peer, msg, ip)
            else:
                await self._status(stream, StatusCode.UNEXPECTED_MESSAGE)
                await _close(stream)
        except Exception as err:
            log.debug("hop stream from %s ended: %s: %s", _short(peer), err.__class__.__name__, err)
            await _close(stream, reset=True)

    async def _reserve(self, stream: INetStream, peer: ID, ip: str) -> None:
        """A RESERVE, always for the peer that sent it (py-libp2p honoured any peer id in it)."""
        self._prune()
        book = self.resource_manager._reservations
        c = self.nat.config
        if peer in book:
            self.resource_manager.refresh_reservation(peer)
        elif len(book) >= c.max_reservations:
            await self._status(stream, StatusCode.RESERVATION_REFUSED)
            return
        elif sum(1 for i in self.reservation_ip.values() if i == ip) >= c.max_reservations_per_ip:
            await self._status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return
        else:
            self.resource_manager.create_reservation(peer)
            self.reservation_ip[peer] = ip
            log.debug("relay: reserved a slot for %s", _short(peer))
        reservation = book[peer]
        me = self.host.get_id().to_base58()
        addrs = [str(_strip_p2p(a)) for a in self.host.get_addrs()] + self.nat.observed_addrs()
        reservation.addrs = [
            multiaddr.Multiaddr(f"{a}/p2p/{me}").to_bytes()
            for a in dict.fromkeys(addrs)
            if "/p2p-circuit" not in a and "/ip4/0.0.0.0/" not in a and "/ip6/::/" not in a
        ][:8]
        await self._status(stream, StatusCode.OK, limit=True, reservation=reservation.to_proto())

    async def _connect(self, stream: INetStream, source: ID, msg: HopMessage, ip: str) -> None:
        c = self.nat.config
        if not msg.HasField("peer"):
            await self._status(stream, StatusCode.MALFORMED_MESSAGE)
            await _close(stream)
            return
        dest = ID(msg.peer.id)
        reservation = self.resource_manager.get_reservation(dest)  # None if expired or the peer left
        refusal = None
        if reservation is None:
            refusal = StatusCode.NO_RESERVATION
        elif (
            len(self.circuits) >= c.max_circuits
            or sum(1 for x in self.circuits if x.dest == dest) >= c.max_circuits_per_peer
            or sum(1 for x in self.circuits if x.source == source) >= c.max_circuits_per_source
            or sum(1 for x in self.circuits if x.ip == ip) >= c.max_circuits_per_ip
        ):
            refusal = StatusCode.RESOURCE_LIMIT_EXCEEDED
        if refusal is not None:
            await self._status(stream, refusal)
            await _close(stream)
            return
        circuit = _Circuit(source, dest, ip)
        self.circuits.append(circuit)  # counted before the first await, so concurrent CONNECTs see it
        dst = None
        try:
            try:
                with trio.fail_after(10):
                    dst = await self.host.new_stream(dest, [STOP_PROTOCOL_ID])
                    stop = StopMessage(type=StopMessage.CONNECT, peer=CircuitPeerId(id=source.to_bytes()))
                    if self.limits.duration or self.limits.data:
                        stop.limit.CopyFrom(Limit(duration=self.limits.duration, data=self.limits.data))
                    await write_delimited_msg(dst, stop)
                    reply = await read_delimited_msg(dst, StopMessage)
                code = reply.status if reply.HasField("status") else StatusCode.OK
                if code != StatusCode.OK:
                    raise ConnectionError(f"the destination answered {_status_name(code)}")
            except Exception as err:
                log.debug("relay: no circuit %s → %s: %s", _short(source), _short(dest), err)
                await self._status(stream, StatusCode.CONNECTION_FAILED)
                await _close(stream, reset=True)
                return
            await self._status(stream, StatusCode.OK, limit=True)
            await self._splice(stream, dst, circuit)
        finally:
            self.circuits.remove(circuit)
            await _close(stream, reset=True)
            await _close(dst, reset=True)

    async def _splice(self, a: INetStream, b: INetStream, circuit: _Circuit) -> None:
        """Copy both ways until either side ends or a limit is reached; then the other side gets 5 s."""
        budget = [self.limits.data] if self.limits.data > 0 else None
        ended = trio.Event()

        async def pipe(src: INetStream, dst: INetStream) -> None:
            try:
                while True:
                    try:
                        data = await src.read(READ_CHUNK)
                    except Exception:  # EOF or reset
                        data = b""
                    if not data:
                        break
                    if budget is not None:
                        budget[0] -= len(data)
                        if budget[0] < 0:
                            log.info("relay: a circuit to %s reached its data limit", _short(circuit.dest))
                            break
                    with trio.fail_after(self.nat.config.relay_write_timeout_s):
                        await dst.write(data)
                    circuit.bytes += len(data)
            except Exception as err:  # write errors, the write deadline
                log.debug("relay: a circuit %s → %s broke: %s", _short(circuit.source), _short(circuit.dest), err)
            finally:
                ended.set()

        duration = self.limits.duration if self.limits.duration > 0 else float("inf")
        with trio.move_on_after(duration):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe, a, b)
                nursery.start_soon(pipe, b, a)
                await ended.wait()
                # one side ended: pass the end on (FIN both ways), let the rest drain, then stop
                await _close(a)
                await _close(b)
                with trio.move_on_after(5):
                    while len(nursery.child_tasks) > 0:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()

    async def _handle_stop_stream(self, stream: INetStream) -> None:
        """py-libp2p's stop side (upgrade an inbound circuit), guarded and capped."""
        peer = stream.muxed_conn.peer_id
        relayed = sum(1 for conns in list(self.nat.swarm.connections.values()) for c in conns if _is_relayed(c))
        if relayed + self.relayed_inbound >= self.nat.config.max_relayed_inbound:
            try:
                await self._send_stop_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "too many relayed connections")
            finally:
                await _close(stream, reset=True)
            return
        self.relayed_inbound += 1
        try:
            with trio.fail_after(30):
                await super()._handle_stop_stream(stream)
        except Exception as err:
            log.debug("relayed connection through %s failed: %s", _short(peer), err)
            await _close(stream, reset=True)
        finally:
            self.relayed_inbound -= 1
