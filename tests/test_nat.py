"""node/net/nat.py and its parts on 127.0.0.1: relay reservations, circuits, relay limits, DCUtR's upgrade, AutoNAT.

Everything here runs in one process on loopback, where every node can dial every
other: a node is made "private" with ``force_reachability`` (that is what the
NAT would make AutoNAT say), and hole punching is off where a test needs a
connection to stay relayed. Real NATs (network namespaces) are another
engineer's tests. The numbers printed (``-s``) are the measurements the module
docstring refers to.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import multiaddr
import pytest
import trio

from node.errors import PeerUnreachable
from node.net.host import HostConfig
from node.net.identity import Identity
from node.net.nat import Nat, NatConfig
from node.net.network import Network

ECHO = "/llmarket-test/nat-echo/1.0.0"
SINK = "/llmarket-test/nat-sink/1.0.0"
MIB = 1 << 20


class Node:
    """A network with its Nat service, in its own cancel scope (``stop()`` kills it)."""

    def __init__(self, host: Network, nat: Nat, life: trio.CancelScope) -> None:
        self.host, self.nat, self.life = host, nat, life

    @property
    def id(self) -> str:
        return self.host.peer_id

    def stop(self) -> None:
        self.life.cancel()


async def start(
    nursery,
    tmp_path,
    name: str,
    *,
    relay_service: bool = True,
    force_reachability: str | None = None,
    hole_punching: bool = True,
    config: NatConfig | None = None,
) -> Node:
    host = Network(
        Identity.load(tmp_path / name),
        HostConfig(connect_timeout_s=5, stream_timeout_s=5, relay_service=relay_service),
    )
    nat = host.nat  # the Network builds and runs its Nat
    nat.relay_service = relay_service
    nat.hole_punching = hole_punching
    if config is not None:
        nat.config = config
    if force_reachability is not None:
        nat.set_reachability(force_reachability)
    host.set_handler(ECHO, echo)
    host.set_handler(SINK, sink)
    life = trio.CancelScope()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        with life:
            async with trio.open_nursery() as inner:
                await inner.start(host.run)
                task_status.started()

    await nursery.start(serve)
    return Node(host, nat, life)


async def echo(stream) -> None:
    while chunk := await stream.read(65536):
        await stream.write(chunk)
    await stream.close()


async def sink(stream) -> None:
    """Reads until end of stream; answers the sha256 of what it read."""
    digest = hashlib.sha256()
    while chunk := await stream.read(65536):
        digest.update(chunk)
    await stream.write(digest.digest())
    await stream.close()


async def wait_for(condition, timeout: float, what: str) -> float:
    """Poll ``condition`` until true; returns the seconds it took."""
    started = trio.current_time()
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.05)
        return trio.current_time() - started
    raise AssertionError(f"{what} not within {timeout}s")


async def read_exactly(stream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await stream.read(n - len(out))
        assert chunk, f"stream ended after {len(out)} of {n} bytes"
        out += chunk
    return out


async def echo_roundtrip(stream, payload: bytes) -> None:
    await stream.write(payload)
    assert await read_exactly(stream, len(payload)) == payload


async def relay_setup(nursery, tmp_path, *, hole_punching: bool = False, **relay_options):
    """A relay R, a private worker W with a reservation on R, and a client C; and W's circuit address."""
    relay = await start(nursery, tmp_path, "relay", force_reachability="public", **relay_options)
    worker = await start(nursery, tmp_path, "worker", force_reachability="private", hole_punching=hole_punching)
    client = await start(nursery, tmp_path, "client", force_reachability="public", hole_punching=hole_punching)
    await worker.host.connect(relay.host.addrs()[0])
    took = await wait_for(lambda: worker.nat.circuit_addrs(), 10, "a reservation")
    print(f"\nreservation held {took:.2f}s after connecting to the relay")
    return relay, worker, client, f"{worker.nat.circuit_addrs()[0]}/p2p/{worker.id}"


