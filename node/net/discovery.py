"""Finding peers without a known address: mDNS on the LAN, and the Kademlia DHT.

``Discovery(host, mdns=True, dht_mode="client")`` runs both for one ``Host``:

- **mDNS** (``LanDiscovery``) announces the host on the local network and
  dials the llmarket peers it hears about, so ``serve``, ``request``,
  ``peers`` and ``gateway`` find each other without ``--bootstrap``.
- **DHT** (``DhtService``): py-libp2p's ``KadDHT`` on the host, in server mode
  on public and bootstrap nodes and client mode otherwise; ``find_peer``
  returns a peer's current addresses, ``provide``/``find_providers`` keep
  provider records keyed by a model's CID.
- ``wait_for_peer(timeout_s)`` returns once the host is connected to any
  peer, for a requester that has no bootstrap peer and waits for the LAN.

``Discovery.run`` follows the trio start protocol and must run inside
``Host.run`` (it needs the host listening). Two ``Discovery`` objects in one
process do not share anything.

mDNS, and why not py-libp2p's own
---------------------------------
py-libp2p 0.8.1 has ``libp2p.discovery.mdns.MDNSDiscovery`` (what
``new_host(enable_mDNS=True)`` starts once the host listens; it can also be
built on an existing host and ``start()``-ed by hand). It does not fit:

- it advertises ``host.get_transport_addrs()`` verbatim, so a host listening
  on ``0.0.0.0`` announces ``/ip4/0.0.0.0/…``, which no peer can dial;
- it reports discoveries through ``peerDiscovery``, a module-level singleton:
  every host in the process gets every other host's discoveries;
- its zeroconf callbacks run on zeroconf's thread, where it sleeps between
  retries, and ``start()`` registers the service synchronously, which blocks
  the trio loop for about 1.6 s (mDNS probing);
- it uses the generic ``_p2p._udp.local.`` service type, so it would also
  dial every IPFS or other libp2p node on the LAN.

So ``LanDiscovery`` speaks the same protocol (the libp2p mDNS spec: a DNS-SD
service whose TXT record holds ``dnsaddr=<multiaddr>/p2p/<peer id>`` strings,
one per address) directly through zeroconf (0.150), under its own service
type ``_p2p-llmarket._udp.local.`` (what py-libp2p names a "private network"
with fingerprint ``llmarket``), so only llmarket nodes see each other. It
announces the host's advertised addresses with wildcards expanded to the
interface addresses (``node.net.addresses``) and never a wildcard; zeroconf's
blocking calls run in worker threads, and its thread hands events to trio
through the trio token.

Every peer heard of is dialled through the ``connect`` callback the caller
gives (``Host.connect`` by default, so the host's guards and dial deadlines
apply), within ``dial_timeout_s`` for all of its addresses together. An
announcement is only believed within bounds: at most ``MAX_ADDRS`` addresses
(TCP over IP or DNS, no wildcard, multicast or port 0; others are dropped
before any dial), all of one peer id, and at most ``max_peers`` peers. A peer
whose dials fail is retried after ``retry_s``, doubling each time, and given
up after ``max_failures`` failures in a row until it announces different
addresses; one we connected to is dialled again at most every ``redial_s``
if the connection drops; and all LAN peers together are dialled at most
``dial_rate`` times a second (bursts of four times that). So a peer
announcing garbage is never dialled, one announcing a dead address is
dialled a bounded number of times, and a LAN full of fake announcements
cannot make the node dial faster than ``dial_rate``.

mDNS needs multicast: it works on a LAN, and between hosts (or processes,
or hosts in one process) on one machine when an interface with multicast is
up (multicast loops back). Where zeroconf cannot start, mDNS is reported off
in ``status()`` with the reason, and the node runs on without it.

DHT, and py-libp2p's quirks
---------------------------
- **The routing table is not fed on connect** in py-libp2p 0.8.1: peers land
  in it only when they query us, when we query them, or through a lookup. So
  a network notifee here sees each new connection, waits (up to
  ``IDENTIFY_WAIT_S``) for identify to report the peer's protocols, and adds
  it if it serves ``/ipfs/kad/1.0.0`` (a DHT server). When a server's table
  gets its first peer, one routing-table refresh (a lookup of our own id)
  runs, so the servers closest to it learn of it. Clients skip that: it
  would dial some 20 servers a requester never needs.
- **A querying peer enters the server's table** in py-libp2p, as if it were
  a server, so servers would hand out clients that cannot answer. Here the
  handler's ``add_peer`` is replaced: a querier is added only once identify
  lists the KAD protocol for it (``_admit`` adds it later otherwise). Peers
  named in other servers' answers are still added by py-libp2p's own lookups
  without that check; a client among them stays until a query to it fails.
- **The KAD handler is registered through ``Host.set_handler``** (replacing
  the one ``KadDHT`` registers itself), so it runs inside the host's guard
  (no exception escapes into py-libp2p, per-peer stream limit). A peer may
  hold ``KAD_STREAMS_PER_PEER`` KAD streams at once, each for at most
  ``KAD_STREAM_S``: py-libp2p's handler waits for the next message without a
  deadline, and 12 idle streams from anyone would take all of its slots. Its
  stream reads ``b""`` at the end (``_EndAsEmpty``): py-libp2p's handler
  expects that, gets ``StreamEOF``, and would log a warning per stream.
- **``KadDHT.find_peer`` answers from the local peerstore first**, and the
  peerstore already holds the addresses a requester just failed to dial (from
  the offer), so asking it after a failed dial returns the same dead
  addresses. ``find_peer`` here always asks the network: an iterative
  FIND_NODE lookup (``_lookup``: the closest known DHT servers first,
  ``ALPHA`` = 10 at a time, over ``Host.open_stream``, so the host's dial and
  stream deadlines apply) that returns the addresses other peers report for
  the target. py-libp2p's FIND_NODE handler includes the target whenever it
  knows its addresses, so a client-mode peer connected to a server is found.
- **Provider records are keyed by the CID's multihash** (``_encode_key`` in
  ``libp2p.kad_dht``: a CID string is parsed and its multihash used; any other
  string falls back to hex, then to its UTF-8 bytes). CIDv0 ``Qm…`` and CIDv1
  dag-pb ``bafy…`` of the same root therefore share records; a CIDv1 with raw
  leaves has another root (another multihash) and other records. ``provide``
  here refuses strings that are not CIDs, and is py-libp2p's: ADD_PROVIDER,
  fire and forget, to the closest peers its own lookup finds, with the
  addresses ``host.get_addrs()`` gives (the host's address factory).
  py-libp2p's ``find_providers`` files what it finds in the local store and
  from then on answers from the local store alone, for the records' 48 hours;
  ``find_providers`` here is a GET_PROVIDERS lookup (``_lookup`` again) that
  files nothing, merged with the records this node holds as a server. A
  server keeps at most 20 providers per key and ignores later ones until
  records expire (48 h), so 20 fresh peer ids can crowd out a model's real
  providers there.
- **The protocol is always ``/ipfs/kad/1.0.0``**: ``KadDHT`` takes a
  ``protocol_prefix`` but its queries and handler use the constant, so an
  llmarket DHT cannot have a protocol id of its own. It stays an llmarket DHT
  because llmarket nodes connect only to llmarket peers.
- KadDHT refreshes its routing table at start and every 10 minutes and
  republishes provider records every 22 hours; its own queries dial through
  py-libp2p directly, bounded by its 10 s query timeout. They also try
  connected client-mode peers when the table is small, which py-libp2p logs
  as warnings ("Failed to open stream … protocols not supported").
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import multiaddr
import multihash
import trio
import varint
from libp2p.abc import INotifee
from libp2p.bitswap.cid import parse_cid
from libp2p.kad_dht.common import ALPHA, BUCKET_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT, _encode_key
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service
from zeroconf import (
    BadTypeInNameException,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    service_type_name,
)

from node.net import addresses
from node.concurrency import TokenBucket
from node.errors import ConfigError, ModelError, NodeError

if TYPE_CHECKING:
    from node.net.host import Host, Stream

log = logging.getLogger(__name__)

#: The DNS-SD service type llmarket nodes announce (py-libp2p's "private network" form of ``_p2p._udp``).
SERVICE_TYPE = "_p2p-llmarket._udp.local."
KAD_PROTOCOL = str(KAD_PROTOCOL_ID)

#: Addresses believed from one announcement or one DHT answer per peer; longer lists are cut.
MAX_ADDRS = 8
#: TXT strings read from one announcement.
MAX_TXT_STRINGS = 32
#: How long a new connection's peer gets to report its protocols (identify) before the DHT ignores it.
IDENTIFY_WAIT_S = 5.0
#: KAD streams one peer may hold open at once, and how long one may last.
KAD_STREAMS_PER_PEER = 4
KAD_STREAM_S = 30.0
#: The largest FIND_NODE answer read (20 peers with a few addresses and signed records take a few KiB).
MAX_KAD_REPLY = 256 * 1024
#: How long the node with the greater peer id waits before dialling a newly heard peer (the other dials first).
SIMULTANEOUS_DIAL_DELAY_S = 1.0
#: Rounds of an iterative FIND_NODE lookup (each asks up to ALPHA peers).
MAX_LOOKUP_ROUNDS = 10

DHT_MODES = ("client", "server")

Connect = Callable[[str], Awaitable[object]]
OnPeer = Callable[[str], Awaitable[None]]


# ------------------------------------------------------------------ addresses


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
    if proto.name not in addresses.FIRST_PROTOCOLS or not 0 < int(port) < 65536:
        return None
    if proto.name in ("ip4", "ip6"):
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return None
        if ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255":
            return None
    return f"/{proto.name}/{host}/tcp/{port}"


def lan_addrs(addrs: list[str]) -> list[str]:
    """What to announce on the LAN: direct addresses, wildcards expanded to interface addresses, no ``/p2p``."""
    out: list[str] = []
    for addr in addrs:
        if addresses.is_circuit(addr):
            continue
        for expanded in addresses.expand(addr.split("/p2p/")[0]):
            if (ok := dialable(expanded)) is not None:
                out.append(ok)
    unique = list(dict.fromkeys(out))
    if any(not addresses.is_local(a) for a in unique):  # loopback only when there is nothing else
        unique = [a for a in unique if not addresses.is_local(a)]
    return unique[:MAX_ADDRS]


def valid_peer_id(text: str) -> bool:
    """Whether ``text`` is a base58 peer id (a multihash; any base58 text would decode to bytes)."""
    try:
        raw = ID.from_base58(text).to_bytes()
        multihash.decode(raw)
    except Exception:  # base58 and multihash raise several types
        return False
    return 2 < len(raw) <= 64 and ID(raw).to_base58() == text


def _txt_strings(text: bytes) -> list[bytes]:
    """The strings of a raw DNS TXT record (each length-prefixed)."""
    out, i = [], 0
    while i < len(text) and len(out) < MAX_TXT_STRINGS:
        n = text[i]
        out.append(text[i + 1 : i + 1 + n])
        i += 1 + n
    return out


def _txt_record(strings: list[str]) -> bytes:
    data = [s.encode() for s in strings if len(s.encode()) <= 255]
    return b"".join(bytes([len(s)]) + s for s in data)


def parse_announcement(text: bytes) -> tuple[str, list[str]] | None:
    """(peer id, dialable addresses) from an mDNS TXT record of ``dnsaddr=…/p2p/<id>`` strings, or None.

    The first valid ``/p2p/<id>`` names the peer; addresses of any other id are
    ignored, and at most ``MAX_ADDRS`` kept.
    """
    peer_id: str | None = None
    addrs: list[str] = []
    for raw in _txt_strings(text):
        key, _, value = raw.partition(b"=")
        if not key.startswith(b"dnsaddr") or b"/p2p/" not in value:
            continue
        try:
            text_addr = value.decode("ascii")
        except UnicodeDecodeError:
            continue
        pid = text_addr.rsplit("/p2p/", 1)[1]
        if not valid_peer_id(pid):
            continue
        if peer_id is None:
            peer_id = pid
        if pid == peer_id and (addr := dialable(text_addr)) is not None and addr not in addrs:
            addrs.append(addr)
    if peer_id is None:
        return None
    return peer_id, addrs[:MAX_ADDRS]


# ------------------------------------------------------------------------ mDNS


@dataclass(eq=False)
class _LanPeer:
    peer_id: str
    addrs: tuple[str, ...]
    names: set[str] = field(default_factory=set)  # mDNS service instances announcing it now
    failures: int = 0  # dials that failed in a row
    next_try: float = 0.0  # trio time
    dialling: bool = False
    greeted: bool = False  # on_peer ran for its current connection
    last_error: str = ""


class LanDiscovery:
    """mDNS: announce one host on the LAN, and dial the llmarket peers heard of (see the module docstring).

    ``addrs`` gives the host's addresses (wildcards are expanded here);
    ``connect`` dials one ``…/p2p/<id>`` multiaddr and raises a ``NodeError``
    when it cannot; ``is_connected`` says whether a peer is connected already;
    ``on_peer`` (optional) runs once a peer found here is connected, whoever
    dialled, and again after each reconnection.
    """

    def __init__(
        self,
        peer_id: str,
        addrs: Callable[[], list[str]],
        connect: Connect,
        *,
        is_connected: Callable[[str], bool] = lambda peer_id: False,
        on_peer: OnPeer | None = None,
        service_type: str = SERVICE_TYPE,
        dial_timeout_s: float = 10.0,
        retry_s: float = 5.0,
        redial_s: float = 30.0,
        max_failures: int = 4,
        max_peers: int = 256,
        check_s: float = 1.0,
        dial_rate: float = 4.0,
    ) -> None:
        try:
            service_type_name(service_type)
        except BadTypeInNameException as err:
            raise ConfigError(f"mDNS service type {service_type!r} is invalid: {err}") from None
        self.peer_id = peer_id
        self._addrs = addrs
        self._connect = connect
        self._is_connected = is_connected
        self.on_peer = on_peer  # may be set later (the caller's offer sync may exist only after the host)
        self.service_type = service_type
        self.dial_timeout_s, self.retry_s, self.redial_s = dial_timeout_s, retry_s, redial_s
        self.max_failures, self.max_peers, self.check_s = max_failures, max_peers, check_s
        self._dial_rate = TokenBucket(dial_rate, max(1.0, 4 * dial_rate))  # dials of LAN peers, all together
        self.instance = f"{secrets.token_hex(12)}.{service_type}"  # random: the peer id is in the TXT record
        self.state = "not started"
        self.announced: list[str] = []
        self.peers: dict[str, _LanPeer] = {}
        self.dials = 0
        self.dial_failures = 0
        self._zc: Zeroconf | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._pending: set[str] = set()  # service instances to resolve
        self._resolve_wake = trio.Event()
        self._dial_wake = trio.Event()

    # -------------------------------------------------------------- lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Announce and browse until cancelled; returns at once (started) if mDNS cannot start here."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            zc = await trio.to_thread.run_sync(partial(Zeroconf, ip_version=IPVersion.V4Only))
        except Exception as err:  # OSError (no socket, no multicast) or zeroconf's own
            self.state = f"off: zeroconf could not start ({err})"
            log.warning("mDNS is off: zeroconf could not start (%s); peers must be given with --bootstrap", err)
            task_status.started()
            return
        self._zc = zc
        browser: ServiceBrowser | None = None
        started = False
        try:
            async with trio.open_nursery() as nursery:
                browser = ServiceBrowser(zc, self.service_type, handlers=[self._on_change])
                nursery.start_soon(self._announce, zc)
                nursery.start_soon(self._resolver)
                nursery.start_soon(self._dialer)
                self.state = "running"
                started = True
                task_status.started()
                await trio.sleep_forever()
        except Exception as err:  # a bug here must not take the node down: mDNS is a convenience
            self.state = f"off: failed ({err.__class__.__name__}: {err})"
            log.exception("mDNS failed and is off; peers must be given with --bootstrap")
            if not started:
                task_status.started()
        finally:
            if self.state == "running":
                self.state = "stopped"
            self._zc = None
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await trio.to_thread.run_sync(self._close, zc, browser, abandon_on_cancel=True)

    @staticmethod
    def _close(zc: Zeroconf, browser: ServiceBrowser | None) -> None:
        if browser is not None:
            browser.cancel()
        zc.close()  # unregisters our service (a goodbye packet) first

    async def _announce(self, zc: Zeroconf) -> None:
        """Register our service (zeroconf probes the name for about 1.6 s, in a worker thread)."""
        self.announced = lan_addrs(self._addrs())
        if not self.announced:
            log.warning("mDNS: the host has no address peers on the LAN could dial; listening only")
            return
        info = ServiceInfo(
            self.service_type,
            self.instance,
            port=int(self.announced[0].rsplit("/tcp/", 1)[1]),
            properties=_txt_record([f"dnsaddr={a}/p2p/{self.peer_id}" for a in self.announced]),
            server=f"{self.instance.split('.')[0]}.local.",
            addresses=[_ip_bytes(ip) for ip in _ips(self.announced)],
        )
        try:
            await trio.to_thread.run_sync(zc.register_service, info, abandon_on_cancel=True)
        except Exception as err:  # zeroconf raises its own types and OSErrors
            self.state = f"browsing only: could not announce ({err.__class__.__name__}: {err})"
            log.warning("mDNS: could not announce this host (%s); it can still find others", err)
            return
        log.info("mDNS: announced %s", ", ".join(self.announced))

    # ---------------------------------------------------- zeroconf's thread

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        """zeroconf's browser callback, on zeroconf's thread: hand the event to trio."""
        if name == self.instance or self._token is None:
            return
        try:
            self._token.run_sync_soon(self._note, name, state_change)
        except trio.RunFinishedError:
            pass

    # --------------------------------------------------------------- in trio

    def _note(self, name: str, change: ServiceStateChange) -> None:
        try:
            if change is ServiceStateChange.Removed:
                self._pending.discard(name)
                for peer in self.peers.values():
                    peer.names.discard(name)
            elif len(self._pending) < self.max_peers:
                self._pending.add(name)
                self._resolve_wake.set()
        except Exception:  # an exception here would end the trio run
            log.exception("mDNS: could not note a change of %s", name)

    async def _resolver(self) -> None:
        slots = trio.Semaphore(4)  # names resolved at once (each may wait up to 3 s for an answer)
        async with trio.open_nursery() as nursery:
            while True:
                await self._resolve_wake.wait()
                self._resolve_wake = trio.Event()
                while self._pending:
                    name = self._pending.pop()
                    await slots.acquire()
                    nursery.start_soon(self._resolve, name, slots)

    async def _resolve(self, name: str, slots: trio.Semaphore) -> None:
        try:
            zc = self._zc
            if zc is None:
                return
            try:
                info = await trio.to_thread.run_sync(
                    zc.get_service_info, self.service_type, name, 3000, abandon_on_cancel=True
                )
            except Exception as err:  # zeroconf's errors (a bad name, a closing instance)
                log.debug("mDNS: could not resolve %s: %s", name, err)
                return
            if info is None or not info.text:
                log.debug("mDNS: %s did not answer with a TXT record", name)
                return
            found = parse_announcement(info.text)
            if found is None:
                log.debug("mDNS: %s announces no /p2p/<peer id> address", name)
                return
            self._file(name, *found)
        finally:
            slots.release()

    def _file(self, name: str, peer_id: str, addrs: list[str]) -> None:
        if peer_id == self.peer_id:
            return
        peer = self.peers.get(peer_id)
        if peer is None:
            if len(self.peers) >= self.max_peers and not self._evict():
                log.debug("mDNS: %d peers known; ignoring %s…", len(self.peers), peer_id[:12])
                return
            peer = self.peers[peer_id] = _LanPeer(peer_id, tuple(addrs))
            if peer_id < self.peer_id:  # both sides hear each other at once: the smaller id dials first
                peer.next_try = trio.current_time() + SIMULTANEOUS_DIAL_DELAY_S
            if addrs:
                log.info("mDNS: found peer %s… at %s", peer_id[:12], ", ".join(addrs))
            else:
                log.info("mDNS: peer %s… announces no address we could dial; ignoring it", peer_id[:12])
        elif set(addrs) != set(peer.addrs):  # new addresses: a fresh count (the current wait stands)
            peer.addrs, peer.failures = tuple(addrs), 0
        peer.names.add(name)
        self._dial_wake.set()

    def _evict(self) -> bool:
        """Forget one peer that no longer announces itself, to make room."""
        for peer_id, peer in self.peers.items():
            if not peer.names and not peer.dialling:
                del self.peers[peer_id]
                return True
        return False

    async def _dialer(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for peer in list(self.peers.values()):
                    connected = self._is_connected(peer.peer_id)
                    if peer.names and connected and not peer.greeted and self.on_peer is not None:  # whoever dialled
                        peer.greeted = True
                        nursery.start_soon(self._greet, self.on_peer, peer.peer_id)
                    elif not connected:
                        peer.greeted = False
                    if (
                        peer.names
                        and peer.addrs
                        and not peer.dialling
                        and peer.failures < self.max_failures
                        and now >= peer.next_try
                        and not connected
                        and self._dial_rate.take(now)
                    ):
                        peer.dialling = True
                        nursery.start_soon(self._dial, peer)
                with trio.move_on_after(self.check_s):
                    await self._dial_wake.wait()
                self._dial_wake = trio.Event()

    async def _dial(self, peer: _LanPeer) -> None:
        self.dials += 1
        ok = False
        errors: list[str] = []
        try:
            with trio.move_on_after(self.dial_timeout_s) as scope:
                for addr in peer.addrs:
                    try:
                        await self._connect(f"{addr}/p2p/{peer.peer_id}")
                        ok = True
                        break
                    except NodeError as err:
                        errors.append(str(err))
                    except Exception as err:  # the callback should raise NodeErrors only; do not die of it
                        errors.append(f"{err.__class__.__name__}: {err}")
            if scope.cancelled_caught:
                errors.append(f"no connection within {self.dial_timeout_s:g}s")
        finally:
            peer.dialling = False
        now = trio.current_time()
        if ok:
            peer.failures, peer.last_error = 0, ""
            peer.next_try = now + self.redial_s
            log.info("mDNS: connected to peer %s…", peer.peer_id[:12])
            self._dial_wake.set()  # greet it
            return
        self.dial_failures += 1
        peer.failures += 1
        peer.last_error = "; ".join(errors)[:300]
        peer.next_try = now + self.retry_s * 2 ** (peer.failures - 1)
        if peer.failures >= self.max_failures:
            log.info(
                "mDNS: giving up on peer %s… after %d failed dials (%s) until it announces other addresses",
                peer.peer_id[:12],
                peer.failures,
                peer.last_error,
            )
        else:
            log.debug("mDNS: could not dial peer %s…: %s", peer.peer_id[:12], peer.last_error)

    def poke(self) -> None:
        """Look at the peers now (a connection came up), not at the next ``check_s`` tick."""
        self._dial_wake.set()

    @staticmethod
    async def _greet(on_peer: OnPeer, peer_id: str) -> None:
        try:
            await on_peer(peer_id)
        except Exception:
            log.exception("mDNS: on_peer failed for %s…", peer_id[:12])

    def status(self) -> dict:
        announcing = [p for p in self.peers.values() if p.names]
        return {
            "state": self.state,
            "service": self.service_type,
            "announced": list(self.announced),
            "found": len(announcing),
            "connected": sum(1 for p in announcing if self._is_connected(p.peer_id)),
            "given_up": sum(1 for p in announcing if p.failures >= self.max_failures),
            "dials": self.dials,
            "dial_failures": self.dial_failures,
        }


def _ips(addrs: list[str]) -> list[str]:
    return list(dict.fromkeys(addresses.host_of(a) for a in addrs if a.startswith(("/ip4/", "/ip6/"))))


def _ip_bytes(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


# ------------------------------------------------------------------------- DHT


class _ConnectionNotifee(INotifee):
    """Hands each new connection's peer id to the DHT feeder, and wakes ``wait_for_peer``."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    async def connected(self, network, conn) -> None:
        self.discovery._connected(conn.muxed_conn.peer_id)

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


