"""Finding peers without a known address (node.net.dht, node.net.mdns, node.net.network): the DHT and mDNS.

DHT tests run real py-libp2p hosts on 127.0.0.1. mDNS tests run two hosts (or
a host and raw zeroconf announcers) in this process: multicast loops back, so
they hear each other, even in a network namespace with nothing but ``lo``
(tried). They are skipped where zeroconf cannot start. Each mDNS test uses its
own random service type, so concurrent test runs on one LAN never meet.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import time
from contextlib import asynccontextmanager
from functools import partial

import multiaddr
import pytest
import trio
import varint
from cid import make_cid
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from node.errors import ConfigError, ModelError, PeerUnreachable
from node.net import addresses
from node.net.addresses import MAX_ADDRS, dialable
from node.net.dht import KAD_PROTOCOL, DhtService, _read_frame
from node.net.host import Host, HostConfig
from node.net.identity import Identity
from node.net.mdns import LanDiscovery, lan_addrs, parse_announcement
from node.net.network import Network
from node.protocol.messages import ModelInfo

#: The default model's CIDs: v0 (kubo's defaults) and v1 with raw leaves (another DAG).
CID = "QmR58njnbf5NUQQ6uF9vkbHL4N1h3kFnkFcXdASEa8hQvY"
CID_V1_RAW_LEAVES = "bafybeifvmoiokowzsdfjoiosxsk3t5p42iq6lajhmfld5v22b3osnrzmj4"


async def start(
    nursery, tmp_path, name: str, *, mode: str = "client", mdns: bool = False, service_type: str = "", on_peer=None
) -> tuple[Network, Network]:
    """A network running (DHT ``mode``, and mDNS on ``service_type`` if ``mdns``), twice: as host and as discovery."""
    config = HostConfig(mdns=mdns, mdns_service=service_type, dht_server=mode == "server")
    host = Network(Identity.load(tmp_path / name), config)
    host.greet_lan_peers(on_peer)
    await nursery.start(host.run)
    return host, host


def bare(host: Host) -> str:
    """The host's first address without ``/p2p``."""
    return host.addrs()[0].split("/p2p/")[0]


def table(discovery: Network) -> set[str]:
    return {p.to_base58() for p in discovery.dht.dht.routing_table.get_peer_ids()}


async def until(condition, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.02)


# -------------------------------------------------------------------------- DHT


@pytest.mark.parametrize("target_mode", ["server", "client"])
async def test_find_peer_through_the_dht_without_a_connection_to_the_target(tmp_path, target_mode):
    """A asks S1, which points at S2, which knows T: A learns T's address without ever being connected to it."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            s1, d1 = await start(nursery, tmp_path, "s1", mode="server")
            s2, d2 = await start(nursery, tmp_path, "s2", mode="server")
            t, _ = await start(nursery, tmp_path, "t", mode=target_mode)
            a, da = await start(nursery, tmp_path, "a")
            await s2.connect(s1.addrs()[0])
            await t.connect(s2.addrs()[0])
            await a.connect(s1.addrs()[0])
            await until(lambda: s2.peer_id in table(d1))  # fed on connect, once identify named the KAD protocol
            assert t.peer_id not in a.connected_peers()

            started = time.perf_counter()
            found = await da.find_peer(t.peer_id, timeout_s=10)
            took = time.perf_counter() - started

            assert bare(t) in found, found
            assert all(dialable(addr) == addr for addr in found)
            assert took < 5, f"find_peer took {took:.2f}s"
            assert t.peer_id not in a.connected_peers()  # the lookup never dials the target itself
            await a.connect(f"{found[0]}/p2p/{t.peer_id}")
            # clients never enter a routing table: they cannot answer queries
            for d in (d1, d2):
                assert a.peer_id not in table(d)
            assert (t.peer_id in table(d2)) == (target_mode == "server")
            status = da.status()["discovery"]
            assert json.loads(json.dumps(status)) == status
            assert status["dht"]["mode"] == "client" and status["dht"]["lookups"] == 1
            dht = d1.status()["discovery"]["dht"]
            assert dht["mode"] == "server" and dht["routing_table"] >= 1
            nursery.cancel_scope.cancel()


async def test_routing_table_holds_connected_servers_only(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            s1, d1 = await start(nursery, tmp_path, "s1", mode="server")
            s2, _ = await start(nursery, tmp_path, "s2", mode="server")
            c, dc = await start(nursery, tmp_path, "c")
            await s2.connect(s1.addrs()[0])
            await c.connect(s1.addrs()[0])
            await until(lambda: s2.peer_id in table(d1) and s1.peer_id in table(dc))
            await trio.sleep(0.3)  # identify of the client is done too by now
            assert c.peer_id not in table(d1)
            nursery.cancel_scope.cancel()


async def test_find_peer_of_an_unknown_peer_is_bounded_even_when_a_dht_peer_never_answers(tmp_path):
    """A DHT server that accepts KAD streams and then says nothing costs the lookup its timeout, no more."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            s1, _ = await start(nursery, tmp_path, "s1", mode="server")
            mute = Network(Identity.load(tmp_path / "mute"))
            await nursery.start(mute.run)
            mute.set_handler(KAD_PROTOCOL, lambda stream: trio.sleep_forever())
            a, da = await start(nursery, tmp_path, "a")
            await a.connect(s1.addrs()[0])
            await a.connect(mute.addrs()[0])
            nobody = Identity.load(tmp_path / "nobody").peer_id

            started = time.perf_counter()
            assert await da.find_peer(nobody, timeout_s=1.5) == []
            assert time.perf_counter() - started < 2.5
            assert await da.find_peer("not a peer id", timeout_s=1) == []
            nursery.cancel_scope.cancel()


