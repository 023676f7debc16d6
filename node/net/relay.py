"""Circuit relay v2 for one host: relaying for others, our reservations and circuits. Part of ``node.net.nat``.

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

``Relay`` is the protocol service (hop and stop); ``RelayClient`` keeps our
reservations (``run``) and dials circuits (``dial``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.connection_types import ConnectionType
from libp2p.host.autonat.autonat import _is_relayed_stream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from node.errors import PeerUnreachable, one_line
from node.net.autonat import Reachability
from node.net.config import NatConfig
from node.net.conns import Changes, direct_peers, ip_port, is_relayed, live_conns, protocols, short, strip_p2p
from node.net.guards import ANY_FAULT, close_stream, run_guarded

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024


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


def _status_name(code: int) -> str:
    try:
        return StatusCode(code).name
    except ValueError:
        return f"status {code}"


# ------------------------------------------------------------ relaying for others


def relay_limits(c: NatConfig) -> RelayLimits:
    """py-libp2p's relay limits from ours (its reservation book enforces some of them)."""
    return RelayLimits(
        duration=c.circuit_duration_s,
        data=c.circuit_data_bytes,
        max_circuit_conns=c.max_circuits_per_peer,
        max_reservations=c.max_reservations,
        reservation_ttl=c.reservation_ttl_s,
    )


class Relay(CircuitV2Protocol):
    """Circuit relay v2: our hop side (limits in ``NatConfig``) and py-libp2p's stop side, guarded.

    ``hop_enabled`` says whether we relay now (``node.net.nat.Nat``: the relay
    service is on and we are not known to be private); ``observed_addrs`` are
    AutoNAT's confirmed addresses, handed to peers with their reservation.
    """

    def __init__(
        self,
        libp2p,
        config: NatConfig,
        *,
        hop_enabled: Callable[[], bool],
        observed_addrs: Callable[[], list[str]],
    ) -> None:
        # allow_hop=False: Nat registers the hop handler itself, while relay_service is on
        super().__init__(libp2p, limits=relay_limits(config), allow_hop=False)
        self.config = config
        self.swarm = libp2p.get_network()
        self.hop_enabled = hop_enabled
        self.observed_addrs = observed_addrs
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
        connected = self.swarm.connections
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
        await run_guarded(str(HOP_PROTOCOL_ID), self._hop, stream, faults=ANY_FAULT)

    async def _hop(self, stream: INetStream) -> None:
        if _is_relayed_stream(stream) or not self.hop_enabled():
            await self._status(stream, StatusCode.PERMISSION_DENIED)
            await close_stream(stream)
            return
        peer = stream.muxed_conn.peer_id
        with trio.fail_after(10):
            msg = await read_delimited_msg(stream, HopMessage)
        try:
            ip = str(stream.get_remote_address()[0])
        except Exception:
            ip = "?"
        if msg.type == HopMessage.RESERVE:
            await self._reserve(stream, peer, ip)
            await close_stream(stream)
        elif msg.type == HopMessage.CONNECT:
            await self._connect(stream, peer, msg, ip)
        else:
            await self._status(stream, StatusCode.UNEXPECTED_MESSAGE)
            await close_stream(stream)

    async def _reserve(self, stream: INetStream, peer: ID, ip: str) -> None:
        """A RESERVE, always for the peer that sent it (py-libp2p honoured any peer id in it)."""
        self._prune()
        book = self.resource_manager._reservations
        c = self.config
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
            log.debug("relay: reserved a slot for %s", short(peer))
        reservation = book[peer]
        me = self.host.get_id().to_base58()
        addrs = [str(strip_p2p(a)) for a in self.host.get_addrs()] + self.observed_addrs()
        reservation.addrs = [
            multiaddr.Multiaddr(f"{a}/p2p/{me}").to_bytes()
            for a in dict.fromkeys(addrs)
            if "/p2p-circuit" not in a and "/ip4/0.0.0.0/" not in a and "/ip6/::/" not in a
        ][:8]
        await self._status(stream, StatusCode.OK, limit=True, reservation=reservation.to_proto())

    async def _connect(self, stream: INetStream, source: ID, msg: HopMessage, ip: str) -> None:
        c = self.config
        if not msg.HasField("peer"):
            await self._status(stream, StatusCode.MALFORMED_MESSAGE)
            await close_stream(stream)
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
            await close_stream(stream)
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
                log.debug("relay: no circuit %s → %s: %s", short(source), short(dest), err)
                await self._status(stream, StatusCode.CONNECTION_FAILED)
                await close_stream(stream, reset=True)
                return
            await self._status(stream, StatusCode.OK, limit=True)
            await self._splice(stream, dst, circuit)
        finally:
            self.circuits.remove(circuit)
            await close_stream(stream, reset=True)
            await close_stream(dst, reset=True)

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
                            log.info("relay: a circuit to %s reached its data limit", short(circuit.dest))
                            break
                    with trio.fail_after(self.config.relay_write_timeout_s):
                        await dst.write(data)
                    circuit.bytes += len(data)
            except Exception as err:  # write errors, the write deadline
                log.debug("relay: a circuit %s → %s broke: %s", short(circuit.source), short(circuit.dest), err)
            finally:
                ended.set()

        duration = self.limits.duration if self.limits.duration > 0 else float("inf")
        with trio.move_on_after(duration):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe, a, b)
                nursery.start_soon(pipe, b, a)
                await ended.wait()
                # one side ended: pass the end on (FIN both ways), let the rest drain, then stop
                await close_stream(a)
                await close_stream(b)
                with trio.move_on_after(5):
                    while len(nursery.child_tasks) > 0:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()

    async def _handle_stop_stream(self, stream: INetStream) -> None:
        await run_guarded(str(STOP_PROTOCOL_ID), self._stop, stream, faults=ANY_FAULT)

    async def _stop(self, stream: INetStream) -> None:
        """py-libp2p's stop side (upgrade an inbound circuit), capped."""
        relayed = sum(1 for conns in list(self.swarm.connections.values()) for c in conns if is_relayed(c))
        if relayed + self.relayed_inbound >= self.config.max_relayed_inbound:
            try:
                await self._send_stop_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "too many relayed connections")
            finally:
                await close_stream(stream, reset=True)
            return
        self.relayed_inbound += 1
        try:
            with trio.fail_after(30):
                await super()._handle_stop_stream(stream)
        finally:
            self.relayed_inbound -= 1