class DhtService:
    """py-libp2p's KadDHT on one host: routing-table feeding, ``find_peer``, provider records."""

    def __init__(self, host: Host, mode: str = "client", *, query_timeout_s: float = 5.0) -> None:
        if mode not in DHT_MODES:
            raise ConfigError(f"DHT mode {mode!r} is not one of {', '.join(DHT_MODES)}")
        self.host = host
        self.mode = mode
        self.query_timeout_s = query_timeout_s
        self.dht = KadDHT(host.libp2p, DHTMode.SERVER if mode == "server" else DHTMode.CLIENT)
        if mode == "server":  # replaces the handler KadDHT registered itself (see the module docstring)
            host.set_handler(KAD_PROTOCOL, self._serve)
        self.dht.add_peer = self._add_querier  # what KadDHT's handler calls for every peer that asks it
        self._kad_streams: dict[str, int] = {}
        self._feed_send, self._feed_recv = trio.open_memory_channel[ID](1024)
        self._refreshed = False
        self.lookups = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dht), trio.open_nursery() as nursery:
            nursery.start_soon(self._feeder, nursery)
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------ the routing table

    def peer_connected(self, peer: ID) -> None:
        try:
            self._feed_send.send_nowait(peer)
        except trio.WouldBlock:  # a flood of connections: the table fills from lookups instead
            pass

    async def _feeder(self, nursery: trio.Nursery) -> None:
        async for peer in self._feed_recv:
            nursery.start_soon(self._admit, peer)

    async def _admit(self, peer: ID) -> None:
        """Add a newly connected peer to the routing table once identify says it is a DHT server."""
        if not await self._serves_kad(peer, wait_s=IDENTIFY_WAIT_S):
            return
        table = self.dht.routing_table
        was_empty = table.size() == 0
        try:
            added = await table.add_peer(peer)
        except Exception as err:  # py-libp2p's table: a full bucket pings, a missing address raises
            log.debug("DHT: could not add %s… to the routing table: %s", peer.to_base58()[:12], err)
            return
        if added and was_empty and self.mode == "server" and not self._refreshed:
            # a server's first peer: look ourselves up, so the servers closest to us learn of us (once)
            self._refreshed = True
            with trio.move_on_after(30):
                try:
                    await self.dht.refresh_routing_table()
                except Exception as err:
                    log.debug("DHT: routing-table refresh failed: %s", err)

    async def _serves_kad(self, peer: ID, *, wait_s: float = 0.0) -> bool:
        """Whether identify reported ``/ipfs/kad/1.0.0`` for ``peer``, waiting up to ``wait_s`` for identify."""
        deadline = trio.current_time() + wait_s
        while (serves := self._kad_known(peer)) is None and trio.current_time() < deadline:
            await trio.sleep(0.05)
        return bool(serves)

    def _kad_known(self, peer: ID) -> bool | None:
        """True if identify listed the KAD protocol for ``peer``, False if it did not, None before identify."""
        try:
            if KAD_PROTOCOL in self.host.libp2p.get_peerstore().get_protocols(peer):
                return True
        except Exception:  # PeerStoreError: not known (yet)
            pass
        identified = getattr(self.host.libp2p, "_identified_peers", None)  # py-libp2p 0.8.1's record of identify
        if identified is None or peer in identified:
            return False
        return None

    async def _add_querier(self, peer: ID, *, skip_server_mode_check: bool = False) -> bool:
        """Add a peer that sent us a KAD request only if identify says it is a DHT server (``_admit`` waits)."""
        if self._kad_known(peer):
            return await self.dht.routing_table.add_peer(peer)
        return False

    async def _serve(self, stream: Stream) -> None:
        """The KAD handler, inside the host's guard, with per-peer and duration limits."""
        peer = stream.peer_id
        if self._kad_streams.get(peer, 0) >= KAD_STREAMS_PER_PEER:
            await stream.reset()
            return
        self._kad_streams[peer] = self._kad_streams.get(peer, 0) + 1
        try:
            with trio.move_on_after(KAD_STREAM_S) as scope:
                await self.dht.handle_stream(_EndAsEmpty(stream.raw))
            if scope.cancelled_caught:
                await stream.reset()
        finally:
            self._kad_streams[peer] -= 1
            if not self._kad_streams[peer]:
                del self._kad_streams[peer]

    # ------------------------------------------------------------ peer routing

    async def find_peer(self, peer_id: str, timeout_s: float = 10.0) -> list[str]:
        """The addresses (without ``/p2p``) other peers report for ``peer_id``; ``[]`` if none within the time.

        Always asks the network, never our own peerstore (which holds what we
        knew already): an iterative FIND_NODE lookup from the closest known DHT
        servers that ends with the first round of answers naming the peer.
        """
        if not valid_peer_id(peer_id):
            return []
        target = ID.from_base58(peer_id)
        self.lookups += 1
        found: dict[str, None] = {}

        def note(reply: Message) -> bool:
            for entry in reply.closerPeers:
                if entry.id == target.to_bytes():
                    found.update(dict.fromkeys(_dialable_all(_multiaddr_text(b) for b in entry.addrs)))
            return bool(found)

        with trio.move_on_after(timeout_s):
            await self._lookup(Message.MessageType.FIND_NODE, target.to_bytes(), note, skip=target)
        return list(found)[:MAX_ADDRS]

    async def _lookup(self, kind: int, key: bytes, note: Callable[[Message], bool], *, skip: ID | None = None) -> None:
        """An iterative Kademlia lookup of ``key``: ask the closest peers known, ``ALPHA`` at a time.

        Starts from the routing table and the connected DHT servers; every
        answer's closer peers join the candidates. ``note`` sees each answer
        and returns True when the caller has what it wants, which ends the
        lookup after that round; so does having asked the ``BUCKET_SIZE``
        closest peers known, or ``MAX_LOOKUP_ROUNDS`` rounds.
        """
        me = self.host.libp2p.get_id()
        store = self.host.libp2p.get_peerstore()
        known: dict[ID, list[str]] = {}  # candidate → addresses to dial it by
        for peer in self.dht.routing_table.find_local_closest_peers(key, BUCKET_SIZE):
            known[peer] = _dialable_all(str(a) for a in _addrs_of(store, peer))
        for peer in self.host.libp2p.get_connected_peers():  # unless identify said they are clients
            if peer not in known and self._kad_known(peer) is not False:
                known[peer] = []
        asked: set[ID] = set()
        done = False

        async def ask(peer: ID) -> None:
            nonlocal done
            reply = await self._query(peer, known[peer], kind, key)
            if reply is None:
                return
            if note(reply):
                done = True
            for entry in reply.closerPeers[:BUCKET_SIZE]:
                pid = _peer_of(entry.id)
                if pid is not None and pid != me and pid not in known and len(known) < BUCKET_SIZE * MAX_LOOKUP_ROUNDS:
                    known[pid] = _dialable_all(_multiaddr_text(b) for b in entry.addrs)

        for _ in range(MAX_LOOKUP_ROUNDS):
            closest = [p for p in sort_peer_ids_by_distance(key, list(known)) if p not in (me, skip)][:BUCKET_SIZE]
            batch = [p for p in closest if p not in asked][:ALPHA]
            if not batch:
                return
            async with trio.open_nursery() as nursery:
                for peer in batch:
                    asked.add(peer)
                    nursery.start_soon(ask, peer)
            if done:
                return

    async def _query(self, peer: ID, addrs: list[str], kind: int, key: bytes) -> Message | None:
        """Ask ``peer`` (dialling ``addrs`` if not connected) one KAD question; None on any failure."""
        request = Message(type=kind, key=key).SerializeToString()
        try:
            stream = await self.host.open_stream(peer.to_base58(), KAD_PROTOCOL, addrs)
        except NodeError as err:
            log.debug("DHT: could not ask %s…: %s", peer.to_base58()[:12], err)
            return None
        answered = False
        try:
            with trio.fail_after(self.query_timeout_s):
                await stream.write(varint.encode(len(request)) + request)
                data = await _read_frame(stream, MAX_KAD_REPLY)
            reply = Message()
            reply.ParseFromString(data)
            answered = reply.type == kind
        except Exception as err:  # silence, a broken stream, a bad frame or protobuf
            log.debug("DHT: %s… gave no answer: %s", peer.to_base58()[:12], err.__class__.__name__)
        finally:
            if answered:
                await stream.close()
            else:
                await stream.reset()
        return reply if answered else None

    # -------------------------------------------------------- provider records

    async def provide(self, cid: str, timeout_s: float = 30.0) -> bool:
        """Tell the DHT servers closest to ``cid`` that we provide it; whether any took the record in time.

        py-libp2p's ``provide``: it also files our own record locally and
        republishes it every 22 hours while the DHT runs.
        """
        key = _cid_key(cid)
        with trio.move_on_after(timeout_s):
            return await self.dht.provider_store.provide(key)
        return False

    async def find_providers(
        self, cid: str, timeout_s: float = 10.0, count: int = BUCKET_SIZE
    ) -> list[tuple[str, list[str]]]:
        """Peers that provide ``cid``: (peer id, dialable addresses without ``/p2p``), ourselves left out.

        The records this node holds (as a DHT server) plus a GET_PROVIDERS
        lookup, which ends once ``count`` providers are known. Found records
        are not filed locally (py-libp2p's own ``find_providers`` would, and
        then answer from them alone for 48 hours).
        """
        key = _cid_key(cid)
        me = self.host.libp2p.get_id()
        found: dict[str, list[str]] = {}

        def add(peer: ID, addrs: list[str]) -> None:
            if peer != me and addrs and len(found) < count:
                found.setdefault(peer.to_base58(), addrs)

        for info in self.dht.provider_store.get_providers(key):
            add(info.peer_id, _dialable_all(str(a) for a in info.addrs))

        def note(reply: Message) -> bool:
            for entry in reply.providerPeers[:BUCKET_SIZE]:
                if (peer := _peer_of(entry.id)) is not None:
                    add(peer, _dialable_all(_multiaddr_text(b) for b in entry.addrs))
            return len(found) >= count

        self.lookups += 1
        with trio.move_on_after(timeout_s):
            await self._lookup(Message.MessageType.GET_PROVIDERS, key, note)
        return list(found.items())

    def status(self) -> dict:
        return {
            "mode": self.mode,
            "routing_table": self.dht.get_routing_table_size(),
            "provider_records": self.dht.provider_store.size(),
            "lookups": self.lookups,
        }


