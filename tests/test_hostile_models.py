"""Hostile peers on the model protocol, and hostile model sources (issue 9, item 6).

Real py-libp2p hosts on 127.0.0.1 (Noise + yamux) in one process: a worker
serving models with ``ModelServer``, a client speaking to it as an attacker
would, and hostile sources built from a bare handler.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time

import pytest
import trio

from node.models.cid import CHUNK_SIZE, FileHasher, parse_cid
from node.models.dag import Pace
from node.models.peers import MAX_REQUEST_FRAME, MODEL_PROTOCOL, ModelServer, PeerSource
from node.models.store import ModelStore
from node.net.host import Host, Stream
from node.net.identity import Identity
from node.net.network import Network
from node.protocol.messages import BlockRequest, CatRequest, DataChunk, DataEnd, JobChunk, NotFound
from node.protocol.wire import Message, receive, send

MISSING_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"  # the empty file, which nobody serves
SIZE = 3 * CHUNK_SIZE + 99 + (1 << 20)  # five leaves under one root


def fake_gguf(path, size=SIZE):
    path.write_bytes(b"GGUF" + random.Random(size).randbytes(size - 4))
    return path


async def _start(nursery, tmp_path, name: str) -> Host:
    host = Network(Identity.load(tmp_path / name))
    await nursery.start(host.run)
    return host


async def _worker(nursery, tmp_path, name="worker") -> tuple[Host, ModelStore, str]:
    """A host serving one cached model; returns it, its store and the model's CID."""
    host = await _start(nursery, tmp_path, name)
    store = ModelStore(tmp_path / f"{name}-models")
    ModelServer(host, store).install()
    held = store.add_file(fake_gguf(tmp_path / f"{name}.gguf"))
    return host, store, held.cid


async def _send_cut_short(stream: Stream, msg: Message) -> None:
    """Send ``msg``; the worker may reset the stream before it has taken all of it, as it should."""
    with contextlib.suppress(ConnectionError):
        await send(stream, msg)


class _Buffered:
    """Reads what a stream received even after our own write to it failed.

    Once a write fails, py-libp2p's ``NetStream`` refuses every read, though
    the worker's answer may be waiting in yamux's buffer; so read yamux's stream.
    """

    def __init__(self, stream: Stream) -> None:
        self.muxed = stream.raw.muxed_stream

    async def read(self, n: int) -> bytes:
        return await self.muxed.read(n)


# ------------------------------------------------- a CID that froze the worker


@pytest.mark.parametrize(
    "cid, reason",
    [
        # The finding: 253 s of a frozen worker for 1 MB, 8-10 s for 200 KB.
        ("z" + "2" * 1_048_000, f"over the {MAX_REQUEST_FRAME} byte cap"),
        ("z" + "2" * 200_000, f"over the {MAX_REQUEST_FRAME} byte cap"),
        ("z" + "2" * 500, "a CID is at most 100"),  # fits in a request frame, refused by the CID parser
    ],
    ids=["1MB", "200KB", "500B"],
)
async def test_a_huge_cid_is_refused_at_once_and_the_worker_keeps_serving(tmp_path, cid, reason):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            worker, _, model = await _worker(nursery, tmp_path)
            client = await _start(nursery, tmp_path, "client")
            stream = await client.open_stream(worker.peer_id, MODEL_PROTOCOL, worker.addrs())
            started = time.perf_counter()
            async with trio.open_nursery() as sending:
                sending.start_soon(_send_cut_short, stream, BlockRequest(cid))
                reply = await receive(_Buffered(stream))
            elapsed = time.perf_counter() - started
            # Nothing else waited on the event loop meanwhile: the worker answers at once.
            rtt_ms = await client.ping(worker.peer_id)
            block = await trio.to_thread.run_sync(PeerSource(client, worker.peer_id).get_block, parse_cid(model))
            nursery.cancel_scope.cancel()
    assert isinstance(reply, NotFound) and reason in reply.detail
    assert elapsed < 1.0
    assert rtt_ms < 1000
    assert parse_cid(model).verify_block(block)


# ------------------------------------------- streams the worker will not read


async def _answer_of(stream: Stream, request: Message) -> list[Message]:
    await send(stream, request)
    answer = [await receive(stream)]
    while isinstance(answer[-1], DataChunk) and isinstance(request, CatRequest):
        answer.append(await receive(stream))
    return answer


