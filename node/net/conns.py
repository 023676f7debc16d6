"""Reading py-libp2p's connection table: live connections, relayed or direct, a peer's protocols, local IPs.

Small helpers that the host (``connection_kind``) and NAT traversal
(``node.net.autonat``, ``node.net.relay``, ``node.net.dcutr``) share, plus
``Changes``, the wake-up those services give each other when peers come and
go. py-libp2p 0.8.1 has no accessors for most of this, so several helpers walk
its objects defensively.
"""

from __future__ import annotations

from typing import Literal

import multiaddr
import trio
from libp2p.abc import INetConn
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID

ConnectionKind = Literal["direct", "relayed"]


class Changes:
    """Something changed (a peer connected or left, reachability moved): wakes every task waiting.

    ``event()`` is the event to wait on, taken before looking at the state;
    ``poke()`` sets it and starts a fresh one.
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def event(self) -> trio.Event:
        return self._event

    def poke(self) -> None:
        self._event.set()
        self._event = trio.Event()


def is_relayed(conn: INetConn) -> bool:
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
    except Exception:
        pass
    try:
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return False


def live_conns(swarm, peer: ID) -> list[INetConn]:
    """The swarm's open connections to ``peer``."""
    return [c for c in swarm.connections.get(peer, []) if not c.is_closed]


def connection_kind(swarm, peer: ID) -> ConnectionKind | None:
    """ "direct" if any open connection to ``peer`` is, "relayed" if all are, None when not connected."""
    conns = live_conns(swarm, peer)
    if not conns:
        return None
    return "relayed" if all(is_relayed(c) for c in conns) else "direct"


def direct_peers(libp2p) -> list[ID]:
    """Peers (not ourselves) with at least one open direct connection."""
    me = libp2p.get_id()
    swarm = libp2p.get_network()
    return [p for p in list(swarm.connections) if p != me and any(not is_relayed(c) for c in live_conns(swarm, p))]


def protocols(libp2p, peer: ID) -> set[str] | None:
    """The peer's protocols from identify, or None if not known yet."""
    try:
        found = libp2p.get_peerstore().get_protocols(peer)
    except Exception:
        return None
    return {str(p) for p in found} if found else None


def local_ip(conn: INetConn) -> str | None:
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


def ip_port(addr: multiaddr.Multiaddr) -> tuple[str, str, int] | None:
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


def strip_p2p(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """``addr`` without its ``/p2p/<peer id>``."""
    try:
        value = addr.value_for_protocol("p2p")
    except Exception:
        value = None
    return addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{value}")) if value else addr


def short(peer: ID | str) -> str:
    """A peer id for log lines: its first 12 characters."""
    text = peer.to_base58() if isinstance(peer, ID) else peer
    return f"{text[:12]}…"
