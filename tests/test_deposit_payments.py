"""Paid jobs from one deposit (issue 20): DepositPayer and DepositMetering on real anvil and real libp2p.

The contract's own attacks and fuzzing are tests/test_deposit_escrow.py and tests/test_deposit_stateful.py; here
are the two sides of the job protocol that use it: a requester that pays workers it never met with no
transaction, concurrent jobs on one pair, restarts, over-commitment, unlocking and batch claims.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import pytest
import trio

from node.errors import InvalidReceipt, JobFailed, NoWorker, PaymentRefused
from node.market.jobs import WorkerService
from node.market.requester import JobSpec, run_job
from node.market.routing import Reputation, RouteQuery
from node.net.identity import Identity
from node.net.network import Network
from node.payments.deposit_metering import DepositMetering
from node.payments.deposit_receipts import sign_job_terms
from node.payments.deposit_settlement import SettlementPolicy
from node.payments.deposits import DepositClient
from node.payments.ledger import WalletLedger, WorkerLedger
from node.payments.payer import DepositPayer
from node.payments.policy import job_cost, prompt_token_bound, worst_case_cost
from node.protocol.messages import DepositReceipt, DepositTerms, JobDone, JobRequest, ResultReceipt

from .conftest import TOKEN
from .factories import MODEL, SPEC, WORDS, ScriptedEngine, gather, requester, requester_peer, signed_offer
from .factories import offer as unsigned_offer

pytestmark = pytest.mark.slow

PRICE = 10**15  # base units per 1,000 tokens
PER_JOB = job_cost(5, len(WORDS), PRICE)  # the scripted engine's usage: 5 prompt tokens and WORDS
PAID_SPEC = JobSpec(**{**SPEC.__dict__, "max_price_per_1k": PRICE})
WORST = worst_case_cost(prompt_token_bound(JobRequest("x", MODEL, {}, messages=SPEC.messages)), 50, PRICE)


def deposits(chain, account=None) -> DepositClient:
    return DepositClient.connect(chain.chain.rpc_url, deployment=chain.deployment, account=account)


def fund(chain, account, deposit: int = TOKEN, reserve: int = 0, slots: int = 1) -> DepositClient:
    client = deposits(chain, account)
    client.deposit(deposit)
    if reserve:
        client.fund_reserve(reserve, slots)
    return client


def payer_for(chain, tmp_path, account=None) -> DepositPayer:
    account = account or chain.requester
    ledger = WalletLedger.in_data_dir(tmp_path / f"r-{account.address[:8]}")
    return DepositPayer(deposits(chain, account), ledger, requester_peer(tmp_path))


def metering_for(chain, tmp_path, account, **changes) -> DepositMetering:
    ledger = WorkerLedger.in_data_dir(tmp_path / f"w-{account.address[:8]}")
    fields = dict(max_credit_window=TOKEN, receipt_timeout_s=5.0) | changes
    return DepositMetering(deposits(chain, account), ledger, PRICE, **fields)


@asynccontextmanager
async def deposit_worker(chain, tmp_path, account, engine=None, metering=None, **changes):
    """A worker paid from deposits, on libp2p; yields (its offer, its metering). Its settler is not running: the
    tests claim with ``settle_once``."""
    metering = metering or metering_for(chain, tmp_path, account, **changes)
    identity = Identity.load(tmp_path / f"w-{account.address[:8]}", account=account)
    host = Network(identity)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        WorkerService(host, identity, {MODEL: engine or ScriptedEngine()}, metering=metering).install()
        offer = signed_offer(
            identity, 1, time.time() + 60, addrs=host.addrs(), price_per_1k=PRICE,
            chain_id=chain.deployment.chain_id, escrow=chain.deployment.deposits,
            slots_total=getattr(engine, "slots", 1),
        )  # fmt: skip
        yield offer, metering
        nursery.cancel_scope.cancel()


def query(chain) -> RouteQuery:
    return RouteQuery(
        model=MODEL, max_price_per_1k=PRICE, chain_id=chain.deployment.chain_id, escrow=chain.deployment.deposits
    )


async def job(host, offer, chain, payer):
    return await run_job(host, lambda: [offer], query(chain), PAID_SPEC, reputation=Reputation(), payer=payer)


async def credited(metering, requester: str, amount: int) -> None:
    """Wait until the worker holds receipts crediting ``amount`` (the final one is sent after JobDone)."""
    where = (metering.chain_id, metering.escrow, requester)
    while (held := metering.ledger.get_pair(*where)) is None or held.credited < amount:
        await trio.sleep(0.01)  # polling interval


def settle(metering) -> tuple[int, int]:
    return metering.settler.settle_once()


def nonce(chain, account) -> int:
    return deposits(chain).w3.eth.get_transaction_count(account.address)


async def test_one_deposit_pays_three_workers_it_never_met_with_no_transaction(chain, tmp_path):
    fund(chain, chain.requester, deposit=TOKEN, reserve=TOKEN, slots=3)
    payer = payer_for(chain, tmp_path)
    workers = [chain.worker, chain.other_worker, chain.deployer]
    before = {w.address: deposits(chain).token_balance(w.address) for w in workers}
    sent_before = nonce(chain, chain.requester)
    with trio.fail_after(60):
        async with (
            deposit_worker(chain, tmp_path, workers[0]) as (a, ma),
            deposit_worker(chain, tmp_path, workers[1]) as (b, mb),
            deposit_worker(chain, tmp_path, workers[2]) as (c, mc),
            requester(tmp_path) as host,
        ):
            results = [await job(host, offer, chain, payer) for offer in (a, b, c)]
            for metering in (ma, mb, mc):
                await credited(metering, chain.requester.address, PER_JOB)
                assert await trio.to_thread.run_sync(settle, metering) == (1, 0)
    assert nonce(chain, chain.requester) == sent_before  # not one transaction by the requester
    assert [r.text for r in results] == ["".join(WORDS)] * 3 and [r.cost for r in results] == [PER_JOB] * 3
    client = deposits(chain)
    for w in workers:
        assert client.token_balance(w.address) - before[w.address] == PER_JOB  # exactly usage × price
        assert client.pair_of(chain.requester.address, w.address).paid == PER_JOB
    assert client.account_of(chain.requester.address).deposit == TOKEN - 3 * PER_JOB
    assert [(p.worker, p.signed) for p in payer.ledger.pairs()] == [(w.address, PER_JOB) for w in workers]


async def test_concurrent_jobs_to_one_worker_add_up_on_one_pair(chain, tmp_path):
    fund(chain, chain.requester)
    payer = payer_for(chain, tmp_path)
    engine = ScriptedEngine(slots=3)
    with trio.fail_after(60):
        async with (
            deposit_worker(chain, tmp_path, chain.worker, engine) as (offer, metering),
            requester(tmp_path) as host,
        ):
            results = await gather(*[lambda: job(host, offer, chain, payer)] * 3)
            await credited(metering, chain.requester.address, 3 * PER_JOB)
            assert await trio.to_thread.run_sync(settle, metering) == (1, 0)
    assert [r.cost for r in results] == [PER_JOB] * 3
    held = metering.ledger.get_pair(metering.chain_id, metering.escrow, chain.requester.address)
    assert held.best == held.credited == held.claimed == 3 * PER_JOB  # one receipt pays all three jobs
    assert deposits(chain).pair_of(chain.requester.address, chain.worker.address).paid == 3 * PER_JOB


async def test_worker_and_requester_restart_and_nothing_is_lost(chain, tmp_path):
    fund(chain, chain.requester)
    with trio.fail_after(60):
        for _ in range(2):  # each round: a fresh worker process and a fresh requester on the same data dirs
            async with (
                deposit_worker(chain, tmp_path, chain.worker) as (offer, metering),
                requester(tmp_path) as host,
            ):
                result = await job(host, offer, chain, payer_for(chain, tmp_path))
                await credited(metering, chain.requester.address, result.cost)
            assert result.cost == PER_JOB
        # the second round's receipt covers both jobs; a restarted worker claims everything at start-up
        assert await trio.to_thread.run_sync(settle, metering_for(chain, tmp_path, chain.worker)) == (1, 0)
    assert deposits(chain).pair_of(chain.requester.address, chain.worker.address).paid == 2 * PER_JOB
    (pair,) = payer_for(chain, tmp_path).ledger.pairs()
    assert pair.signed == 2 * PER_JOB


async def admit(metering, payer, offer, job_id: str):
    request = JobRequest(job_id, MODEL, {"max_tokens": 50}, messages=SPEC.messages, max_price_per_1k=PRICE)
    async with payer.pay(offer, request) as payment:
        return await metering.admit(payment.request, payer.host_peer_id), payment


async def test_a_requester_that_over_commits_is_refused_past_the_workers_bound(chain, tmp_path):
    """A deposit of two jobs' worst case: the worker takes jobs while what it is owed and may yet be owed fits
    the deposit, before and after its claims, and refuses the rest; a worker without a slot also keeps to its
    unsecured allowance."""
    fund(chain, chain.requester, deposit=2 * WORST)
    payer = payer_for(chain, tmp_path)
    sent: list = []
    with trio.fail_after(60):
        async with deposit_worker(chain, tmp_path, chain.worker, cache_ttl_s=0) as (offer, metering):
            first, pay_first = await admit(metering, payer, offer, "a")
            second, _ = await admit(metering, payer, offer, "b")
            with pytest.raises(PaymentRefused, match="cannot cover"):
                await admit(metering, payer, offer, "c")
            await pay_first.on_done(_collect(sent), _done("a", 20))
            assert await first.take(sent[-1]) and await first.settle(0, 20) == "paid"
            with pytest.raises(PaymentRefused, match="cannot cover"):  # its receipt is owed from the same deposit
                await admit(metering, payer, offer, "c")
            assert await trio.to_thread.run_sync(settle, metering) == (1, 0)
            with pytest.raises(PaymentRefused, match="cannot cover"):  # claimed: the deposit is that much less
                await admit(metering, payer, offer, "c")
            second.close()  # the second job ends, unpaid: its worst case is no longer reserved
            third, _ = await admit(metering, payer, offer, "c")
            with pytest.raises(PaymentRefused, match="cannot cover"):
                await admit(metering, payer, offer, "d")
        fund(chain, chain.requester, deposit=10 * WORST)
        other = metering_for(chain, tmp_path, chain.other_worker, allowance=WORST)
        to_other = unsigned_offer(peer_id="12D3KooWother", payee=chain.other_worker.address, price_per_1k=PRICE)
        fourth, _ = await admit(other, payer, to_other, "e")
        with pytest.raises(PaymentRefused, match="exposure to the requester would pass its bound"):
            await admit(other, payer, to_other, "f")
    assert third.reserved == fourth.reserved == WORST


def _collect(sent):
    async def send(message):
        sent.append(message)

    return send


def _done(job_id: str, completion_tokens: int) -> JobDone:
    return JobDone(job_id, "stop", ResultReceipt(job_id, MODEL, b"", b"", 0, completion_tokens, "w"))


async def test_an_unlocking_requester_is_refused_and_what_it_owes_is_claimed_before_it_can_withdraw(chain, tmp_path):
    client = fund(chain, chain.requester)
    payer = payer_for(chain, tmp_path)
    with trio.fail_after(60):
        async with (
            deposit_worker(chain, tmp_path, chain.worker, cache_ttl_s=0) as (offer, metering),
            requester(tmp_path) as host,
        ):
            result = await job(host, offer, chain, payer)
            await credited(metering, chain.requester.address, result.cost)
            client.unlock()
            with pytest.raises((JobFailed, NoWorker), match="unlocking"):
                await job(host, offer, chain, payer)
            # it learnt of the unlock on admission: the held receipt is due at once, whatever the policy
            metering.settler.policy = metering.settler.policy.__class__(settle_every=100)
            assert await trio.to_thread.run_sync(metering.settler.urgent_due)
            assert await trio.to_thread.run_sync(settle, metering) == (1, 0)
    assert deposits(chain).pair_of(chain.requester.address, chain.worker.address).paid == PER_JOB


async def test_one_batch_claim_settles_many_requesters(chain, tmp_path):
    requesters = [chain.requester, chain.other_requester, chain.stranger]
    for account in requesters:
        fund(chain, account)
    worker_nonce = nonce(chain, chain.worker)
    with trio.fail_after(60):
        async with deposit_worker(chain, tmp_path, chain.worker) as (offer, metering), requester(tmp_path) as host:
            for account in requesters:
                result = await job(host, offer, chain, payer_for(chain, tmp_path, account))
                await credited(metering, account.address, result.cost)
            assert await trio.to_thread.run_sync(settle, metering) == (3, 0)
    assert nonce(chain, chain.worker) == worker_nonce + 1  # one transaction for all three
    client = deposits(chain)
    for account in requesters:
        assert client.pair_of(account.address, chain.worker.address).paid == PER_JOB
    assert metering.ledger.pending_pairs(metering.chain_id, metering.escrow) == []


async def test_a_cached_read_is_dropped_when_an_event_names_the_requester(chain, tmp_path):
    client = fund(chain, chain.requester)
    payer = payer_for(chain, tmp_path)
    metering = metering_for(chain, tmp_path, chain.worker, cache_ttl_s=3600, events_poll_s=0.05)
    offer = unsigned_offer(payee=chain.worker.address, price_per_1k=PRICE)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(metering.watch_events)
            await admit(metering, payer, offer, "a")  # read once, cached for an hour…
            await trio.to_thread.run_sync(client.unlock)
            while chain.requester.address in metering._views:  # …until the UnlockStarted event is seen
                await trio.sleep(0.01)  # polling interval
            with pytest.raises(PaymentRefused, match="unlocking"):
                await admit(metering, payer, offer, "b")
            nursery.cancel_scope.cancel()


# ------------------------------------------------ the review's attacks (issue 20 review, F1–F3)


async def _receipts(metering, payer, offer, job_id: str, completion: int):
    """A job whose receipts for ``completion`` tokens were taken; it is still open."""
    meter, payment = await admit(metering, payer, offer, job_id)
    sent: list = []
    await payment.on_done(_collect(sent), _done(job_id, completion))
    for message in sent:
        assert await meter.take(message)
    return meter


async def test_an_unlock_seen_only_in_the_events_has_a_cancelled_jobs_receipts_claimed_before_withdrawal(
    chain, tmp_path
):
    """F1: a slot holder holds a cancelled job's receipts; the requester unlocks and sends it no other job. The
    worker sees the unlock in the escrow's events, records it and claims before unlockAt, so the requester's
    withdrawal takes nothing the worker was owed."""
    client = fund(chain, chain.requester, deposit=TOKEN, reserve=TOKEN, slots=1)
    payer = payer_for(chain, tmp_path)
    metering = metering_for(chain, tmp_path, chain.worker, events_poll_s=0.05)
    metering.settler.policy = SettlementPolicy(settle_every=100)  # a slot holder's claims wait: only F1's paths
    offer = unsigned_offer(payee=chain.worker.address, price_per_1k=PRICE)
    R, W = chain.requester.address, chain.worker.address
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(metering.run)
            first = await _receipts(metering, payer, offer, "a", 20)
            assert await first.settle(0, 20) == "paid"  # no slot yet: claimed at once, which takes the slot
            while not (held := metering.ledger.get_pair(metering.chain_id, metering.escrow, R)).has_slot:
                await trio.sleep(0.05)  # polling interval
            cancelled = await _receipts(metering, payer, offer, "b", 40)
            cancelled.close()  # the requester cancelled: the job never settles (jobs.py closes the meter)
            while metering.settler.due(time.time()):  # the settler's first round, which claims all, may be ending
                await trio.sleep(0.05)  # polling interval
            held = metering.ledger.get_pair(metering.chain_id, metering.escrow, R)
            assert held.claimable > 0  # held, not due (had the first round claimed it, nothing would be held)
            await trio.to_thread.run_sync(client.unlock)
            while deposits(chain).pair_of(R, W).paid < held.best:  # seen in the events, claimed before unlockAt
                await trio.sleep(0.05)  # polling interval
            nursery.cancel_scope.cancel()
    assert metering.ledger.get_pair(metering.chain_id, metering.escrow, R).unlock_at > 0
    chain.advance(deposits(chain).unlock_period())
    client.withdraw()
    assert deposits(chain).pair_of(R, W).paid == held.best  # the worker was paid in full


async def test_a_stranger_cannot_name_someone_elses_deposit(chain, tmp_path):
    """F2: a stranger with no deposit names a funded victim's: unbound terms, or terms bound with its own key,
    are refused before anything is reserved, so the victim's own job still fits a worker without a slot."""
    fund(chain, chain.requester, deposit=TOKEN)  # the victim's deposit; the stranger has none
    victim = payer_for(chain, tmp_path)
    metering = metering_for(chain, tmp_path, chain.worker, allowance=WORST)
    offer = unsigned_offer(payee=chain.worker.address, price_per_1k=PRICE)
    d, peer = chain.deployment, "12D3KooWstranger"
    expires = int(time.time()) + 600
    own = sign_job_terms(chain.stranger, deposits(chain).domain, "evil", chain.worker.address, peer, expires)
    with trio.fail_after(60):
        for binding, reason in [(b"", "not signed by the requester"), (own, "not the requester's")]:
            terms = DepositTerms(chain.requester.address, d.chain_id, d.deposits, PRICE, str(TOKEN),
                                 expires_at=expires, binding=binding)  # fmt: skip
            forged = JobRequest("evil", MODEL, {"max_tokens": 50}, messages=SPEC.messages, max_price_per_1k=PRICE,
                                payment=terms)  # fmt: skip
            with pytest.raises(PaymentRefused, match=reason):
                await metering.admit(forged, peer)
        assert await admit(metering, victim, offer, "real")


