"""Spot checks through the market and fraud reports, with real engines and real libp2p on 127.0.0.1.

A cheating worker (hidden system prompt) answers a requester; another worker checks the answer for it on
``/llmarket/verify/1.0.0``; the requester bans the cheater and gossips a report. A node with the model re-checks
the report and bans the cheater too; a node without it takes it as a hint. A framer's report against an honest
worker, with a verdict it signed itself, gets the framer banned and leaves the worker alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import pytest
import trio

from node.errors import WireError
from node.inference.engine import open_engine
from node.inference.sampling import SamplingParams
from node.market.jobs import VERIFY_PROTOCOL, WorkerService, receipt_signing_bytes, request_hash
from node.market.requester import JobSpec, run_job
from node.market.routing import Reputation, RouteQuery
from node.net.host import Host, HostConfig
from node.net.identity import Identity
from node.net.network import Network
from node.protocol.messages import ResultReceipt, SignedVerdict
from node.protocol.wire import encode
from node.verify.fraud import CHEATER_BAN_S, TOPIC, FraudWatch, audit, make_report, parse_report
from node.verify.local import CheckingEngine, LocalVerifier
from node.verify.spot import verification_request
from tests import cheaters
from tests.factories import MODEL, signed_offer

slow = pytest.mark.slow
SPEC = JobSpec(
    model=MODEL,
    params=SamplingParams(max_tokens=40, temperature=0.7),
    messages=[{"role": "user", "content": "Write a detailed paragraph about how volcanoes form."}],
)


@dataclass
class Node:
    identity: Identity
    host: Host
    reputation: Reputation = field(default_factory=Reputation)
    fraud: FraudWatch | None = None
    offer: object = None
    market: list = field(default_factory=list)  # the offers this node knows

    @property
    def id(self) -> str:
        return self.identity.peer_id

    def offers(self):
        return list(self.market)


async def start_node(nursery, tmp_path, name, *, engine=None, checker=None, watch_engines=None, act=True) -> Node:
    identity = Identity.load(tmp_path / name)
    host = Network(identity, HostConfig(connect_timeout_s=5, stream_timeout_s=5, mdns=False))
    await nursery.start(host.run)
    node = Node(identity, host)
    if engine is not None:  # a worker: jobs, and verification jobs with ``checker``
        WorkerService(host, identity, {MODEL: engine}).install()
        WorkerService(host, identity, {MODEL: CheckingEngine(checker)}, protocol=VERIFY_PROTOCOL).install()
        node.offer = signed_offer(identity, 1, time.time() + 600, addrs=host.addrs(), verify_price_per_1k=0)
    node.fraud = await nursery.start(FraudWatch(host, node.reputation, engines=watch_engines or {}, act=act).run)
    return node


async def mesh(nodes: list[Node]) -> None:
    """Connect every pair and wait until each sees all the others on the fraud topic."""
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            await a.host.connect(b.host.addrs()[0])
    for node in nodes:
        while len(node.host.pubsub.peer_topics.get(TOPIC, ())) < len(nodes) - 1:
            await trio.sleep(0.05)  # polling: subscriptions arrive by gossip


def forged_verdict(framer: Identity, proof) -> SignedVerdict:
    """A failing verdict on ``proof``'s answer that ``framer`` signs without checking anything."""
    request = verification_request(proof, 0)
    verdict = {"ok": False, "reason": "made up", "tokens": 40, "max_error": 9.0, "mean_error": 3.0, "flips": 0,
               "outside": 0, "surprise_z": 0.0}  # fmt: skip
    text = json.dumps({"job_id": proof.request.job_id, "worker": proof.worker, "verdict": verdict, "evidence": "",
                       "receipt_signature": proof.done.receipt.signature.hex()})  # fmt: skip
    receipt = ResultReceipt(request.job_id, MODEL, request_hash(request), hashlib.sha256(text.encode()).digest(),
                            100, 0, framer.peer_id)  # fmt: skip
    signed = ResultReceipt(**{**receipt.__dict__, "signature": framer.sign(receipt_signing_bytes(receipt))})
    return SignedVerdict(request, text, signed)


async def wait_for(event_holder, count: int) -> None:
    while len(event_holder.outcomes) < count:
        await event_holder.acted.wait()


