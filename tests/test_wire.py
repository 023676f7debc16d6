"""Wire messages: round trips, and hostile input becoming one WireError."""

from __future__ import annotations

import os
import struct

import msgpack
import pytest
import trio

from node.errors import WireError
from node.protocol import messages as m
from node.protocol.wire import MAX_FRAME, decode, encode, frame, receive, receive_as, registered_types, send

from . import factories


def sample_offer(**changes) -> m.Offer:
    return factories.offer(tokens_per_s=100.5, first_token_ms=12.0, slots_total=2, seq=3, **changes)


def encode_fields() -> dict:
    return msgpack.unpackb(encode(sample_offer()))[1]


def test_round_trips():
    samples = [
        sample_offer(),
        m.JobRequest("j1", "bafy", {"max_tokens": 5}, messages=[{"role": "user", "content": "hi"}]),
        m.JobRequest("j2", "bafy", {}, prompt="once upon"),
        m.JobDone("j1", "stop", m.ResultReceipt("j1", "bafy", b"\0" * 32, b"\1" * 32, 3, 4, "peer", b"sig")),
        m.DataChunk(os.urandom(1000)),
        m.DataEnd(),
    ]
    for msg in samples:
        assert decode(encode(msg)) == msg


def test_every_type_name_is_versioned_and_unique():
    names = registered_types()
    assert all("/" in name for name in names)
    assert len(set(names.values())) == len(names)


def test_unknown_fields_are_ignored_missing_ones_refused():
    body = msgpack.packb(["job.cancel/1", {"job_id": "x", "from_the_future": 1}])
    assert decode(body) == m.JobCancel("x")
    with pytest.raises(WireError, match="lacks the field 'job_id'"):
        decode(msgpack.packb(["job.cancel/1", {}]))


@pytest.mark.parametrize(
    "body, message",
    [
        (b"\xc1", "not msgpack"),
        (msgpack.packb({"a": 1}), r"\[type, \{fields\}\]"),
        (msgpack.packb(["nope/1", {}]), "unknown message type"),
        (msgpack.packb(["job.cancel/1", {"job_id": 5}]), "expected str"),
        (msgpack.packb(["job.chunk/1", {"job_id": "a", "text": b"bytes"}]), "expected str"),
        (msgpack.packb(["offer/1", {**encode_fields(), "models": [{"cid": 1}]}]), "offer/1.models"),
        (msgpack.packb(["offer/1", {**encode_fields(), "slots_total": True}]), "boolean"),
    ],
)
def test_bad_bodies_are_one_wire_error(body, message):
    with pytest.raises(WireError, match=message):
        decode(body)


def test_random_bytes_never_escape_as_anything_but_wire_error():
    for seed in range(300):
        with pytest.raises(WireError):
            decode(os.urandom(seed % 64 + 1))


class Pipe:
    """An in-memory byte stream with the read(n)/write(data) of a libp2p stream."""

    def __init__(self, data: bytes = b"", chunk: int = 7):
        self.data, self.chunk, self.written = bytearray(data), chunk, bytearray()

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        out = bytes(self.data[: min(n, self.chunk)])
        del self.data[: len(out)]
        return out

    async def write(self, data: bytes) -> None:
        self.written += data


async def test_frames_over_a_stream_in_small_pieces():
    out = Pipe()
    await send(out, m.JobChunk("j", "hello"))
    await send(out, m.JobCancel("j"))
    pipe = Pipe(bytes(out.written), chunk=3)
    assert await receive(pipe) == m.JobChunk("j", "hello")
    assert await receive_as(pipe, m.JobCancel) == m.JobCancel("j")
    with pytest.raises(EOFError):
        await receive(pipe)


async def test_oversized_and_truncated_frames():
    with pytest.raises(WireError, match="over the 1048576 byte cap"):
        await receive(Pipe(struct.pack(">I", MAX_FRAME + 1) + b"x" * 10))
    with pytest.raises(WireError, match="over the 100 byte cap"):
        await receive(Pipe(frame(m.DataChunk(b"x" * 200))), max_frame=100)
    with pytest.raises(EOFError):
        await receive(Pipe(frame(m.JobChunk("j", "hello"))[:-2]))
    with pytest.raises(WireError, match="expected job.cancel/1, got job.chunk/1"):
        await receive_as(Pipe(frame(m.JobChunk("j", "x"))), m.JobCancel)