# ------------------------------------------------------------------ relaying


async def test_private_node_is_reached_through_its_relay(tmp_path):
    async with trio.open_nursery() as nursery:
        relay, worker, client, addr = await relay_setup(nursery, tmp_path)
        assert addr.startswith(relay.host.addrs()[0].split("/p2p/")[0] + f"/p2p/{relay.id}/p2p-circuit/p2p/")

        started = time.perf_counter()
        await client.nat.dial(addr)
        print(f"relayed dial took {1000 * (time.perf_counter() - started):.0f} ms")
        assert client.nat.connection_kind(worker.id) == "relayed"
        await wait_for(lambda: worker.nat.connection_kind(client.id) == "relayed", 5, "the worker seeing the circuit")

        stream = await client.host.open_stream(worker.id, ECHO)
        await echo_roundtrip(stream, b"hello through the relay")
        conn = stream.raw.muxed_conn
        assert type(conn).__name__ == "GuardedYamux"  # relayed connections go through the host's upgrader
        await stream.close()
        await client.nat.dial(addr)  # connected already: no second circuit

        w, r, c = worker.nat.status(), relay.nat.status(), client.nat.status()
        assert w["reachability"] == "private" and "configuration" in w["reason"]
        assert w["circuit_addrs"] == worker.nat.circuit_addrs()
        [held] = w["reservations"]
        assert held["relay"] == relay.id and held["limit"] is None and 3500 < held["expires_in_s"] <= 3600
        assert w["peers"] == {relay.id: "direct", client.id: "relayed"}
        assert not w["relaying"] and w["observed_addrs"] == []
        assert r["served"]["reservations"] == 1 and r["served"]["peers"] == [worker.id]
        assert r["served"]["circuits"] == 1 and r["relaying"]
        assert c["peers"] == {relay.id: "direct", worker.id: "relayed"} and c["reservations"] == []
        json.dumps([w, r, c])
        nursery.cancel_scope.cancel()


async def test_relay_carries_many_mebibytes_and_is_not_limited(tmp_path):
    """A circuit has no data or time limit (module docstring): 16 MiB one way, with the throughput; 4 MiB echoed."""
    async with trio.open_nursery() as nursery:
        relay, worker, client, addr = await relay_setup(nursery, tmp_path)
        await client.nat.dial(addr)
        payload = os.urandom(16 * MIB)
        stream = await client.host.open_stream(worker.id, SINK)
        started = time.perf_counter()
        with trio.fail_after(60):
            for i in range(0, len(payload), MIB):
                await stream.write(payload[i : i + MIB])
            await stream.close_write()
            assert await read_exactly(stream, 32) == hashlib.sha256(payload).digest()
        took = time.perf_counter() - started
        print(f"16 MiB through the relay in {took:.2f}s: {16 / took:.1f} MiB/s")
        assert relay.nat.status()["served"]["circuit_bytes"] >= 16 * MIB

        stream = await client.host.open_stream(worker.id, ECHO)  # and the other way
        with trio.fail_after(60):
            async with trio.open_nursery() as both:
                both.start_soon(stream.write, payload[: 4 * MIB])
                assert await read_exactly(stream, 4 * MIB) == payload[: 4 * MIB]
        nursery.cancel_scope.cancel()


async def test_a_relay_with_limits_cuts_the_circuit(tmp_path):
    """What an operator who sets limits gets (and what py-libp2p's defaults would do at 1 GiB)."""
    config = NatConfig(circuit_data_bytes=256 * 1024)
    async with trio.open_nursery() as nursery:
        relay, worker, client, addr = await relay_setup(nursery, tmp_path, config=config)
        assert worker.nat.status()["reservations"][0]["limit"] == {"duration_s": 0, "data_bytes": 256 * 1024}
        await client.nat.dial(addr)
        stream = await client.host.open_stream(worker.id, SINK)
        with trio.fail_after(20), pytest.raises(ConnectionError):
            for _ in range(64):
                await stream.write(b"x" * 65536)
                await trio.sleep(0.01)
        await wait_for(lambda: client.nat.connection_kind(worker.id) is None, 10, "the circuit closing")
        nursery.cancel_scope.cancel()