async def test_find_peer_keeps_only_dialable_addresses_from_a_lying_dht_peer(tmp_path):
    """A DHT peer that answers with wildcards, garbage and hundreds of addresses yields at most 8 dialable ones."""
    target = Identity.load(tmp_path / "target").peer_id
    target_id = ID.from_base58(target)

    async def liar(stream) -> None:
        await _read_frame(stream, 1 << 16)
        reply = Message(type=Message.MessageType.FIND_NODE)
        entry = reply.closerPeers.add()
        entry.id = target_id.to_bytes()
        entry.addrs.extend(
            [
                multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/4001").to_bytes(),
                multiaddr.Multiaddr("/ip4/224.0.0.251/tcp/4001").to_bytes(),
                b"\xff\xfe garbage",
                *[multiaddr.Multiaddr(f"/ip4/192.0.2.{i}/tcp/4001").to_bytes() for i in range(1, 200)],
            ]
        )
        junk = reply.closerPeers.add()
        junk.id = b"not a peer id"
        data = reply.SerializeToString()
        await stream.write(varint.encode(len(data)) + data)
        await stream.close()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = Network(Identity.load(tmp_path / "liar"))
            await nursery.start(server.run)
            server.set_handler(KAD_PROTOCOL, liar)
            a, da = await start(nursery, tmp_path, "a")
            await a.connect(server.addrs()[0])
            found = await da.find_peer(target, timeout_s=5)
            assert found == [f"/ip4/192.0.2.{i}/tcp/4001" for i in range(1, MAX_ADDRS + 1)]
            nursery.cancel_scope.cancel()


