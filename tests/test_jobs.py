"""Jobs over real libp2p between in-process nodes, with a scripted engine."""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import asynccontextmanager

import pytest
import trio

from node.concurrency import open_service_nursery
from node.errors import InvalidRequest, JobFailed, NoWorker
from node.inference.batched import EngineFailed
from node.inference.sampling import Delta, TokenLogprob
from node.market.requester import Failover, Timeouts, _WorkerFailed, context_problem, run_job
from node.market.routing import Reputation
from node.net.identity import Identity
from node.protocol.messages import ModelInfo

from .factories import MODEL, QUERY, SPEC, WORDS, Recorder, ScriptedEngine, offer, requester, signed_offer, worker


async def test_a_job_streams_and_the_receipt_checks_out(tmp_path):
    heard = Recorder()
    with trio.fail_after(20):
        async with worker(tmp_path, "w", ScriptedEngine()) as (_, offer, _), requester(tmp_path) as host:
            result = await run_job(host, lambda: [offer], QUERY, SPEC, reputation=Reputation(), observer=heard)
    assert result.text == "".join(WORDS) == "".join(heard.texts)
    assert heard.attempts == [offer.peer_id] and heard.failovers == []
    assert result.finish_reason == "stop" and result.completion_tokens == len(WORDS)
    assert result.workers == [offer.peer_id] and result.receipts[0].worker == offer.peer_id


async def test_a_busy_worker_fails_over_before_the_first_token(tmp_path):
    busy, free = ScriptedEngine(slots=0), ScriptedEngine()
    heard = Recorder()
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
                observer=heard,
            )
    assert result.workers == [free_offer.peer_id] and result.text == "".join(WORDS)
    assert heard.failovers == [(busy_offer.peer_id, "rejected: busy all slots are busy", False)]
    assert heard.attempts == [busy_offer.peer_id, free_offer.peer_id]
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
                host, lambda: [dying_offer, backup_offer], QUERY, SPEC, reputation=rep, observer=Recorder(on_text)
            )
    assert result.workers == [dying_offer.peer_id, backup_offer.peer_id]
    assert backup.prefixes == ["".join(WORDS[:3])]  # the backup continued after what was received
    assert result.text == "".join(WORDS[:3]) + "".join(WORDS[: SPEC.params.max_tokens - 3])
    assert result.completion_tokens == len(WORDS[:3]) + len(WORDS)
    assert rep.banned(dying_offer.peer_id, time.time())


async def test_after_a_failover_a_busy_worker_is_waited_for_not_given_up(tmp_path):
    """The one worker left after a failover was busy, and the job failed at once instead of waiting for it."""
    dying, backup = ScriptedEngine(tick_s=0.05), ScriptedEngine(slots=0)
    received = []
    with trio.fail_after(20):
        async with (
            worker(tmp_path, "dying", dying, tokens_per_s=1000) as (_, dying_offer, kill),  # the preferred one
            worker(tmp_path, "backup", backup) as (_, backup_offer, _),
            requester(tmp_path) as host,
        ):

            async def free_a_slot_later():
                while len(received) < 3:  # until the first worker died
                    await trio.sleep(0.01)
                await trio.sleep(2.0)  # the backup turns the job away as busy meanwhile
                backup.slots = 1

            def on_text(piece):
                received.append(piece)
                if len(received) == 3:
                    kill.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(free_a_slot_later)
                result = await run_job(
                    host, lambda: [dying_offer, backup_offer], QUERY, SPEC, reputation=Reputation(),
                    observer=Recorder(on_text),
                )  # fmt: skip
    assert result.workers == [dying_offer.peer_id, backup_offer.peer_id]
    assert backup.prefixes[-1] == "".join(WORDS[:3]) and result.text.startswith("".join(WORDS[:3]))


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
                            observer=Recorder(lambda _: got_text.set()),
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
    paid = signed_offer(
        Identity.load(tmp_path / "paid"), 1, time.time() + 60, price_per_1k=10, chain_id=1, escrow="0xE"
    )
    stale = signed_offer(Identity.load(tmp_path / "stale"), 1, time.time() - 1)
    async with requester(tmp_path) as host:
        with pytest.raises(NoWorker, match=r"\(1 offer expired, 1 paid offer \(pass --max-price to pay\)\)"):
            await run_job(host, lambda: [paid, stale], QUERY, SPEC, reputation=Reputation())


# ------------------------------------------------- the request's own fault


