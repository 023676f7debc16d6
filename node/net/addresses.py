"""Which addresses a node tells others, in what order it dials them, and which it refuses.

A node listens on some addresses (``--listen``, often the wildcard
``/ip4/0.0.0.0/tcp/4001``) but must advertise addresses that *others* can
dial. The rules, in one place:

- A wildcard is expanded to the host's interface addresses with the bound
  port. ``0.0.0.0`` and ``::`` are never advertised: they mean "this machine"
  to whoever dials them, which is never the advertiser.
- Loopback and link-local addresses reach only the same host (or link), so
  they are advertised only when a node has nothing else (a node listening on
  127.0.0.1 alone: the single-machine market and the in-process tests).
- ``--announce`` replaces the direct addresses: a forwarded port on a home
  router, a cloud VM's public IP, a DNS name.
- Addresses peers observed us at (identify), once AutoNAT confirmed that we
  are reachable, are added; so are relay (``/p2p-circuit``) addresses when we
  are not.

The offer validator (``node.market.offers``) refuses any offer carrying a wildcard
address, so nodes that do not follow these rules cannot fill the book with
addresses nobody can dial.
"""

from __future__ import annotations

import ipaddress
import socket

import multiaddr
import psutil

from node.errors import ConfigError

WILDCARDS = frozenset({"0.0.0.0", "::"})
#: Protocols an advertised address may start with.
FIRST_PROTOCOLS = ("ip4", "ip6", "dns4", "dns6", "dns")
CIRCUIT = "/p2p-circuit"


def _parts(addr: str) -> list[str]:
    return addr.strip("/").split("/")


def host_of(addr: str) -> str:
    """The IP or DNS name at the start of ``addr`` ("" when there is none)."""
    parts = _parts(addr)
    return parts[1] if len(parts) > 1 and parts[0] in FIRST_PROTOCOLS else ""


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if _parts(addr)[0] not in ("ip4", "ip6"):
        return None
    try:
        return ipaddress.ip_address(host_of(addr).split("%")[0])
    except ValueError:
        return None


def is_wildcard(addr: str) -> bool:
    ip = _ip(addr)
    return ip is not None and ip.is_unspecified


def is_local(addr: str) -> bool:
    """Loopback or link-local: reachable only from this host (or this link)."""
    ip = _ip(addr)
    return ip is not None and not is_circuit(addr) and (ip.is_loopback or ip.is_link_local)


def is_private(addr: str) -> bool:
    """A private-range (RFC 1918, CGNAT, IPv6 ULA) address: reachable on its own network only."""
    ip = _ip(addr)
    return ip is not None and not is_circuit(addr) and any(ip in net for net in _PRIVATE if net.version == ip.version)


_PRIVATE = [
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]


def interface_ips() -> list[str]:
    """This host's IP addresses on every interface (loopback and link-local included)."""
    ips = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                ips.append(entry.address.split("%")[0])
    return ips


def expand(addr: str, ips: list[str] | None = None) -> list[str]:
    """``addr`` with a wildcard IP replaced by each interface address of its family."""
    if not is_wildcard(addr):
        return [addr]
    ips = interface_ips() if ips is None else ips
    family, _, rest = addr.strip("/").split("/", 2)
    same = [ip for ip in ips if (":" in ip) == (family == "ip6")]
    return [f"/{family}/{ip}/{rest}" for ip in same]


def dial_rank(addr: str) -> int:
    """Order in which to dial a peer's addresses: public, private, local, relayed."""
    if is_circuit(addr):
        return 3
    if is_local(addr):
        return 2
    if is_private(addr):
        return 1
    return 0


def advertised(
    listening: list[str],
    *,
    announce: tuple[str, ...] = (),
    observed: list[str] = (),
    circuits: list[str] = (),
    ips: list[str] | None = None,
) -> list[str]:
    """The addresses to advertise (without ``/p2p/<peer id>``), best first, no duplicates.

    ``listening`` are the bound transport addresses (wildcards allowed);
    ``announce`` replaces the direct ones when given; ``observed`` are confirmed
    observed addresses; ``circuits`` are relay addresses.
    """
    if announce:
        direct = list(announce)
    else:
        direct = [a for listen in listening for a in expand(listen, ips)] + list(observed)
        direct = [a for a in direct if not is_wildcard(a)]
        if any(not is_local(a) for a in direct):
            direct = [a for a in direct if not is_local(a)]
    ordered = sorted(dict.fromkeys(direct), key=dial_rank) + list(dict.fromkeys(circuits))
    return list(dict.fromkeys(ordered))


def address_problem(addr: str) -> str | None:
    """Why ``addr`` may not appear in an offer, or None.

    It must parse as a multiaddr starting with an IP or DNS name and carry no
    wildcard IP; relay addresses (``…/p2p/<relay>/p2p-circuit``) are fine.
    """
    try:
        multiaddr.Multiaddr(addr)
    except Exception:  # the multiaddr package raises several types for bad input
        return f"address {addr[:60]!r} is not a multiaddr"
    if _parts(addr)[0] not in FIRST_PROTOCOLS:
        return f"address {addr[:60]!r} does not start with /ip4, /ip6, /dns4 or /dns6"
    if is_wildcard(addr):
        return f"address {addr[:60]!r} is a wildcard, which nobody can dial"
    return None


def parse_announce(addr: str) -> str:
    """Check one ``--announce`` value: ``/ip4|ip6|dns4|dns6/<host>/tcp/<port>``; raises ``ConfigError``."""
    hint = "give e.g. /ip4/203.0.113.7/tcp/4001 or /dns4/gpu.example.org/tcp/4001"
    parts = _parts(addr)
    if len(parts) != 4 or parts[0] not in ("ip4", "ip6", "dns4", "dns6") or parts[2] != "tcp":
        raise ConfigError(f"--announce {addr!r} is not /ip4|ip6|dns4|dns6/<host>/tcp/<port>; {hint}")
    if not parts[3].isdigit() or not 0 < int(parts[3]) < 65536:
        raise ConfigError(f"--announce {addr!r} has no valid TCP port; {hint}")
    if problem := address_problem(addr):
        raise ConfigError(f"--announce: {problem}; {hint}")
    return "/" + "/".join(parts)


#: Addresses believed from one mDNS announcement or one DHT answer per peer; longer lists are cut.
MAX_ADDRS = 8


def dialable(addr: str) -> str | None:
    """``addr`` without ``/p2p/<id>`` if it is a TCP address someone could dial, else None.

    IP or DNS then TCP; no wildcard, multicast or broadcast IP, no port 0, no relay.
    """
    try:
        parts = list(multiaddr.Multiaddr(addr).items())
    except Exception:  # the multiaddr package raises several types for bad input
        return None
    if parts and parts[-1][0].name == "p2p":
        parts = parts[:-1]
    if len(parts) != 2 or parts[1][0].name != "tcp":
        return None
    (proto, host), (_, port) = parts
    if proto.name not in FIRST_PROTOCOLS or not 0 < int(port) < 65536:
        return None
    if proto.name in ("ip4", "ip6"):
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return None
        if ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255":
            return None
    return f"/{proto.name}/{host}/tcp/{port}"
