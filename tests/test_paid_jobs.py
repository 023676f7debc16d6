"""Paid jobs from a deposit: receipts while streaming, the credit window, long prompts, refusals (real anvil, real
libp2p, scripted engine). More of the deposit scheme (many workers, concurrent jobs, restarts, over-commitment,
unlocking, batch claims) is in tests/test_deposit_payments.py."""

from __future__ import annotations

import dataclasses
import time
from contextlib import asynccontextmanager

import pytest
import trio

from node.errors import JobFailed
from node.market.jobs import WorkerService
from node.market.requester import JobSpec, run_job
from node.market.routing import Reputation, RouteQuery
from node.net.identity import Identity
from node.net.network import Network
from node.payments import payer as payer_module
from node.payments.deposit_metering import DepositMetering
from node.payments.deposits import DepositClient
from node.payments.ledger import WalletLedger, WorkerLedger
from node.payments.payer import DepositPayer
from node.payments.policy import job_cost

from .conftest import TOKEN
from .factories import MODEL, SPEC, WORDS, Recorder, ScriptedEngine, requester, requester_peer, signed_offer

pytestmark = pytest.mark.slow

PRICE = 10**15  # 0.001 token per 1,000 tokens … per token 10**12 base units


def deposits(chain, account=None, deployment=None) -> DepositClient:
    return DepositClient.connect(chain.chain.rpc_url, deployment=deployment or chain.deployment, account=account)


@asynccontextmanager
async def paid_worker(chain, tmp_path, engine, *, receipt_timeout_s=5.0, account=None, **offer_changes):
    account = account or chain.worker
    identity = Identity.load(tmp_path / "worker", account=account)
    ledger = WorkerLedger.in_data_dir(tmp_path / "worker")
    payments = DepositMetering(
        deposits(chain, account), ledger, PRICE, max_credit_window=TOKEN, receipt_timeout_s=receipt_timeout_s
    )
    host = Network(identity)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        WorkerService(host, identity, {MODEL: engine}, metering=payments).install()
        offer = signed_offer(
            identity, 1, time.time() + 60, addrs=host.addrs(), price_per_1k=PRICE,
            chain_id=chain.deployment.chain_id, escrow=chain.deployment.deposits, **offer_changes,
        )  # fmt: skip
        yield offer, payments
        nursery.cancel_scope.cancel()


async def receipts_arrived(payments, requester: str, signed: int) -> None:
    """Wait until the worker holds the requester's last receipt (the final one is sent after JobDone)."""
    where = (payments.chain_id, payments.escrow, requester)
    while (held := payments.ledger.get_pair(*where)) is None or held.best < signed:
        await trio.sleep(0.01)  # polling interval


def paid_query(chain) -> RouteQuery:
    return RouteQuery(
        model=MODEL, max_price_per_1k=PRICE, chain_id=chain.deployment.chain_id, escrow=chain.deployment.deposits
    )


def payer_for(chain, tmp_path, *, deposit: int = TOKEN) -> DepositPayer:
    client = deposits(chain, chain.requester)
    if deposit:
        client.deposit(deposit)
    return DepositPayer(client, WalletLedger.in_data_dir(tmp_path / "requester"), requester_peer(tmp_path))


async def test_a_paid_job_pays_exactly_usage_times_price(chain, tmp_path):
    payer = payer_for(chain, tmp_path)
    spec = JobSpec(**{**SPEC.__dict__, "max_price_per_1k": PRICE})
    with trio.fail_after(30):
        async with paid_worker(chain, tmp_path, ScriptedEngine()) as (offer, payments), requester(tmp_path) as host:
            result = await run_job(host, lambda: [offer], paid_query(chain), spec, reputation=Reputation(), payer=payer)
            second = await run_job(host, lambda: [offer], paid_query(chain), spec, reputation=Reputation(), payer=payer)
            (pair,) = payer.ledger.pairs()  # both jobs on the pair's one counter
            await receipts_arrived(payments, chain.requester.address, pair.signed)
            assert await trio.to_thread.run_sync(payments.settler.settle_once) == (1, 0)
    assert result.text == "".join(WORDS) == second.text
    per_job = job_cost(5, len(WORDS), PRICE)  # the scripted engine reports 5 prompt tokens
    assert result.cost == second.cost == per_job
    assert pair.signed == 2 * per_job
    client = deposits(chain)
    assert client.token_balance(chain.worker.address) == 2 * per_job
    assert client.pair_of(chain.requester.address, chain.worker.address).paid == 2 * per_job


