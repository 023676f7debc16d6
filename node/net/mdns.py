"""mDNS on the LAN: announce a host, and dial the llmarket peers heard of (``LanDiscovery``).

``node.net.network.Network`` runs it when ``HostConfig.mdns`` is on, so
``serve``, ``request``, ``peers`` and ``gateway`` find each other without
``--bootstrap``.

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
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio
from zeroconf import (
    BadTypeInNameException,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    service_type_name,
)

from node.concurrency import TokenBucket
from node.errors import ConfigError, NodeError
from node.net import addresses
from node.net.addresses import MAX_ADDRS, dialable
from node.net.identity import valid_peer_id

log = logging.getLogger(__name__)

#: The DNS-SD service type llmarket nodes announce (py-libp2p's "private network" form of ``_p2p._udp``).
SERVICE_TYPE = "_p2p-llmarket._udp.local."
#: TXT strings read from one announcement.
MAX_TXT_STRINGS = 32
#: How long the node with the greater peer id waits before dialling a newly heard peer (the other dials first).
SIMULTANEOUS_DIAL_DELAY_S = 1.0

Connect = Callable[[str], Awaitable[object]]
OnPeer = Callable[[str], Awaitable[None]]


# ------------------------------------------------------------------ announcements


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
