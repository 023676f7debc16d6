"""Hostile peers cannot crash, wedge or stall a node."""

from __future__ import annotations

import os
import socket
import struct
import time

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmDialAllFailedError, SwarmException
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from node.errors import JobFailed, PeerUnreachable
from node.market.jobs import JOB_PROTOCOL
from node.market.requester import run_job
from node.market.routing import Reputation
from node.net.host import Host, HostConfig
from node.net.identity import Identity
from node.net.network import Network
from node.protocol import messages as m
from node.protocol.wire import decode, frame

from .factories import MODEL, QUERY, SPEC, WORDS, ScriptedEngine, requester, signed_offer, worker


async def _raw_stream(host: Host, offer) -> object:
    stream = await host.open_stream(offer.peer_id, JOB_PROTOCOL, offer.addrs)
    return stream


def _request(**changes) -> bytes:
    fields = dict(job_id="job", model=MODEL, params={"max_tokens": 5}, messages=[{"role": "user", "content": "hi"}])
    return frame(m.JobRequest(**(fields | changes)))


@pytest.mark.parametrize(
    "garbage, rejection",
    [
        (os.urandom(200), None),  # random bytes: dropped without an answer
        (struct.pack(">I", 50 * 1024 * 1024) + b"x" * 100, None),  # a frame announcing 50 MiB
        (frame(m.JobChunk("job", "not a request")), None),  # a valid message of the wrong type
        (b"", None),  # nothing at all, then end of stream
        (_request(params={"temperature": "hot"}), "malformed"),  # bad sampling params
        (_request(messages=[]), "messages must be a non-empty list"),
        (_request(messages=[{"role": "wizard", "content": "hi"}]), "role must be one of"),
        (_request(messages=None, prompt=""), "prompt must be a non-empty string"),
        (_request(messages=None), "send messages or a prompt"),
        (_request(model="bafyother"), "does not serve bafyother"),
    ],
)
async def test_garbage_on_the_job_protocol_leaves_the_worker_serving(tmp_path, garbage, rejection):
    with trio.fail_after(20):
        async with worker(tmp_path, "w", ScriptedEngine()) as (_, offer, _), requester(tmp_path) as host:
            stream = await _raw_stream(host, offer)
            await stream.write(garbage)
            await stream.close_write()
            try:
                reply = await stream.read(1 << 16)
            except ConnectionError:  # reset
                reply = b""
            if rejection is None:
                assert reply == b""
            else:  # a request it can parse but not run: rejected, with the reason
                answer = decode(reply[4:])
                assert isinstance(answer, m.JobRejected), answer
                assert rejection in f"{answer.reason} {answer.detail}"
            result = await run_job(host, lambda: [offer], QUERY, SPEC, reputation=Reputation())
    assert result.text == "".join(WORDS)


async def test_too_many_streams_from_one_peer_are_refused(tmp_path):
    with trio.fail_after(20):
        async with worker(tmp_path, "w", ScriptedEngine()) as (wh, offer, _), requester(tmp_path) as host:
            limit = wh.config.max_inbound_streams_per_peer
            streams = [await _raw_stream(host, offer) for _ in range(limit)]  # each holds a handler open
            try:  # the guard resets the extra stream at once, during or right after negotiation
                with trio.fail_after(2):  # not after the 10 s a normal handler waits for a request
                    extra = await _raw_stream(host, offer)
                    assert await extra.read(10) == b""
            except PeerUnreachable:
                pass
            for stream in streams:
                await stream.reset()
            result = await run_job(host, lambda: [offer], QUERY, SPEC, reputation=Reputation())
    assert result.text == "".join(WORDS)


@pytest.fixture
def silent_listener():
    """Accepts TCP connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


async def test_a_silent_listener_does_not_stall_a_request(tmp_path, silent_listener):
    fake = Identity.load(tmp_path / "fake")
    silent = signed_offer(fake, 1, time.time() + 60, addrs=[f"/ip4/127.0.0.1/tcp/{silent_listener}"], tokens_per_s=1e6)
    with trio.fail_after(30):
        async with worker(tmp_path, "w", ScriptedEngine()) as (_, good, _), requester(tmp_path) as host:
            started = time.monotonic()
            result = await run_job(host, lambda: [silent, good], QUERY, SPEC, reputation=Reputation(), deadline_s=20)
            assert result.workers == [good.peer_id]
            assert time.monotonic() - started < 10  # connect deadline (3 s here), then the good worker
            with pytest.raises(JobFailed):
                await run_job(host, lambda: [silent], QUERY, SPEC, reputation=Reputation(), deadline_s=2)
            assert time.monotonic() - started < 15


async def test_a_plaintext_peer_is_refused(tmp_path):
    noise_only = Network(Identity.load(tmp_path / "a"), HostConfig())
    key_pair = Identity.load(tmp_path / "b").key_pair
    plaintext = new_host(
        key_pair=key_pair,
        sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
        listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")],
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(noise_only.run)
            async with plaintext.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                with pytest.raises(SwarmDialAllFailedError):
                    await plaintext.connect(info_from_p2p_addr(multiaddr.Multiaddr(noise_only.addrs()[0])))
                assert plaintext.get_id() not in noise_only.libp2p.get_connected_peers()
                with pytest.raises(SwarmException):
                    await plaintext.new_stream(noise_only.libp2p.get_id(), [TProtocol(JOB_PROTOCOL)])
            nursery.cancel_scope.cancel()