async def test_a_prompt_too_long_for_the_context_is_the_requests_fault_and_bans_nobody(tmp_path):
    """Workers answer `too_long`; the job ends as InvalidRequest naming the limit, after two of them said so."""
    engines = [ScriptedEngine(prompt_tokens=3000) for _ in range(3)]
    rep = Reputation()
    with trio.fail_after(20):
        async with (
            worker(tmp_path, "a", engines[0]) as (_, a, _),
            worker(tmp_path, "b", engines[1]) as (_, b, _),
            worker(tmp_path, "c", engines[2]) as (_, c, _),
            requester(tmp_path) as host,
        ):
            with pytest.raises(InvalidRequest, match="exceeds the context size 2048"):
                await run_job(host, lambda: [a, b, c], QUERY, SPEC, reputation=rep)
    assert not any(rep.banned(o.peer_id, time.time()) for o in (a, b, c))
    assert sum(len(e.params) for e in engines) == 0  # nobody generated anything
    assert sum(1 for e in engines if e.prefixes) == 2  # asked two workers, not every one


async def test_max_tokens_over_every_offers_context_is_refused_before_routing(tmp_path):
    spec = dataclasses.replace(SPEC, params=dataclasses.replace(SPEC.params, max_tokens=5000))
    engine = ScriptedEngine()
    with trio.fail_after(20):
        async with worker(tmp_path, "w", engine) as (_, offer, _), requester(tmp_path) as host:
            with pytest.raises(InvalidRequest, match="max_tokens 5000 does not fit the model's context of 2048"):
                await run_job(host, lambda: [offer], QUERY, spec, reputation=Reputation())
    assert engine.prefixes == []  # never sent


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role must be one of"),
        ({"messages": None, "prompt": ""}, "prompt must be a non-empty string"),
    ],
)
async def test_malformed_jobs_are_rejected_with_the_reason_and_ban_nobody(tmp_path, change, reason):
    spec = dataclasses.replace(SPEC, **change)
    rep = Reputation()
    with trio.fail_after(20):
        async with worker(tmp_path, "w", ScriptedEngine()) as (_, offer, _), requester(tmp_path) as host:
            with pytest.raises(InvalidRequest, match=reason):
                await run_job(host, lambda: [offer], QUERY, spec, reputation=rep)
    assert not rep.banned(offer.peer_id, time.time())


# --------------------------------------------------------- silent workers


async def test_a_worker_that_accepts_and_sends_nothing_is_dropped_for_the_next(tmp_path):
    """A fake worker that claims to be fast takes the job first, then stays silent: fail over, count it."""
    timeouts = Timeouts(first_token_s=1.0, first_token_per_prompt_byte_s=0.0, progress_s=1.0)
    rep = Reputation()
    heard = Recorder()
    with trio.fail_after(20):
        async with (
            worker(tmp_path, "fake", ScriptedEngine(stall=True), tokens_per_s=1000) as (_, fake, _),
            worker(tmp_path, "honest", ScriptedEngine()) as (_, honest, _),
            requester(tmp_path) as host,
        ):
            started = time.monotonic()
            result = await run_job(
                host, lambda: [fake, honest], QUERY, SPEC, reputation=rep, timeouts=timeouts,
                observer=heard,
            )  # fmt: skip
            assert time.monotonic() - started < 10
    assert result.workers == [honest.peer_id] and result.text == "".join(WORDS)
    assert heard.failovers == [(fake.peer_id, "no first token within 1s", False)]
    assert rep.banned(fake.peer_id, time.time())


async def test_a_worker_that_stops_mid_answer_is_replaced_after_the_progress_timeout(tmp_path):
    timeouts = Timeouts(progress_s=1.0)
    with trio.fail_after(20):
        async with (
            worker(tmp_path, "stuck", ScriptedEngine(stall_after=3), tokens_per_s=1000) as (_, stuck, _),
            worker(tmp_path, "backup", ScriptedEngine()) as (_, backup, _),
            requester(tmp_path) as host,
        ):
            result = await run_job(host, lambda: [stuck, backup], QUERY, SPEC, reputation=Reputation(),
                                   timeouts=timeouts)  # fmt: skip
    assert result.workers == [stuck.peer_id, backup.peer_id]
    assert result.text.startswith("".join(WORDS[:3]))


async def test_logprobs_travel_with_the_text(tmp_path):
    spec = dataclasses.replace(SPEC, params=dataclasses.replace(SPEC.params, logprobs=2))
    heard = Recorder()
    with trio.fail_after(20):
        async with worker(tmp_path, "w", ScriptedEngine()) as (_, offer, _), requester(tmp_path) as host:
            result = await run_job(host, lambda: [offer], QUERY, spec, reputation=Reputation(), observer=heard)
    assert [lp.token for lp in result.logprobs] == WORDS == [lp.token for lp in heard.logprobs]
    assert all(lp.logprob == -0.5 and [t for t, _ in lp.top] == ["alt0", "alt1"] for lp in result.logprobs)


def test_a_prompt_no_context_can_hold_is_refused_before_routing():
    huge = dataclasses.replace(SPEC, messages=[{"role": "user", "content": "x" * (256 * 2048)}])
    assert "at least 2048 tokens" in context_problem([offer()], huge)
    bigger = [offer(), offer(models=[ModelInfo(MODEL, "big", 4096)])]
    assert context_problem(bigger, huge) is None  # one worker's context can hold it
    huger = dataclasses.replace(SPEC, messages=[{"role": "user", "content": "x" * (256 * 4096)}])
    assert "of 4096 tokens" in context_problem(bigger, huger)
    assert context_problem([offer()], SPEC) is None
    assert context_problem([], huge) is None  # nobody serves it: routing says so, not this