async def test_two_circuits_to_one_peer_do_not_end_each_other(tmp_path):
    """py-libp2p's relay kept circuits by peer: one ending closed another one to the same peer."""
    async with trio.open_nursery() as nursery:
        relay, worker, client, addr = await relay_setup(nursery, tmp_path)
        other = await start(nursery, tmp_path, "other", force_reachability="public", hole_punching=False)
        await client.nat.dial(addr)
        await other.nat.dial(addr)
        assert relay.nat.status()["served"]["circuits"] == 2
        stream = await other.host.open_stream(worker.id, ECHO)
        await echo_roundtrip(stream, b"before")
        await client.host.libp2p.disconnect(worker.host.libp2p.get_id())  # the first circuit ends
        await wait_for(lambda: relay.nat.status()["served"]["circuits"] == 1, 10, "the first circuit ending")
        await trio.sleep(0.5)
        await echo_roundtrip(stream, b"after the other circuit ended")
        await stream.close()
        nursery.cancel_scope.cancel()


async def test_relay_caps_reservations_and_circuits(tmp_path):
    config = NatConfig(max_reservations=1, max_circuits=1)
    async with trio.open_nursery() as nursery:
        relay, worker, client, addr = await relay_setup(nursery, tmp_path, config=config)
        late = await start(nursery, tmp_path, "late", force_reachability="private", hole_punching=False)
        await late.host.connect(relay.host.addrs()[0])
        await wait_for(lambda: relay.id in late.nat.status()["relay_problems"], 10, "a refusal")
        assert "RESERVATION_REFUSED" in late.nat.status()["relay_problems"][relay.id]

        await client.nat.dial(addr)
        other = await start(nursery, tmp_path, "other", force_reachability="public", hole_punching=False)
        with pytest.raises(PeerUnreachable, match="RESOURCE_LIMIT_EXCEEDED"):
            await other.nat.dial(addr)
        await client.host.libp2p.disconnect(worker.host.libp2p.get_id())  # a slot frees when a circuit ends
        await wait_for(lambda: relay.nat.status()["served"]["circuits"] == 0, 10, "the circuit ending")
        await other.nat.dial(addr)

        # …and a reservation's slot when its peer leaves (py-libp2p kept it until it expired)
        await worker.host.libp2p.disconnect(relay.host.libp2p.get_id())
        await wait_for(lambda: relay.nat.status()["served"]["reservations"] == 0, 10, "the reservation freed")
        nursery.cancel_scope.cancel()


async def test_hop_is_refused_without_relay_service(tmp_path):
    async with trio.open_nursery() as nursery:
        relay = await start(nursery, tmp_path, "relay", force_reachability="public", relay_service=False)
        worker = await start(nursery, tmp_path, "worker", force_reachability="private", hole_punching=False)
        await worker.host.connect(relay.host.addrs()[0])
        await trio.sleep(3)
        assert worker.nat.circuit_addrs() == [] and not relay.nat.status()["relaying"]
        # asked anyway: the protocol is not there
        assert not await worker.nat.client._reserve(relay.host.libp2p.get_id())
        assert relay.id in worker.nat.status()["relay_problems"]
        client = await start(nursery, tmp_path, "client", force_reachability="public", hole_punching=False)
        with pytest.raises(PeerUnreachable, match="does not relay"):
            await client.nat.dial(f"{relay.host.addrs()[0]}/p2p-circuit/p2p/{worker.id}")
        nursery.cancel_scope.cancel()


