"""Jobs over real libp2p between in-process nodes, with a scripted engine."""

from __future__ import annotations

import math
import time
from contextlib import asynccontextmanager

import pytest
import trio

from node.engine import Delta, Finished, SamplingParams, Usage
from node.host import Host, HostConfig
from node.identity import Identity
from node.jobs import WorkerService
from node.requester import JobFailed, JobSpec, NoWorker, run_job
from node.routing import Reputation, RouteQuery

from .test_offers import MODEL, make_offer

WORDS = ["Once", " upon", " a", " time", " there", " was", " a", " market", "."]
SPEC = JobSpec(model=MODEL, params=SamplingParams(max_tokens=50), messages=[{"role": "user", "content": "story"}])
QUERY = RouteQuery(model=MODEL, free_only=True)


class ScriptedEngine:
    """Streams WORDS (after echoing any assistant prefix it was given as '[prefix]'), one per tick."""

    def __init__(self, *, slots: int = 1, tick_s: float = 0.01, stall: bool = False, words: list[str] = WORDS):
        self.slots, self.tick_s, self.stall, self.words = slots, tick_s, stall, words
        self.busy = 0
        self.prefixes: list[str] = []

    @property
    def free_slots(self) -> int:
        return self.slots - self.busy

    def stream_chat(self, messages, params, *, assistant_prefix=""):
        self.prefixes.append(assistant_prefix)
        return self._stream(params)

    def stream_completion(self, prompt, params):
        return self._stream(params)

    @asynccontextmanager
    async def _stream(self, params):
        self.busy += 1
        send, recv = trio.open_memory_channel(math.inf)

        async def produce():
            if self.stall:
                await trio.sleep_forever()
            words = self.words[: params.max_tokens]
            for word in words:
                await trio.sleep(self.tick_s)
                send.send_nowait(Delta(word, 1))
            send.send_nowait(Finished("".join(words), Usage(5, len(words)), "stop", 0.0, 0.0))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                yield recv
                nursery.cancel_scope.cancel()
        finally:
            self.busy -= 1


@asynccontextmanager
async def worker(tmp_path, name, engine, *, price=0, **offer_changes):
    """A worker node running in its own task and cancel scope, so a test can kill it."""
    identity = Identity.load(tmp_path / name)
    host = Host(identity)
    life = trio.CancelScope()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        with life:
            async with trio.open_nursery() as inner:
                await inner.start(host.run)
                WorkerService(host, identity, {MODEL: engine}, price_per_1k=price).install()
                task_status.started()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        offer = make_offer(identity, 1, time.time() + 60, addrs=host.addrs(), slots_free=1, **offer_changes)
        yield host, offer, life
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def requester(tmp_path):
    host = Host(Identity.load(tmp_path / "requester"), HostConfig(connect_timeout_s=3, stream_timeout_s=3))
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


async def test_a_job_streams_and_the_receipt_checks_out(tmp_path):
    pieces = []
    with trio.fail_after(20):
        async with worker(tmp_path, "w", ScriptedEngine()) as (_, offer, _), requester(tmp_path) as host:
            result = await run_job(host, lambda: [offer], QUERY, SPEC, reputation=Reputation(), on_text=pieces.append)
    assert result.text == "".join(WORDS) == "".join(pieces)
    assert result.finish_reason == "stop" and result.completion_tokens == len(WORDS)
    assert result.workers == [offer.peer_id] and result.receipts[0].worker == offer.peer_id


async def test_a_busy_worker_fails_over_before_the_first_token(tmp_path):
    busy, free = ScriptedEngine(slots=0), ScriptedEngine()
    failovers = []
    with trio.fail_after(20):
        async with (
            worker(tmp_path, "busy", busy, tokens_per_s=1000) as (_, busy_offer, _),  # the preferred one
            worker(tmp_path, "free", free) as (_, free_offer, _),
            requester(tmp_path) as host,
        ):
            rep = Reputation()
            result = await run_job(
                host,
                lambda: [busy_offer, free_offer],
                QUERY,
                SPEC,
                reputation=rep,
                on_failover=lambda *args: failovers.append(args),
            )
    assert result.workers == [free_offer.peer_id] and result.text == "".join(WORDS)
    assert failovers == [(busy_offer.peer_id, "rejected: busy all slots are busy", False)]
    assert not rep.banned(busy_offer.peer_id, time.time())  # busy is not a fault