# ------------------------------------------------------------ our reservations and circuits


class RelayClient:
    """Reservations on relays while we are private, and dialling peers through relays (module docstring).

    ``reachability`` is AutoNAT's verdict; ``connect`` dials a relay we are not
    connected to (``Host.connect``); ``changes`` wakes the reservation loop when
    peers come and go or the verdict changes.
    """

    def __init__(
        self,
        libp2p,
        config: NatConfig,
        changes: Changes,
        *,
        reachability: Callable[[], Reachability],
        connect: Callable[[str], Awaitable[object]],
    ) -> None:
        self.libp2p = libp2p
        self.swarm = libp2p.get_network()
        self.config = config
        self.changes = changes
        self.reachability = reachability
        self.connect = connect
        self.held: dict[ID, _Held] = {}
        self._relay_backoff: dict[ID, float] = {}  # relay → trio time before which it is not asked
        self._relay_problem: dict[ID, str] = {}

    def problems(self) -> dict[str, str]:
        """Why relays refused or failed us lately, by relay peer id."""
        return {r.to_base58(): p for r, p in self._relay_problem.items()}

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
        if live_conns(self.swarm, dest):
            return
        if not any(not is_relayed(c) for c in live_conns(self.swarm, relay)):
            if ip_port(relay_ma) is None and not relay_part.startswith(("/dns", "/ip")):
                raise PeerUnreachable(f"not connected to relay {short(relay)} and {addr} has no address for it")
            await self.connect(relay_part)  # PeerUnreachable as it is
        stream = None
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                try:
                    stream = await self.libp2p.new_stream(relay, [HOP_PROTOCOL_ID])
                except Exception as err:  # py-libp2p's stream errors have no common base
                    raise PeerUnreachable(f"{short(relay)} does not relay: {one_line(err, with_type=True)}") from None
                await write_delimited_msg(
                    stream, HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=dest.to_bytes()))
                )
                reply = await read_delimited_msg(stream, HopMessage)
                code = reply.status if reply.HasField("status") else StatusCode.OK
                if reply.type != HopMessage.STATUS or code != StatusCode.OK:
                    raise PeerUnreachable(
                        f"relay {short(relay)} would not connect us to {short(dest)}: {_status_name(code)}"
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
            await close_stream(stream, reset=True)
            raise
        except trio.TooSlowError:
            await close_stream(stream, reset=True)
            raise PeerUnreachable(
                f"no circuit to {short(dest)} through relay {short(relay)} within {self.config.dial_timeout_s:.0f}s"
            ) from None
        except Exception as err:  # stream, protocol and upgrade errors have no common base
            await close_stream(stream, reset=True)
            raise PeerUnreachable(
                f"no circuit to {short(dest)} through relay {short(relay)}: {one_line(err, with_type=True)}"
            ) from None

    def circuit_addrs(self) -> list[str]:
        """``<relay addr>/p2p/<relay>/p2p-circuit`` for every reservation we hold (no /p2p/<us> suffix)."""
        now = time.time()
        out = []
        for relay, held in self.held.items():
            if held.expire > now:
                out.extend(f"{a}/p2p/{relay.to_base58()}/p2p-circuit" for a in held.addrs)
        return out

    async def run(self) -> None:
        """Keep reservations while private (and none while not), until cancelled."""
        while True:
            changed = self.changes.event()
            try:
                await self._keep_reservations()
            except Exception:  # a bug here must not stop the node; it is logged with its traceback
                log.exception("reservation upkeep failed")
            with trio.move_on_after(10.0):
                await changed.wait()
            await trio.sleep(0.5)

    async def _keep_reservations(self) -> None:
        now = time.time()
        direct = set(direct_peers(self.libp2p))
        for relay in list(self.held):
            if relay not in direct or self.held[relay].expire <= now:
                why = "expired" if relay in direct else "disconnected"
                log.info("lost the reservation on relay %s (%s)", short(relay), why)
                del self.held[relay]
        if self.reachability() != "private":
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
            served = protocols(self.libp2p, peer)
            if served is None or HOP_PROTOCOL_ID not in served:
                continue
            outbound = any(
                getattr(c, "direction", "") == "outbound" and not is_relayed(c) for c in live_conns(self.swarm, peer)
            )
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
                    raise PeerUnreachable(f"{short(relay)} does not relay: {one_line(err, with_type=True)}") from None
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                reply = await read_delimited_msg(stream, HopMessage)
            code = reply.status if reply.HasField("status") else StatusCode.OK
            if reply.type != HopMessage.STATUS or code != StatusCode.OK or not reply.HasField("reservation"):
                raise PeerUnreachable(f"refused: {_status_name(code)}")
        except Exception as err:
            problem = str(err) if isinstance(err, PeerUnreachable) else f"failed: {one_line(err, with_type=True)}"
            log.debug("relay %s %s", short(relay), problem)
            self._relay_problem[relay] = problem
            self._relay_backoff[relay] = trio.current_time() + self.config.relay_backoff_s
            self.held.pop(relay, None)
            return False
        finally:
            await close_stream(stream)
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
            log.info("reserved a slot on relay %s: %s", short(relay), ", ".join(self.circuit_addrs()))
        return True

    def _relay_addrs(self, relay: ID, given: list[bytes]) -> list[str]:
        """Where others reach the relay: the address we dialled it at first, then those it gave."""
        out: list[str] = []
        for conn in live_conns(self.swarm, relay):
            if getattr(conn, "direction", "") == "outbound" and not is_relayed(conn):
                try:
                    out.extend(str(strip_p2p(a)) for a in conn.get_transport_addresses())
                except Exception:
                    pass
        for raw in given:
            try:
                out.append(str(strip_p2p(multiaddr.Multiaddr(raw))))
            except Exception:
                continue
        seen: list[str] = []
        for addr in out:
            ok = "/p2p-circuit" not in addr and "/ip4/0.0.0.0/" not in addr and "/ip6/::/" not in addr
            if ok and addr not in seen:
                seen.append(addr)
        return seen[:4]