async def test_a_worker_that_lost_its_ledger_refuses_a_replayed_paid_receipt(chain, tmp_path):
    """F3: the worker's ledger is lost (same key, new data dir) and an event dropped its cached read; the
    requester replays its old receipt, which the chain already paid: the new job is not credited with it."""
    fund(chain, chain.requester, deposit=TOKEN)
    payer = payer_for(chain, tmp_path)
    offer = unsigned_offer(payee=chain.worker.address, price_per_1k=PRICE)
    R = chain.requester.address
    before = metering_for(chain, tmp_path, chain.worker)
    with trio.fail_after(60):
        meter, payment = await admit(before, payer, offer, "a")
        sent: list = []
        await payment.on_done(_collect(sent), _done("a", 40))
        old = sent[-1]
        assert await meter.take(old) and await meter.settle(0, 40) == "paid"
        assert before.settler.settle_once() == (1, 0)
        lost = metering_for(chain, tmp_path / "lost", chain.worker)
        replayed, _ = await admit(lost, payer, offer, "b")
        lost.forget(R)  # any event naming the requester (its own 1-wei deposit) drops the cached read
        with pytest.raises(InvalidReceipt, match="does not back"):
            await replayed.take(DepositReceipt("b", old.cumulative, old.cumulative, old.signature))
        assert replayed.credited == 0