async def test_a_worker_dying_mid_stream_is_replaced_and_the_text_continues(tmp_path):
    dying, backup = ScriptedEngine(tick_s=0.05), ScriptedEngine()
    received = []
    with trio.fail_after(20):
        async with (
            worker(tmp_path, "dying", dying, tokens_per_s=1000) as (_, dying_offer, kill),  # the preferred one
            worker(tmp_path, "backup", backup) as (_, backup_offer, _),
            requester(tmp_path) as host,
        ):

            def on_text(piece):
                received.append(piece)
                if len(received) == 3:
                    kill.cancel()  # the worker process "dies": its host goes away mid-stream

            rep = Reputation()
            result = await run_job(
                host, lambda: [dying_offer, backup_offer], QUERY, SPEC, reputation=rep, on_text=on_text
            )
    assert result.workers == [dying_offer.peer_id, backup_offer.peer_id]
    assert backup.prefixes == ["".join(WORDS[:3])]  # the backup continued after what was received
    assert result.text == "".join(WORDS[:3]) + "".join(WORDS[: SPEC.params.max_tokens - 3])
    assert result.completion_tokens == len(WORDS[:3]) + len(WORDS)
    assert rep.banned(dying_offer.peer_id, time.time())


async def test_cancelling_a_job_frees_the_worker_slot(tmp_path):
    engine = ScriptedEngine(tick_s=0.05)
    with trio.fail_after(20):
        async with worker(tmp_path, "w", engine) as (_, offer, _), requester(tmp_path) as host:
            got_text = trio.Event()
            with trio.move_on_after(10) as scope:
                async with trio.open_nursery() as nursery:

                    async def job():
                        await run_job(
                            host,
                            lambda: [offer],
                            QUERY,
                            SPEC,
                            reputation=Reputation(),
                            on_text=lambda _: got_text.set(),
                        )

                    nursery.start_soon(job)
                    await got_text.wait()
                    assert engine.busy == 1
                    nursery.cancel_scope.cancel()
            assert not scope.cancelled_caught
            while engine.busy:  # the worker notices within a tick
                await trio.sleep(0.01)
    assert engine.free_slots == 1


async def test_a_silent_worker_does_not_outlive_the_deadline(tmp_path):
    with trio.fail_after(20):
        async with worker(tmp_path, "w", ScriptedEngine(stall=True)) as (_, offer, _), requester(tmp_path) as host:
            started = time.monotonic()
            with pytest.raises(JobFailed, match="within its 1s deadline"):
                await run_job(host, lambda: [offer], QUERY, SPEC, reputation=Reputation(), deadline_s=1)
            assert time.monotonic() - started < 2


async def test_no_worker_for_the_model(tmp_path):
    async with requester(tmp_path) as host:
        with pytest.raises(NoWorker, match="no worker offers model"):
            await run_job(host, lambda: [], QUERY, SPEC, reputation=Reputation())


async def test_why_nobody_can_take_the_job_is_explained(tmp_path):
    paid = make_offer(Identity.load(tmp_path / "paid"), 1, time.time() + 60, price_per_1k=10, chain_id=1, escrow="0xE")
    stale = make_offer(Identity.load(tmp_path / "stale"), 1, time.time() - 1)
    async with requester(tmp_path) as host:
        with pytest.raises(NoWorker, match=r"\(1 offer expired, 1 paid offer \(pass --max-price to pay\)\)"):
            await run_job(host, lambda: [paid, stale], QUERY, SPEC, reputation=Reputation())