async def test_a_requester_that_stops_signing_is_cut_off_within_the_credit_window(chain, tmp_path, monkeypatch):
    async def never_sign(self, send, chunk):  # a requester that takes the text and never pays
        self.completion_tokens += chunk.tokens

    monkeypatch.setattr(payer_module.DepositPayment, "on_chunk", never_sign)
    long_engine = ScriptedEngine(tick_s=0.001, words=["tok "] * 400)
    heard = Recorder()
    spec = JobSpec(**{**SPEC.__dict__, "max_price_per_1k": PRICE, "params": SPEC.params.__class__(max_tokens=400)})
    with trio.fail_after(30):
        async with (
            paid_worker(chain, tmp_path, long_engine, receipt_timeout_s=1.0) as (offer, payments),
            requester(tmp_path) as host,
        ):
            with pytest.raises(JobFailed, match="receipts fell behind"):
                await run_job(host, lambda: [offer], paid_query(chain), spec, reputation=Reputation(),
                              payer=payer_for(chain, tmp_path), observer=heard)  # fmt: skip
            assert await trio.to_thread.run_sync(payments.settler.settle_once) == (0, 0)  # nothing was signed
    streamed = "".join(heard.texts).count("tok")
    assert 0 < streamed <= payer_module.CREDIT_TOKENS  # the worker stopped at the window, not at 400


async def test_a_paid_job_with_a_1500_token_prompt_is_paid_exactly(chain, tmp_path):
    """Before, a prompt over the credit window (64 tokens) deadlocked: nobody sent first."""
    payer = payer_for(chain, tmp_path)
    spec = JobSpec(
        **{**SPEC.__dict__, "max_price_per_1k": PRICE, "messages": [{"role": "user", "content": "w " * 1600}]}
    )
    with trio.fail_after(30):
        async with (
            paid_worker(chain, tmp_path, ScriptedEngine(prompt_tokens=1500)) as (offer, payments),
            requester(tmp_path) as host,
        ):
            result = await run_job(host, lambda: [offer], paid_query(chain), spec, reputation=Reputation(),
                                   payer=payer)  # fmt: skip
            (pair,) = payer.ledger.pairs()
            await receipts_arrived(payments, chain.requester.address, pair.signed)
            assert await trio.to_thread.run_sync(payments.settler.settle_once) == (1, 0)
    assert result.text == "".join(WORDS) and result.prompt_tokens == 1500
    assert result.cost == job_cost(1500, len(WORDS), PRICE) == pair.signed
    assert deposits(chain).token_balance(chain.worker.address) == result.cost


async def test_a_payment_rejection_is_not_held_against_the_worker(chain, tmp_path):
    """A worker paid on another escrow turns our terms down: no ban (the fault is in our payment, not in it)."""
    rep = Reputation()
    spec = JobSpec(**{**SPEC.__dict__, "max_price_per_1k": PRICE})
    other_escrow = dataclasses.replace(chain.deployment, deposits=chain.deployment.token)
    payer = DepositPayer(DepositClient(deposits(chain).w3, other_escrow, chain.requester),
                         WalletLedger.in_data_dir(tmp_path / "requester"), requester_peer(tmp_path))  # fmt: skip
    with trio.fail_after(30):
        async with paid_worker(chain, tmp_path, ScriptedEngine()) as (offer, _), requester(tmp_path) as host:
            with pytest.raises(JobFailed, match="rejected: payment"):
                await run_job(host, lambda: [offer], paid_query(chain), spec, reputation=rep, payer=payer)
    assert not rep.banned(offer.peer_id, time.time())


async def test_a_requester_without_a_deposit_is_refused_before_any_generation(chain, tmp_path):
    heard = Recorder()
    spec = JobSpec(**{**SPEC.__dict__, "max_price_per_1k": PRICE})
    with trio.fail_after(30):
        async with paid_worker(chain, tmp_path, ScriptedEngine()) as (offer, _), requester(tmp_path) as host:
            with pytest.raises(JobFailed, match="rejected: payment"):
                await run_job(host, lambda: [offer], paid_query(chain), spec, reputation=Reputation(),
                              payer=payer_for(chain, tmp_path, deposit=0), observer=heard)  # fmt: skip
    assert heard.texts == []