async def test_a_private_node_does_not_relay(tmp_path):
    async with trio.open_nursery() as nursery:
        relay = await start(nursery, tmp_path, "relay", force_reachability="private", hole_punching=False)
        worker = await start(nursery, tmp_path, "worker", force_reachability="private", hole_punching=False)
        await worker.host.connect(relay.host.addrs()[0])
        await wait_for(lambda: relay.id in worker.nat.status()["relay_problems"], 10, "a refusal")
        assert "PERMISSION_DENIED" in worker.nat.status()["relay_problems"][relay.id]
        assert worker.nat.circuit_addrs() == []
        nursery.cancel_scope.cancel()


async def test_circuit_dial_errors_are_one_line(tmp_path):
    async with trio.open_nursery() as nursery:
        relay = await start(nursery, tmp_path, "relay", force_reachability="public", hole_punching=False)
        client = await start(nursery, tmp_path, "client", force_reachability="public", hole_punching=False)
        stranger = Identity.load(tmp_path / "stranger").peer_id
        with pytest.raises(PeerUnreachable, match="NO_RESERVATION") as err:
            await client.nat.dial(f"{relay.host.addrs()[0]}/p2p-circuit/p2p/{stranger}")
        assert "\n" not in str(err.value)
        with pytest.raises(PeerUnreachable, match="not a circuit address"):
            await client.nat.dial(relay.host.addrs()[0])
        with pytest.raises(PeerUnreachable, match="no address for it"):
            await client.nat.dial(f"/p2p/{stranger}/p2p-circuit/p2p/{Identity.load(tmp_path / 'another').peer_id}")
        with pytest.raises(PeerUnreachable, match="our own address"):
            await client.nat.dial(f"{relay.host.addrs()[0]}/p2p-circuit/p2p/{client.id}")
        nursery.cancel_scope.cancel()


async def test_reservations_move_when_a_relay_goes(tmp_path):
    config = NatConfig(max_relays=2)
    async with trio.open_nursery() as nursery:
        relays = [await start(nursery, tmp_path, f"relay{i}", force_reachability="public") for i in range(3)]
        worker = await start(
            nursery, tmp_path, "worker", force_reachability="private", hole_punching=False, config=config
        )
        for relay in relays:
            await worker.host.connect(relay.host.addrs()[0])
        await wait_for(lambda: len(worker.nat.held) == 2, 10, "two reservations")
        held = {r["relay"] for r in worker.nat.status()["reservations"]}
        gone = next(r for r in relays if r.id in held)
        spare = next(r for r in relays if r.id not in held)
        gone.stop()
        took = await wait_for(
            lambda: {r["relay"] for r in worker.nat.status()["reservations"]} == (held - {gone.id}) | {spare.id},
            15,
            "a reservation on the spare relay",
        )
        print(f"\nre-reserved on another relay {took:.2f}s after one went")
        assert not any(f"/p2p/{gone.id}/" in a for a in worker.nat.circuit_addrs())
        assert len(worker.nat.circuit_addrs()) == 2
        nursery.cancel_scope.cancel()


async def test_reservations_are_refreshed_before_they_expire(tmp_path):
    config = NatConfig(reservation_ttl_s=4)
    async with trio.open_nursery() as nursery:
        relay = await start(nursery, tmp_path, "relay", force_reachability="public", config=config)
        worker = await start(nursery, tmp_path, "worker", force_reachability="private", hole_punching=False)
        await worker.host.connect(relay.host.addrs()[0])
        await wait_for(lambda: worker.nat.held, 10, "a reservation")
        first = worker.nat.status()["reservations"][0]["expires_at"]
        await wait_for(
            lambda: worker.nat.held and worker.nat.status()["reservations"][0]["expires_at"] > first, 15, "a refresh"
        )
        assert worker.nat.circuit_addrs()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ DCUtR


def connection_kinds(a, b) -> list[str]:
    """The kinds ("DIRECT", "RELAYED") of a's open connections to b."""
    conns = a.host.libp2p.get_network().connections.get(b.host.libp2p.get_id(), [])
    return sorted(c.muxed_conn.get_connection_type().name for c in conns)