class _EndAsEmpty:
    """A raw stream whose ``read`` returns ``b""`` at the end (py-libp2p raises ``StreamEOF``).

    py-libp2p's KAD handler treats ``b""`` as the clean end of a stream, but
    its streams raise ``StreamEOF``, which it logs as a warning on every stream
    a client closes.
    """

    def __init__(self, raw) -> None:
        self._raw = raw

    def __getattr__(self, name: str):
        return getattr(self._raw, name)

    async def read(self, n: int | None = None) -> bytes:
        try:
            return await self._raw.read(n)
        except StreamEOF:
            return b""


def _cid_key(cid: str) -> bytes:
    """The DHT key of a CID: its multihash (as py-libp2p keys provider records)."""
    try:
        parse_cid(cid)
    except Exception:  # py-cid raises several types
        raise ModelError(f"{cid!r} is not a CID; give the model's CID (Qm… or bafy…)") from None
    return _encode_key(cid)


def _peer_of(raw: bytes) -> ID | None:
    """The peer id in a KAD answer's ``id`` field, or None if it is not one."""
    try:
        peer = ID(raw)
    except Exception:
        return None
    return peer if valid_peer_id(peer.to_base58()) else None


def _addrs_of(store, peer: ID) -> list:
    try:
        return store.addrs(peer)
    except Exception:  # PeerStoreError: no addresses
        return []