async def test_provider_records_by_cid(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            s1, d1 = await start(nursery, tmp_path, "s1", mode="server")
            w, dw = await start(nursery, tmp_path, "worker")
            a, da = await start(nursery, tmp_path, "a")
            await w.connect(s1.addrs()[0])
            await a.connect(s1.addrs()[0])

            assert await dw.provide(CID, timeout_s=10)
            assert await da.find_providers(CID, timeout_s=5) == [(w.peer_id, [bare(w)])]
            # keyed by the multihash: the same root as CIDv1 (dag-pb) finds the same record…
            v1 = make_cid(CID).to_v1().encode("base32").decode()
            assert [p for p, _ in await da.find_providers(v1, timeout_s=5)] == [w.peer_id]
            # …but the CIDv1 with raw leaves is another DAG, another root, other records
            assert await da.find_providers(CID_V1_RAW_LEAVES, timeout_s=2) == []
            assert d1.status()["discovery"]["dht"]["provider_records"] == 1
            with pytest.raises(ModelError, match="not a CID"):
                await da.provide("bafymodel")
            nursery.cancel_scope.cancel()


async def test_wait_for_peer(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            s1, _ = await start(nursery, tmp_path, "s1", mode="server")
            a, da = await start(nursery, tmp_path, "a")
            started = time.perf_counter()
            assert await da.wait_for_peer(0.3) == []
            assert 0.25 < time.perf_counter() - started < 1

            async def connect_later():
                await trio.sleep(0.2)
                await a.connect(s1.addrs()[0])

            nursery.start_soon(connect_later)
            waiters = [da.wait_for_peer(5), da.wait_for_peer(5)]  # two at once both wake
            results = []

            async def wait(coro):
                results.append(await coro)

            async with trio.open_nursery() as inner:
                for coro in waiters:
                    inner.start_soon(wait, coro)
            assert results == [[s1.peer_id], [s1.peer_id]]
            nursery.cancel_scope.cancel()


async def test_bad_settings_are_config_errors(tmp_path):
    host = Host(Identity.load(tmp_path / "x"))
    with pytest.raises(ConfigError, match="DHT mode"):
        DhtService(host, "bogus")
    with pytest.raises(ConfigError, match="service type"):
        LanDiscovery(host.peer_id, host.addrs, host.connect, service_type="_this-name-is-far-too-long._udp.local.")


# ----------------------------------------------------------- mDNS, without a LAN


def test_dialable_refuses_what_nobody_can_dial():
    pid = "12D3KooWEdAKGrhoHB644i5Byc4en6PteSPSirprYcj1CrfzoVo7"
    assert dialable("/ip4/192.0.2.7/tcp/4001") == "/ip4/192.0.2.7/tcp/4001"
    assert dialable("/ip4/192.0.2.7/tcp/4001/p2p/12D3KooWEdAKGrhoHB644i5Byc4en6PteSPSirprYcj1CrfzoVo7") == (
        "/ip4/192.0.2.7/tcp/4001"
    )
    assert dialable("/dns4/gpu.example.org/tcp/4001") == "/dns4/gpu.example.org/tcp/4001"
    for bad in (
        "/ip4/0.0.0.0/tcp/4001",
        "/ip6/::/tcp/4001",
        "/ip4/224.0.0.251/tcp/5353",
        "/ip4/255.255.255.255/tcp/1",
        "/ip4/192.0.2.7/tcp/0",
        "/ip4/192.0.2.7/udp/4001",
        "/ip4/192.0.2.7/tcp/4001/ws",
        "/ip4/192.0.2.7",
        "garbage",
        "",
        f"/ip4/1.2.3.4/tcp/1/p2p/{pid}/p2p-circuit",
    ):
        assert dialable(bad) is None, bad


def test_lan_addresses_expand_wildcards_and_never_announce_them():
    ips = [ip for ip in addresses.interface_ips() if not ipaddress.ip_address(ip).is_loopback]
    announced = lan_addrs(["/ip4/0.0.0.0/tcp/4001/p2p/12D3KooWEdAKGrhoHB644i5Byc4en6PteSPSirprYcj1CrfzoVo7"])
    assert all("0.0.0.0" not in a and "/p2p/" not in a for a in announced)
    v4 = [ip for ip in ips if ":" not in ip]
    if v4:
        assert announced and all(a.endswith("/tcp/4001") for a in announced)
        assert {addresses.host_of(a) for a in announced} <= set(v4)
    assert lan_addrs(["/ip4/127.0.0.1/tcp/5"]) == ["/ip4/127.0.0.1/tcp/5"]  # loopback when nothing else
    assert lan_addrs(["/ip4/127.0.0.1/tcp/5", "/ip4/192.0.2.9/tcp/5"]) == ["/ip4/192.0.2.9/tcp/5"]
    many = [f"/ip4/192.0.2.{i}/tcp/5" for i in range(1, 30)]
    assert len(lan_addrs(many)) == MAX_ADDRS


def txt(*strings: bytes) -> bytes:
    return b"".join(bytes([len(s)]) + s for s in strings)


def test_parse_announcement_keeps_one_peer_and_its_dialable_addresses(tmp_path):
    pid = Identity.load(tmp_path / "p").peer_id
    other = Identity.load(tmp_path / "o").peer_id
    record = txt(
        b"\xff\xfe\x00",
        b"dnsaddr=garbage/p2p/" + pid.encode(),
        f"dnsaddr=/ip4/0.0.0.0/tcp/1/p2p/{pid}".encode(),
        f"dnsaddr=/ip4/192.0.2.1/tcp/1/p2p/{pid}".encode(),
        f"dnsaddr=/ip4/192.0.2.2/tcp/1/p2p/{other}".encode(),  # another peer's address: ignored
        f"dnsaddr=/ip4/192.0.2.1/tcp/1/p2p/{pid}".encode(),  # a duplicate
        f"id={pid}".encode(),
        *[f"dnsaddr{i}=/ip4/192.0.2.{10 + i}/tcp/1/p2p/{pid}".encode() for i in range(20)],
    )
    peer_id, addrs = parse_announcement(record)
    assert peer_id == pid
    assert addrs[0] == "/ip4/192.0.2.1/tcp/1" and len(addrs) == MAX_ADDRS
    assert all("0.0.0.0" not in a and "192.0.2.2/" not in a for a in addrs)
    assert parse_announcement(txt(b"dnsaddr=/ip4/192.0.2.1/tcp/1/p2p/nonsense")) is None
    assert parse_announcement(b"") is None
    assert parse_announcement(b"\x40abc") is None  # a length past the end


# --------------------------------------------------------------- mDNS on a LAN


def random_service_type() -> str:
    return f"_llm-{secrets.token_hex(4)}._udp.local."


def skip_if_off(lan: LanDiscovery) -> None:
    if not lan.state.startswith(("running", "browsing")):
        pytest.skip(f"mDNS cannot run here: {lan.state}")


async def test_two_hosts_find_each_other_by_mdns(tmp_path):
    service = random_service_type()
    met: list[str] = []

    async def on_peer(peer_id: str) -> None:
        met.append(peer_id)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            started = time.perf_counter()
            a, da = await start(nursery, tmp_path, "a", mdns=True, service_type=service, on_peer=on_peer)
            b, db = await start(nursery, tmp_path, "b", mdns=True, service_type=service)
            db.greet_lan_peers(on_peer)  # may be set once the host runs
            skip_if_off(da.lan)
            assert await db.wait_for_peer(15) == [a.peer_id]
            assert await da.wait_for_peer(15) == [b.peer_id]
            took = time.perf_counter() - started
            assert took < 10, f"mDNS discovery took {took:.1f}s"
            await until(lambda: da.lan.status()["found"] == 1 and db.lan.status()["found"] == 1, 10)
            for d in (da, db):
                status = d.status()["discovery"]
                assert json.loads(json.dumps(status)) == status
                assert status["mdns"]["connected"] == 1 and status["mdns"]["service"] == service
                assert status["mdns"]["announced"] and not any("0.0.0.0" in x for x in status["mdns"]["announced"])
            await until(lambda: sorted(met) == sorted([a.peer_id, b.peer_id]))  # each side greets the other once
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def announcer(service_type: str, record: bytes):
    """Someone on the LAN announcing ``record`` (raw TXT bytes) under ``service_type``."""
    zc = await trio.to_thread.run_sync(partial(Zeroconf, ip_version=IPVersion.V4Only))
    name = secrets.token_hex(8)
    info = ServiceInfo(
        service_type,
        f"{name}.{service_type}",
        port=4001,
        properties=record,
        server=f"{name}.local.",
        addresses=[socket.inet_aton("127.0.0.1")],
    )
    try:
        await trio.to_thread.run_sync(zc.register_service, info)
        yield
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(zc.close)


async def test_peers_announcing_garbage_or_dead_addresses_are_dialled_a_bounded_number_of_times(tmp_path):
    """Wildcards and garbage are never dialled; dead or silent addresses at most ``max_failures`` times each."""
    service = random_service_type()
    wild, dead, silent = (Identity.load(tmp_path / n).peer_id for n in ("wild", "dead", "silent"))
    calls: list[str] = []

    async def connect(addr: str) -> None:
        calls.append(addr)
        if addr.endswith(silent):
            await trio.sleep_forever()  # a listener that accepts and never speaks
        raise PeerUnreachable(f"could not connect to {addr}")

    lan = LanDiscovery(
        Identity.load(tmp_path / "me").peer_id,
        lambda: [],  # announces nothing: it only listens
        connect,
        service_type=service,
        dial_timeout_s=0.3,
        retry_s=0.05,
        max_failures=3,
        check_s=0.05,
    )
    records = {
        wild: txt(
            f"dnsaddr=/ip4/0.0.0.0/tcp/4001/p2p/{wild}".encode(),
            f"dnsaddr=/ip6/::/tcp/4001/p2p/{wild}".encode(),
            f"dnsaddr=/ip4/224.0.0.251/tcp/5353/p2p/{wild}".encode(),
            f"dnsaddr=/ip4/192.0.2.1/tcp/0/p2p/{wild}".encode(),
            b"dnsaddr=\xff\xfe/p2p/" + wild.encode(),
        ),
        dead: txt(*[f"dnsaddr=/ip4/127.0.0.1/tcp/{port}/p2p/{dead}".encode() for port in range(1, 21)]),
        silent: txt(f"dnsaddr=/ip4/127.0.0.1/tcp/9/p2p/{silent}".encode()),
    }
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await nursery.start(lan.run)
            skip_if_off(lan)
            async with trio.open_nursery() as announcing:
                for record in records.values():
                    announcing.start_soon(_announce_until_cancelled, service, record)
                await until(lambda: len(lan.peers) == 3, 20)
                await until(lambda: lan.status()["given_up"] == 2, 10)
                await trio.sleep(1.0)  # ten times the first retry delay: nothing more happens
                assert not any(c.endswith(wild) for c in calls)
                assert sum(c.endswith(dead) for c in calls) == 3 * MAX_ADDRS  # 3 dials, each of at most 8 addresses
                assert sum(c.endswith(silent) for c in calls) == 3
                status = lan.status()
                assert status["found"] == 3 and status["connected"] == 0
                assert status["dials"] == 6 and status["dial_failures"] == 6
                announcing.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


async def _announce_until_cancelled(service: str, record: bytes) -> None:
    async with announcer(service, record):
        await trio.sleep_forever()


@pytest.mark.long
async def test_a_flood_of_lan_peers_is_dialled_at_the_dial_rate(tmp_path):
    """Hundreds of (fake) announcements cannot make a node dial faster than ``dial_rate`` (bursts of 4x)."""
    calls: list[str] = []

    async def connect(addr: str) -> None:
        calls.append(addr)
        raise PeerUnreachable("nobody there")

    me = Identity.load(tmp_path / "me").peer_id
    lan = LanDiscovery(me, lambda: [], connect, dial_rate=2.0, check_s=0.05, retry_s=0.01)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lan._dialer)
            for i in range(100):
                peer = Identity.load(tmp_path / f"p{i}").peer_id
                lan._file(f"p{i}.{lan.service_type}", peer, [f"/ip4/192.0.2.{i + 1}/tcp/4001"])
            await trio.sleep(1.5)
            nursery.cancel_scope.cancel()
    assert 8 <= len(calls) <= 8 + 2 * 1.5 + 1


async def test_provider_records_are_a_second_source_of_offers(tmp_path):
    """A requester that hears no offer by gossip asks the DHT who provides the model, and those peers for offers."""
    from node.app.requester import open_requester
    from node.market.offers import OfferBook, OfferGossip

    from .factories import signed_offer

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            server, _ = await start(nursery, tmp_path, "server", mode="server")  # a DHT server that keeps no offers
            identity = Identity.load(tmp_path / "worker")
            worker = Network(identity, HostConfig(dht_server=True, bootstrap=(server.addrs()[0],)))
            await nursery.start(worker.run)
            gossip = OfferGossip(worker, OfferBook())
            await nursery.start(gossip.run)
            offer = signed_offer(identity, 1, time.time() + 60, addrs=worker.advertised(), models=[
                ModelInfo(CID, "m", 2048)])  # fmt: skip
            assert gossip.book.add(offer)  # kept, never published: no gossip carries it
            while not await worker.provide(CID, timeout_s=5):
                await trio.sleep(0.2)  # until the server has the worker in its routing table
            async with open_requester(tmp_path / "requester", (server.addrs()[0],)) as requester:
                assert requester.offers() == []
                offers = await requester.wait_for_model(CID, 20, providers_after_s=0.2)
                assert [o.peer_id for o in offers] == [worker.peer_id]
            nursery.cancel_scope.cancel()