@pytest.mark.parametrize("case", ["missing", "bad request", "block", "whole file"])
async def test_after_its_answer_the_worker_resets_the_stream(tmp_path, case):
    # The finding: after `model.missing` the worker only half-closed the stream,
    # and pushing 900 MiB past yamux's receive window raised its RSS by 900 MiB.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            worker, _, model = await _worker(nursery, tmp_path)
            client = await _start(nursery, tmp_path, "client")
            request = {
                "missing": BlockRequest(MISSING_CID),
                "bad request": JobChunk("job", "not a model request"),
                "block": BlockRequest(model),
                "whole file": CatRequest(model),
            }[case]
            stream = await client.open_stream(worker.peer_id, MODEL_PROTOCOL, worker.addrs())
            answer = await _answer_of(stream, request)
            started = time.perf_counter()
            with pytest.raises(ConnectionError):  # 4 MiB: 16 times what the stream may hold unread
                for _ in range(64):
                    await stream.write(bytes(64 << 10))
            refused_after = time.perf_counter() - started
            reset_by_worker = stream.raw.muxed_stream.reset_received
            nursery.cancel_scope.cancel()
    expected = {
        "missing": [NotFound(MISSING_CID, "no such block here")],
        "bad request": [NotFound("", f"bad request: job.chunk/1 is not a request on {MODEL_PROTOCOL}")],
    }
    if case in expected:
        assert answer == expected[case]
    elif case == "block":
        assert isinstance(answer[0], DataChunk) and parse_cid(model).verify_block(answer[0].data)
    else:
        assert isinstance(answer[-1], DataEnd) and answer[-1].size == SIZE
        assert b"".join(m.data for m in answer[:-1]) == (tmp_path / "worker.gguf").read_bytes()
    assert reset_by_worker  # a reset, not only a close: the worker keeps nothing more of this stream
    # Before, the writer filled the receive window and then stalled for 5 s.
    assert refused_after < 2.0


# ----------------------------------------------------------- slow sources


def _hostile_source(data: bytes, misbehaviour: str):
    """A handler serving ``data``'s real blocks, whose file stream slows to a trickle or stops after 1 MiB."""
    hasher = FileHasher(1, keep_inner_blocks=True)
    hasher.update(data)
    root, blocks = hasher.cid(), dict(hasher.inner_blocks)

    async def handle(stream: Stream) -> None:
        request = await receive(stream)
        if isinstance(request, BlockRequest):
            block = blocks.get(parse_cid(request.cid))
            await send(stream, DataChunk(block) if block else NotFound(request.cid))
            return
        for i in range(0, 1 << 20, CHUNK_SIZE):
            await send(stream, DataChunk(data[i : i + CHUNK_SIZE]))
        if misbehaviour == "stall":
            await trio.sleep_forever()
        for i in range(1 << 20, len(data), 64):  # the finding: 64 bytes every 20 s, here every 0.1 s
            await trio.sleep(0.1)
            await send(stream, DataChunk(data[i : i + 64]))

    return root, handle


@pytest.mark.parametrize("misbehaviour, error", [("trickle", "is too slow"), ("stall", "sent nothing for 3s")])
async def test_a_slow_source_is_dropped_for_an_honest_one(tmp_path, caplog, misbehaviour, error):
    # The finding: 64 bytes every 20 s after the first MiB held a new worker for
    # good, silently: only a per-message timeout existed. ("stall" was handled
    # before, by that timeout; it stays handled.)
    caplog.set_level(logging.WARNING, logger="node.models.store")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            honest, _, model = await _worker(nursery, tmp_path, "honest")
            data = (tmp_path / "honest.gguf").read_bytes()
            root, handler = _hostile_source(data, misbehaviour)
            assert str(root) == model
            hostile = await _start(nursery, tmp_path, "hostile")
            hostile.set_handler(MODEL_PROTOCOL, handler)
            client = await _start(nursery, tmp_path, "client")
            sources = [PeerSource(client, p.peer_id, p.addrs(), timeout_s=3) for p in (hostile, honest)]
            store = ModelStore(tmp_path / "client-models", sources, pace=Pace(min_bytes_per_s=256 << 10, window_s=1))
            started = time.perf_counter()
            entry = await trio.to_thread.run_sync(store.fetch, model)
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
    assert entry.path.read_bytes() == data and entry.source == sources[1].name
    assert elapsed < 15  # about 2 s (two windows) to drop the trickle, 3 s for the stall
    [warning] = [r.getMessage() for r in caplog.records if r.name == "node.models.store"]
    assert hostile.peer_id[:16] in warning and error in warning and honest.peer_id[:16] not in warning