@slow
async def test_a_spot_check_catches_a_cheat_and_the_report_is_rechecked_or_taken_as_a_hint(
    default_model_file, tmp_path
):
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(open_engine(default_model_file, slots=2, threads=1))
        verifying = await stack.enter_async_context(open_engine(default_model_file, slots=1, threads=1))
        nursery = await stack.enter_async_context(trio.open_nursery())
        with trio.fail_after(240):
            cheat = await start_node(nursery, tmp_path, "cheat", engine=cheaters.HiddenPrompt(engine), checker=engine)
            honest = await start_node(nursery, tmp_path, "honest", engine=engine, checker=verifying)
            requester = await start_node(nursery, tmp_path, "requester")
            with_model = await start_node(nursery, tmp_path, "with-model", watch_engines={MODEL: verifying})
            without = await start_node(nursery, tmp_path, "without-model")
            framer = await start_node(nursery, tmp_path, "framer")
            await mesh([cheat, honest, requester, with_model, without, framer])
            requester.market = [cheat.offer, honest.offer]
            query = RouteQuery(MODEL, free_only=True, pinned_peer=cheat.id)

            # the cheat answers; the honest worker checks it for the requester, free (verify price 0)
            result = await run_job(requester.host, requester.offers, query, SPEC, reputation=requester.reputation)
            checks = await audit(requester, result, spot_check_probability=1.0, query=query)
            assert checks.spot is not None and checks.spot.verifier == honest.id and checks.spot.cost == 0
            assert not checks.spot.verdict.ok and checks.reported
            assert requester.reputation.banned(cheat.id, time.time() + CHEATER_BAN_S - 60)
            await wait_for(with_model.fraud, 1)
            await wait_for(without.fraud, 1)
            assert with_model.fraud.outcomes[0].action == "banned the worker"
            assert with_model.reputation.banned(cheat.id, time.time() + CHEATER_BAN_S - 60)
            assert without.fraud.outcomes[0].action == "hint"  # one verifier: below the quorum, nothing done
            assert not without.reputation.banned(cheat.id, time.time())

            # an honest answer, checked by its requester's own engine: it passes, and nothing is reported
            query = RouteQuery(MODEL, free_only=True, pinned_peer=honest.id)
            good = await run_job(requester.host, requester.offers, query, SPEC, reputation=requester.reputation)
            clean = await audit(requester, good, verifier=LocalVerifier({MODEL: verifying}), query=query)
            assert clean.local.ok and clean.spot is None and not clean.reported

            # a framer reports the honest answer with a verdict it signed itself
            framed = make_report(framer.identity, good.proof, [forged_verdict(framer.identity, good.proof)])
            await framer.fraud.publish(framed)
            await wait_for(with_model.fraud, 2)
            await wait_for(without.fraud, 2)
            assert with_model.fraud.outcomes[1].action == "banned the reporter"
            assert with_model.reputation.banned(framer.id, time.time() + CHEATER_BAN_S - 60)
            assert not with_model.reputation.banned(honest.id, time.time())
            assert without.fraud.outcomes[1].action == "hint"
            assert not without.reputation.banned(honest.id, time.time() + 60)  # a hint never bans for long
        nursery.cancel_scope.cancel()


def _signed_proof(worker: Identity, job_id: str):
    """A proof of a (made-up) answer that ``worker`` really signed."""
    from node.market.requester import Proof
    from node.protocol.messages import JobDone, JobRequest

    request = JobRequest(job_id=job_id, model=MODEL, params={"max_tokens": 4, "temperature": 0.7}, prompt="hi")
    fingerprints = b"\x01" * 15
    receipt = ResultReceipt(job_id, MODEL, request_hash(request), hashlib.sha256(b"out").digest(), 2, 1,
                            worker.peer_id, fingerprints_hash=hashlib.sha256(fingerprints).digest())  # fmt: skip
    receipt = ResultReceipt(**{**receipt.__dict__, "signature": worker.sign(receipt_signing_bytes(receipt))})
    return Proof(request, JobDone(job_id, "length", receipt, fingerprints), "out")


def test_a_report_that_does_not_hold_together_is_dropped(tmp_path):
    """Reports are checked before they are forwarded: signatures of the reporter, the accused and the verifiers."""
    from node.market.requester import Proof

    worker, reporter, other = (Identity.load(tmp_path / n) for n in ("worker", "reporter", "other"))
    proof = _signed_proof(worker, "j1")
    request = proof.request
    good = make_report(reporter, proof, [forged_verdict(other, proof)])
    assert parse_report(encode(good), reporter.peer_id) == good  # well formed (its verdict is a lie, not a forgery)
    resigned = dataclasses.replace(good, signature=other.sign(b"something else"))
    tampered_text = make_report(reporter, Proof(request, proof.done, "not what it said"), [])
    self_verdict = make_report(reporter, proof, [forged_verdict(worker, proof)])
    for report, publisher, why in (
        (good, other.peer_id, "published by another peer"),
        (resigned, reporter.peer_id, "bad reporter signature"),
        (tampered_text, reporter.peer_id, "receipt does not match the text received"),
        (self_verdict, reporter.peer_id, "a verdict by the accused"),
    ):
        with pytest.raises(WireError, match=why):
            parse_report(encode(report), publisher)


