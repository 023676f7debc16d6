"""AutoNAT (``/libp2p/autonat/1.0.0``) for one host: is it publicly reachable? Part of ``node.net.nat``.

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

``AutoNat`` is the client (``run``: the probe loop), the server (``serve``,
registered by ``node.net.nat.Nat``) and the verdict (``reachability``,
``reason``, ``observed_addrs``). It builds on py-libp2p 0.8.1's
``AutoNATService`` for the messages, with the dial-back replaced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID

from node.net.config import NatConfig
from node.net.conns import Changes, direct_peers, ip_port, is_relayed, local_ip, protocols, short, strip_p2p
from node.net.guards import close_stream

log = logging.getLogger(__name__)

Reachability = Literal["public", "private", "unknown"]


@dataclass
class _Verdict:
    ok: bool
    addr: str  # the address dialled back (ok), or what we asked to be dialled at
    at: float  # trio time


class AutoNat:
    """AutoNAT's client, server and verdict for one host (see the module docstring).

    ``changes`` is poked when the verdict changes, and wakes the probe loop when
    peers come and go. ``force_reachability`` pins the answer.
    """

    def __init__(
        self, libp2p, config: NatConfig, changes: Changes, *, force_reachability: Reachability | None = None
    ) -> None:
        self.libp2p = libp2p
        self.swarm = libp2p.get_network()
        self.config = config
        self.changes = changes
        self._forced: Reachability | None = force_reachability
        self.service = _AutoNATService(self)
        self._verdicts: dict[ID, _Verdict] = {}
        self._asked: dict[ID, float] = {}  # server → when we last asked (trio time)
        self._last_refusal = ""
        self._served_at: dict[ID, float] = {}  # AutoNAT requesters → when served (trio time)
        self._dialbacks = trio.Semaphore(8)

    def set_reachability(self, value: Reachability | None) -> None:
        """Pin the reachability (tests; operators who know), or ``None`` to let AutoNAT decide."""
        self._forced = value
        self.changes.poke()

    # ---------------------------------------------------------- the verdict

    @property
    def reachability(self) -> Reachability:
        return self._assess()[0]

    @property
    def reason(self) -> str:
        return self._assess()[1]

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
                return "private", f"dial-back from {short(peer)} to {verdict.addr} failed"
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

    # ---------------------------------------------------------- the client

    def _dialback_candidates(self) -> list[multiaddr.Multiaddr]:
        """The addresses we ask AutoNAT servers to dial (module docstring)."""
        listen = [a for a in self.libp2p.get_transport_addrs() if "/p2p-circuit" not in str(a)]
        ports: set[tuple[str, int]] = set()
        out: list[multiaddr.Multiaddr] = []
        for addr in listen:
            parsed = ip_port(addr)
            if parsed is None:
                continue
            proto, ip, port = parsed
            ports.add((proto, port))
            if ip not in ("0.0.0.0", "::"):
                out.append(strip_p2p(addr))
        ips: set[str] = set()
        for conns in list(self.swarm.connections.values()):
            for conn in conns:
                if not is_relayed(conn):
                    ip = local_ip(conn)
                    if ip:
                        ips.add(ip)
        manager = getattr(self.libp2p, "_observed_addr_manager", None)
        if manager is not None:
            for addr in manager.addrs(min_observers=1):
                parsed = ip_port(addr)
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

    async def run(self) -> None:
        """Ask peers to dial us back, as often as the config says, until cancelled."""
        while True:
            changed = self.changes.event()
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
        for peer in direct_peers(self.libp2p):
            if now - self._asked.get(peer, -1e9) < due:
                continue
            served = protocols(self.libp2p, peer)
            if served is not None and AUTONAT_PROTOCOL_ID not in served:
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
            status, addr = await self.service.query_server(
                server, addrs=candidates, timeout=self.config.autonat_timeout_s
            )
        except Exception as err:  # no answer: not a verdict
            self._last_refusal = f"{short(server)} did not answer ({err.__class__.__name__})"
            log.debug("AutoNAT request to %s failed: %s", short(server), err)
            return
        finally:
            self.service.dial_results.pop(server, None)  # py-libp2p's own tally, unused here (it would only grow)
        if status == AutoNATMessage.OK:
            text = str(multiaddr.Multiaddr(addr)) if addr else "?"
            self._verdicts[server] = _Verdict(True, text, trio.current_time())
        elif status == AutoNATMessage.E_DIAL_ERROR:
            asked = ", ".join(str(multiaddr.Multiaddr(a)) for a in candidates[:2])
            self._verdicts[server] = _Verdict(False, asked, trio.current_time())
        else:
            self._last_refusal = f"{short(server)} refused: {AutoNATMessage.ResponseStatus.Name(status)}"
        after = self.reachability
        if after != before:
            log.info("reachability: %s (%s)", after, self.reason)
            self.changes.poke()

    # ---------------------------------------------------------- the server

    async def serve(self, stream: INetStream) -> None:
        """The AutoNAT server, inside the host's guard: one request per peer per 10 s, 8 dial-backs at once."""
        peer = stream.muxed_conn.peer_id
        now = trio.current_time()
        if now - self._served_at.get(peer, -1e9) < 10.0:
            await close_stream(stream, reset=True)
            return
        try:
            self._dialbacks.acquire_nowait()
        except trio.WouldBlock:
            await close_stream(stream, reset=True)
            return
        try:
            self._served_at[peer] = now
            if len(self._served_at) > 4096:
                self._served_at = {p: t for p, t in self._served_at.items() if now - t < 10.0}
            with trio.fail_after(30):
                await self.service.handle_stream(stream)
        finally:
            self._dialbacks.release()

    async def dial_back(self, peer: ID, addr: multiaddr.Multiaddr) -> bool:
        """Whether a fresh TCP connection to ``addr`` reaches ``peer`` (Noise proves its key); closed after."""
        if "/p2p-circuit" in str(addr) or ip_port(addr) is None:
            return False
        transport = self.swarm.transport_manager.transport_for_dialing(addr)
        if transport is None:
            return False
        raw = None
        try:
            with trio.fail_after(self.config.dialback_timeout_s):
                raw = await transport.dial(strip_p2p(addr))
                secured = await self.swarm.upgrader.upgrade_security(raw, True, peer)
                return secured.get_remote_peer() == peer
        except Exception as err:  # dial errors, handshake failures, the deadline
            log.debug("dial-back to %s at %s failed: %s", short(peer), addr, err)
            return False
        finally:
            if raw is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await raw.close()
                    except Exception:
                        pass


class _AutoNATService(AutoNATService):
    """py-libp2p's AutoNAT with a real dial-back (module docstring); served by ``AutoNat.serve``."""

    def __init__(self, autonat: AutoNat) -> None:
        super().__init__(autonat.libp2p, serve=False, confirmations=1)
        self.autonat = autonat

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs[:4]:
            try:
                addr = multiaddr.Multiaddr(raw)
            except Exception:
                continue
            if await self.autonat.dial_back(peer_id, addr):
                return bytes(raw)
        return None