# ------------------------------------------------- failover, without a network


def test_failover_continues_after_the_text_a_failed_worker_streamed():
    job = Failover(SPEC)
    first = job.request_to("a")
    assert first.resume_text == "" and first.params["max_tokens"] == SPEC.params.max_tokens
    assert first.params["seed"] == job.seed and first.params["stop"] == list(SPEC.params.stop)
    died = _WorkerFailed("stream ended", partial="Hello", tokens=2)
    died.paid, died.logprobs = 7, [TokenLogprob("Hel", -0.1), TokenLogprob("lo", -0.2)]
    job.failed("a", died)
    second = job.request_to("b")
    assert second.job_id == first.job_id and second.resume_text == "Hello"
    assert second.params["max_tokens"] == SPEC.params.max_tokens - 2 and second.params["seed"] == job.seed
    assert job.workers == ["a"] and job.cost == 7 and job.tried == {"a", "b"}
    assert [o.peer_id for o in job.untried([offer("a"), offer("b"), offer("c")])] == ["c"]


def test_failover_asks_busy_workers_again_and_explains_why_it_gave_up():
    job = Failover(SPEC)
    job.request_to("a")
    job.failed("a", _WorkerFailed("rejected: busy all slots are busy", penalise=False, busy=True))
    job.request_to("b")
    job.failed("b", _WorkerFailed("no first token within 1s"))
    both = [offer("a"), offer("b")]
    assert job.untried(both) == []
    assert job.retry_busy() and job.untried(both) == [both[0]]  # the busy one may be asked again
    assert not job.retry_busy()  # nobody is busy any more
    given_up = job.gave_up()
    assert isinstance(given_up, JobFailed) and "a…: rejected: busy" in str(given_up)
    assert "b…: no first token within 1s" in str(given_up)


def test_failover_ends_as_the_requests_fault_after_enough_workers_say_so():
    job = Failover(SPEC)
    job.failed("a", _WorkerFailed("rejected: too_long exceeds the context", penalise=False, request_fault=True))
    assert isinstance(job.gave_up(), InvalidRequest)  # nobody else left: the request's fault, not the workers'
    with pytest.raises(InvalidRequest, match="too_long exceeds the context"):
        job.failed("b", _WorkerFailed("rejected: too_long exceeds the context", penalise=False, request_fault=True))


def test_a_sampled_job_always_carries_a_seed_and_a_greedy_one_keeps_its_own():
    sampled = dataclasses.replace(SPEC, params=dataclasses.replace(SPEC.params, temperature=0.8, seed=None))
    assert Failover(sampled).seed is not None
    assert Failover(dataclasses.replace(sampled, params=dataclasses.replace(sampled.params, seed=5))).seed == 5
    greedy = dataclasses.replace(SPEC, params=dataclasses.replace(SPEC.params, temperature=0, seed=None))
    assert Failover(greedy).seed is None


class FailingEngine(ScriptedEngine):
    """Streams two words, then its engine fails (as the batched engine's does when llama.cpp does)."""

    @asynccontextmanager
    async def _stream(self, params):
        send, recv = trio.open_memory_channel(math.inf)

        async def produce():  # as BatchedEngine._run: the failure escapes the job's nursery, the channel stays open
            for word in WORDS[:2]:
                send.send_nowait(Delta(word, 1, self.prompt_tokens))
            while send.statistics().current_buffer_used:  # the worker has taken the text: then the failure
                await trio.sleep(0.01)  # polling interval
            raise EngineFailed("llama_decode returned -1")

        async with open_service_nursery() as nursery:
            nursery.start_soon(produce)
            yield recv


async def test_an_engine_failure_mid_job_is_a_job_error_never_a_billable_result(tmp_path):
    heard = Recorder()
    with trio.fail_after(20):
        async with (
            worker(tmp_path, "failing", FailingEngine(), tokens_per_s=1000) as (_, failing_offer, _),
            worker(tmp_path, "backup", ScriptedEngine()) as (_, backup_offer, _),
            requester(tmp_path) as host,
        ):
            result = await run_job(host, lambda: [failing_offer, backup_offer], QUERY, SPEC, reputation=Reputation(),
                                   observer=heard)  # fmt: skip
    ((peer, reason, started),) = heard.failovers
    assert peer == failing_offer.peer_id and started
    assert reason == "worker error: the worker's engine failed: llama_decode returned -1"
    assert result.workers == [failing_offer.peer_id, backup_offer.peer_id]  # the backup continued after its text
    assert [r.worker for r in result.receipts] == [backup_offer.peer_id]  # the failed part signed nothing