async def test_dcutr_upgrade_keeps_the_relayed_stream_and_moves_new_ones(tmp_path):
    """With one connection per peer, a direct connection must not cut what runs on the relayed one."""
    async with trio.open_nursery() as nursery:
        relay, worker, client, addr = await relay_setup(nursery, tmp_path, hole_punching=True)
        for node in (client, worker):  # py-libp2p would now trim the connection with fewer streams: the direct one
            node.host.libp2p.get_network().connection_config.grace_period = 0
        started = time.perf_counter()
        await client.nat.dial(addr)
        old = await client.host.open_stream(worker.id, ECHO)  # opened while relayed: must survive the upgrade
        assert old.raw.muxed_conn.get_connection_type().name == "RELAYED"
        await echo_roundtrip(old, b"before")

        assert await client.nat.wait_direct(worker.id, 15)
        print(f"direct connection {time.perf_counter() - started:.2f}s after the relayed dial")
        assert client.nat.connection_kind(worker.id) == "direct"
        new = await client.host.open_stream(worker.id, ECHO)
        assert new.raw.muxed_conn.get_connection_type().name == "DIRECT"
        await echo_roundtrip(new, b"direct")

        await trio.sleep(3)  # the drain loop leaves a relayed connection alone while it carries a stream
        await echo_roundtrip(old, b"still on the relayed connection")
        # both sides of a hole punch dial, so there may be one or two direct connections besides the relayed one
        kinds = connection_kinds(client, worker)
        assert kinds.count("RELAYED") == 1 and kinds.count("DIRECT") >= 1, kinds
        await old.close()
        await new.close()
        await wait_for(
            lambda: connection_kinds(client, worker) and "RELAYED" not in connection_kinds(client, worker),
            10,
            "the idle relayed connection closing",
        )
        assert client.nat.connection_kind(worker.id) == "direct"
        assert worker.nat.connection_kind(client.id) == "direct"
        await wait_for(lambda: relay.nat.status()["served"]["circuits"] == 0, 5, "the circuit ending")
        assert await client.nat.wait_direct(worker.id, 1)
        assert not await client.nat.wait_direct(Identity.load(tmp_path / "nobody").peer_id, 1)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ AutoNAT


async def test_autonat_public_on_loopback(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start(nursery, tmp_path, "a")
        b = await start(nursery, tmp_path, "b")
        assert a.nat.reachability == "unknown" and a.nat.reason == "no AutoNAT server asked yet"
        assert a.nat.hop_enabled  # unknown is not private
        await a.host.connect(b.host.addrs()[0])
        took = await wait_for(lambda: a.nat.reachability == "public" and b.nat.reachability == "public", 15, "public")
        print(f"\nAutoNAT said public {took:.2f}s after connecting")
        port = a.host.addrs()[0].split("/tcp/")[1].split("/")[0]
        assert a.nat.reason == f"1 peer dialled back /ip4/127.0.0.1/tcp/{port}"
        assert a.nat.observed_addrs() == []  # the confirmed address is our listen address
        nursery.cancel_scope.cancel()


async def test_autonat_private_when_the_dial_back_fails(tmp_path):
    """The server really dials (py-libp2p's said yes because a connection existed): a closed port is private."""
    async with trio.open_nursery() as nursery:
        a = await start(nursery, tmp_path, "a", hole_punching=False)
        b = await start(nursery, tmp_path, "b", hole_punching=False)
        closed = trio.socket.socket()
        await closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        a.nat.autonat._dialback_candidates = lambda: [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]
        await a.host.connect(b.host.addrs()[0])
        await wait_for(lambda: a.nat.reachability == "private", 15, "private")
        assert a.nat.reason == f"dial-back from {b.id[:12]}… to /ip4/127.0.0.1/tcp/{port} failed"
        assert not a.nat.hop_enabled and a.nat.observed_addrs() == []
        # …and a private node reserves a slot on a peer that relays
        await wait_for(lambda: a.nat.circuit_addrs(), 10, "a reservation")
        nursery.cancel_scope.cancel()