def _multiaddr_text(raw: bytes) -> str:
    try:
        return str(multiaddr.Multiaddr(raw))
    except Exception:
        return ""


def _dialable_all(addrs) -> list[str]:
    return list(dict.fromkeys(a for a in map(dialable, addrs) if a is not None))[:MAX_ADDRS]


async def _read_frame(stream: Stream, limit: int) -> bytes:
    """One varint-length-prefixed message from ``stream``."""
    length, shift = 0, 0
    while True:
        byte = await stream.read(1)
        if not byte:
            raise EOFError("stream ended before a length")
        length |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
        shift += 7
        if shift > 28:
            raise ValueError("length varint too long")
    if length > limit:
        raise ValueError(f"message of {length} bytes is over {limit}")
    data = b""
    while len(data) < length:
        chunk = await stream.read(length - len(data))
        if not chunk:
            raise EOFError("stream ended inside a message")
        data += chunk
    return data


# ----------------------------------------------------------------- Discovery


class Discovery:
    """mDNS and the DHT for one ``Host`` (see the module docstring).

    ``connect`` (default ``host.connect``) dials the peers mDNS finds;
    ``on_peer`` runs once each peer mDNS found is connected, whoever dialled
    (e.g. to ask the peer for its offers), and again after a reconnection.
    ``service_type`` changes the mDNS service (tests use a random one so that
    concurrent runs on one LAN do not meet); ``lan_options`` go to ``LanDiscovery``.
    """

    def __init__(
        self,
        host: Host,
        *,
        mdns: bool = True,
        dht_mode: str = "client",
        connect: Connect | None = None,
        on_peer: OnPeer | None = None,
        service_type: str = SERVICE_TYPE,
        **lan_options,
    ) -> None:
        self.host = host
        self.dht = DhtService(host, dht_mode)
        self.lan: LanDiscovery | None = None
        if mdns:
            self.lan = LanDiscovery(
                host.peer_id,
                host.addrs,
                connect or host.connect,
                is_connected=self._is_connected,
                on_peer=on_peer,
                service_type=service_type,
                **lan_options,
            )
        self._notifee = _ConnectionNotifee(self)
        self._peer_changed = trio.Event()
        self.running = False

    @property
    def on_peer(self) -> OnPeer | None:
        return self.lan.on_peer if self.lan is not None else None

    @on_peer.setter
    def on_peer(self, callback: OnPeer | None) -> None:
        """Set what runs once each peer mDNS found is connected (no effect without mDNS)."""
        if self.lan is not None:
            self.lan.on_peer = callback

    def _is_connected(self, peer_id: str) -> bool:
        try:
            return ID.from_base58(peer_id) in self.host.libp2p.get_connected_peers()
        except Exception:
            return False

    def _connected(self, peer: ID) -> None:
        self.dht.peer_connected(peer)
        self._peer_changed.set()
        if self.lan is not None:
            self.lan.poke()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the DHT and mDNS until cancelled; ``started`` once both run. Call inside ``Host.run``."""
        network = self.host.libp2p.get_network()
        network.register_notifee(self._notifee)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.dht.run)
                for peer in self.host.libp2p.get_connected_peers():  # connected before we ran (bootstrap)
                    self.dht.peer_connected(peer)
                if self.lan is not None:
                    await nursery.start(self.lan.run)
                self.running = True
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.running = False
            network.remove_notifee(self._notifee)

    async def wait_for_peer(self, timeout_s: float) -> list[str]:
        """The connected peers' ids, once there is at least one (found by mDNS or any other way); ``[]`` on timeout."""
        with trio.move_on_after(timeout_s):
            while not self.host.connected_peers():
                if self._peer_changed.is_set():
                    self._peer_changed = trio.Event()
                await self._peer_changed.wait()
        return self.host.connected_peers()

    async def find_peer(self, peer_id: str, timeout_s: float = 10.0) -> list[str]:
        return await self.dht.find_peer(peer_id, timeout_s)

    async def provide(self, cid: str, timeout_s: float = 30.0) -> bool:
        return await self.dht.provide(cid, timeout_s)

    async def find_providers(self, cid: str, timeout_s: float = 10.0) -> list[tuple[str, list[str]]]:
        return await self.dht.find_providers(cid, timeout_s)

    def status(self) -> dict:
        """JSON-able: mDNS state and peers found, the DHT's mode and routing-table size."""
        return {
            "mdns": self.lan.status() if self.lan is not None else {"state": "off"},
            "dht": self.dht.status(),
            "connected": len(self.host.libp2p.get_connected_peers()),
        }


__all__ = [
    "SERVICE_TYPE",
    "Discovery",
    "DhtService",
    "LanDiscovery",
    "dialable",
    "lan_addrs",
    "parse_announcement",
]