async def test_a_noisy_workers_statistical_failure_is_a_strike_and_two_in_a_row_ban_and_report(tmp_path):
    """A verdict that failed only on counts honest noise crosses now and then (``statistical``) neither bans
    nor reports at once; the second in a row does both. A proof (here: a padded answer) bans at the first."""
    from types import SimpleNamespace

    from node.market.trust import STRIKES, Trust
    from node.verify.judge import Verdict

    worker, padder, me = (Identity.load(tmp_path / n) for n in ("worker", "padder", "me"))
    published = []

    async def publish(report):
        published.append(report)

    requester = SimpleNamespace(host=SimpleNamespace(identity=me), reputation=Reputation(),
                                fraud=SimpleNamespace(publish=publish))  # fmt: skip
    counts = Verdict(False, "40 of 64 tokens differ from the seeded draw's", 64, 0.3, 0.1, 40, 0, 0.0, "gpu",
                     statistical=True)  # fmt: skip
    passing = Verdict(True, "", 64, 0.3, 0.1, 3, 0, 0.0, "gpu")
    padded = Verdict(False, "token 9: the answer goes on where the model ends it (end-of-generation)", 64, 0.3,
                     0.1, 3, 0, 0.0, "gpu")  # fmt: skip

    @dataclass
    class Checker:  # a LocalVerifier whose verdict is given
        verdict: Verdict

        async def check_result(self, result) -> Verdict:
            return self.verdict

    async def audited(who: Identity, verdict: Verdict, job: str):
        result = SimpleNamespace(proof=_signed_proof(who, job), model=MODEL)
        return await audit(requester, result, verifier=Checker(verdict), trust=trust)

    trust, now = Trust(), time.time()
    first = await audited(worker, counts, "j1")
    assert first.struck and not first.reported and not published
    assert not requester.reputation.banned(worker.peer_id, now + 1)
    assert (await audited(worker, passing, "j2")).verdict.ok  # a pass between: the strikes start over
    for job in range(STRIKES - 1):
        assert (await audited(worker, counts, f"k{job}")).struck and not published
    last = await audited(worker, counts, "k-last")
    assert last.reported and not last.struck and len(published) == 1
    assert requester.reputation.banned(worker.peer_id, now + CHEATER_BAN_S - 60)
    assert published[0].done.receipt.worker == worker.peer_id
    # a proof bans and reports at once
    assert (await audited(padder, padded, "p1")).reported and len(published) == 2
    assert requester.reputation.banned(padder.peer_id, now + CHEATER_BAN_S - 60)


async def test_verification_jobs_go_to_the_verify_protocol_and_only_there(tmp_path):
    """A request with a check sent as a job, or a job sent for checking, is rejected as malformed."""
    from node.market.jobs import JOB_PROTOCOL
    from node.protocol.messages import CheckTask, JobDone, JobRejected, JobRequest
    from node.protocol.wire import receive, send
    from tests.factories import ScriptedEngine

    async with trio.open_nursery() as nursery:
        worker = await start_node(nursery, tmp_path, "worker", engine=ScriptedEngine(), checker=ScriptedEngine())
        client = await start_node(nursery, tmp_path, "client")
        await client.host.connect(worker.host.addrs()[0])
        plain = JobRequest(job_id="j", model=MODEL, params={"max_tokens": 4}, prompt="hi")
        receipt = ResultReceipt("j", MODEL, b"", b"", 1, 1, worker.id)
        checking = JobRequest(job_id="v", model=MODEL, params={"max_tokens": 1}, prompt="hi",
                              check=CheckTask(plain, "x", JobDone("j", "stop", receipt)))  # fmt: skip
        with trio.fail_after(20):
            for protocol, request, why in (
                (VERIFY_PROTOCOL, plain, "takes verification jobs only"),
                (JOB_PROTOCOL, checking, "verification jobs go to"),
                (VERIFY_PROTOCOL, checking, "the answer to check: receipt is for another request"),
            ):
                stream = await client.host.open_stream(worker.id, protocol)
                await send(stream, request)
                answer = await receive(stream)
                assert isinstance(answer, JobRejected) and answer.reason == "malformed" and why in answer.detail
                await stream.close()
        nursery.cancel_scope.cancel()
