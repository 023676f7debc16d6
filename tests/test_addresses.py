"""Which addresses a node advertises and dials (node.net.addresses, Host.dial); issue 10, item 1."""

from __future__ import annotations

import socket

import pytest
import trio

from node.errors import ConfigError, PeerUnreachable
from node.net.addresses import address_problem, advertised, dial_rank, expand, is_local, parse_announce
from node.net.host import HostConfig
from node.net.identity import Identity
from node.net.network import Network

IPS = ["127.0.0.1", "10.1.0.5", "169.254.3.3", "203.0.113.9", "::1", "fe80::1", "2001:db8::5"]


def test_a_wildcard_is_expanded_to_the_interfaces_of_its_family():
    assert expand("/ip4/0.0.0.0/tcp/4001", IPS) == [
        "/ip4/127.0.0.1/tcp/4001", "/ip4/10.1.0.5/tcp/4001", "/ip4/169.254.3.3/tcp/4001", "/ip4/203.0.113.9/tcp/4001",
    ]  # fmt: skip
    assert expand("/ip6/::/tcp/7", IPS) == ["/ip6/::1/tcp/7", "/ip6/fe80::1/tcp/7", "/ip6/2001:db8::5/tcp/7"]
    assert expand("/ip4/10.1.0.5/tcp/1", IPS) == ["/ip4/10.1.0.5/tcp/1"]


def test_advertised_addresses_never_carry_a_wildcard_and_drop_local_ones_when_there_are_others():
    addrs = advertised(["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"], ips=IPS)
    assert not any("0.0.0.0" in a or "/::/" in a for a in addrs)
    assert not any(is_local(a) for a in addrs)
    assert set(addrs) == {"/ip4/10.1.0.5/tcp/4001", "/ip4/203.0.113.9/tcp/4001", "/ip6/2001:db8::5/tcp/4001"}
    # a node on loopback alone (one machine, the in-process tests) still advertises it
    assert advertised(["/ip4/127.0.0.1/tcp/5"], ips=IPS) == ["/ip4/127.0.0.1/tcp/5"]
    assert advertised(["/ip4/0.0.0.0/tcp/5"], ips=["127.0.0.1"]) == ["/ip4/127.0.0.1/tcp/5"]


def test_announce_replaces_the_direct_addresses_and_relay_addresses_come_last():
    relay = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK/p2p-circuit"
    addrs = advertised(
        ["/ip4/0.0.0.0/tcp/4001"], announce=("/dns4/gpu.example.org/tcp/4001",), circuits=[relay], ips=IPS
    )
    assert addrs == ["/dns4/gpu.example.org/tcp/4001", relay]
    observed = advertised(["/ip4/0.0.0.0/tcp/4001"], observed=["/ip4/198.51.100.7/tcp/4001"], ips=["10.1.0.5"])
    assert observed == ["/ip4/198.51.100.7/tcp/4001", "/ip4/10.1.0.5/tcp/4001"]  # public before private


def test_addresses_are_dialled_public_first_then_private_local_and_relayed():
    relay = "/ip4/198.51.100.1/tcp/1/p2p/12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK/p2p-circuit"
    addrs = [relay, "/ip4/127.0.0.1/tcp/1", "/ip4/192.168.1.4/tcp/1", "/dns4/a.example/tcp/1", "/ip4/100.64.0.1/tcp/1"]
    assert sorted(addrs, key=dial_rank) == [
        "/dns4/a.example/tcp/1", "/ip4/192.168.1.4/tcp/1", "/ip4/100.64.0.1/tcp/1", "/ip4/127.0.0.1/tcp/1", relay,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "addr",
    ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001", "/ip4/1.2.3.4/tcp/1/nonsense", "/unix/tmp/sock", "hello"],
)
def test_addresses_an_offer_may_not_carry(addr):
    assert address_problem(addr) is not None


def test_announce_values_are_checked_with_a_one_line_hint():
    assert parse_announce("/ip4/203.0.113.7/tcp/4001/") == "/ip4/203.0.113.7/tcp/4001"
    assert parse_announce("/dns4/gpu.example.org/tcp/4001") == "/dns4/gpu.example.org/tcp/4001"
    for bad in ("/ip4/0.0.0.0/tcp/4001", "/ip4/1.2.3.4/udp/1", "/ip4/1.2.3.4/tcp/99999", "gpu.example.org:4001"):
        with pytest.raises(ConfigError, match="--announce") as err:
            parse_announce(bad)
        assert "\n" not in str(err.value) and "e.g." in str(err.value)


async def test_a_host_listening_on_every_interface_advertises_dialable_addresses(tmp_path):
    host = Network(Identity.load(tmp_path / "a"), HostConfig(listen=("/ip4/0.0.0.0/tcp/0",)))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            assert host.listening()[0].startswith("/ip4/0.0.0.0/tcp/")
            addrs = host.addrs()
            assert addrs and not any("/0.0.0.0/" in a for a in addrs)
            assert all(a.endswith(f"/p2p/{host.peer_id}") for a in addrs)
            # identify tells peers the same addresses
            client = Network(Identity.load(tmp_path / "b"))
            await nursery.start(client.run)
            await client.connect(addrs[0])
            assert await client.ping(host.peer_id) > 0
            nursery.cancel_scope.cancel()


async def test_a_dial_tries_every_address_and_names_each_failure(tmp_path):
    """Offers used to carry one unusable wildcard address; a dial now goes on to the next and says what it tried."""
    server = Network(Identity.load(tmp_path / "s"))
    client = Network(Identity.load(tmp_path / "c"), HostConfig(dial_stagger_s=0.2))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = f"/ip4/127.0.0.1/tcp/{closed.getsockname()[1]}"  # bound, not listening: refused
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await nursery.start(client.run)
            good = server.advertised()[0]
            await client.dial(server.peer_id, [dead, good])
            assert server.peer_id in client.connected_peers()
            lonely = Network(Identity.load(tmp_path / "l"))
            await nursery.start(lonely.run)
            with pytest.raises(PeerUnreachable) as err:
                await lonely.dial(server.peer_id, [dead, "/ip4/127.0.0.1/tcp/1"])
            message = str(err.value)
            assert dead in message and "/ip4/127.0.0.1/tcp/1" in message and "refused" in message.lower()
            nursery.cancel_scope.cancel()
    closed.close()


async def test_when_every_given_address_fails_the_dht_says_where_the_peer_is(tmp_path):
    """A gossiped offer's addresses can be stale (the worker restarted on another port): the DHT has the new ones."""
    server = Network(Identity.load(tmp_path / "s"), HostConfig(dht_server=True))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            moved = Network(Identity.load(tmp_path / "m"), HostConfig(bootstrap=(server.addrs()[0],)))
            await nursery.start(moved.run)
            moved.set_handler("/llmarket-test/echo/1", lambda stream: stream.close())
            asker = Network(Identity.load(tmp_path / "a"), HostConfig(bootstrap=(server.addrs()[0],)))
            await nursery.start(asker.run)
            stale = "/ip4/127.0.0.1/tcp/1"
            stream = None
            while stream is None:  # until identify has put the server in the asker's routing table
                try:
                    stream = await asker.open_stream(moved.peer_id, "/llmarket-test/echo/1", [stale])
                except PeerUnreachable as err:
                    assert stale in str(err)
                    await trio.sleep(0.2)
            assert moved.peer_id in asker.connected_peers()
            await stream.close()
            nursery.cancel_scope.cancel()
