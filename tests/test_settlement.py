"""Workers claim what they were signed, through outages and restarts (real anvil)."""

from __future__ import annotations

import pytest
from web3 import HTTPProvider, Web3

from node.payments.escrow import EscrowClient
from node.payments.ledger import WorkerLedger
from node.payments.settlement import SettlementPolicy, Settler

from .conftest import TOKEN

pytestmark = pytest.mark.slow

DAY = 86_400


def _paid_channel(chain, ledger: WorkerLedger, amounts: list[int], expiry_in: int = DAY) -> bytes:
    requester = chain.client(chain.requester)
    channel_id = requester.open_channel(chain.worker.address, 100 * TOKEN, requester.chain_time() + expiry_in)
    state = requester.get_channel(channel_id)
    for amount in amounts:
        ledger.record_receipt(
            channel_id, amount, requester.sign_receipt(channel_id, amount),
            chain_id=chain.deployment.chain_id, escrow=chain.deployment.escrow,
            requester=chain.requester.address, expiry=state.expiry,
        )  # fmt: skip
    return channel_id


def test_claims_on_job_completion(chain, tmp_path):
    ledger = WorkerLedger.in_data_dir(tmp_path)
    settler = Settler(ledger, chain.client(chain.worker))
    assert settler.settle_once() == (0, 0)
    channel = _paid_channel(chain, ledger, [TOKEN, 3 * TOKEN])
    assert settler.due(settler.clock()) == []  # no job counted yet, far from expiry
    settler.job_done(channel)
    assert settler.settle_once() == (1, 0)
    assert chain.client().token_balance(chain.worker.address) == 3 * TOKEN
    assert ledger.get(channel).claimed == 3 * TOKEN and ledger.pending_claims() == []


def test_batching_every_n_jobs_and_near_expiry(chain, tmp_path):
    ledger = WorkerLedger.in_data_dir(tmp_path)
    settler = Settler(ledger, chain.client(chain.worker), SettlementPolicy(settle_every=3, safety_margin_s=3600))
    settler.settle_once()
    batched = _paid_channel(chain, ledger, [TOKEN])
    expiring = _paid_channel(chain, ledger, [2 * TOKEN], expiry_in=1800)  # inside the safety margin
    settler.job_done(batched)
    settler.job_done(batched)
    assert [c.channel_id for c in settler.due(settler.clock())] == [expiring]
    settler.job_done(batched)
    assert {c.channel_id for c in settler.due(settler.clock())} == {batched, expiring}


def test_a_restarted_worker_claims_everything_persisted(chain, tmp_path):
    ledger = WorkerLedger.in_data_dir(tmp_path)
    channel = _paid_channel(chain, ledger, [5 * TOKEN])  # the worker "died" before claiming
    restarted = Settler(WorkerLedger.in_data_dir(tmp_path), chain.client(chain.worker))
    assert restarted.settle_once() == (1, 0)
    assert chain.client().get_channel(channel).paid == 5 * TOKEN


def test_an_rpc_outage_loses_nothing(chain, tmp_path):
    ledger = WorkerLedger.in_data_dir(tmp_path)
    channel = _paid_channel(chain, ledger, [2 * TOKEN])
    dead = EscrowClient(
        Web3(HTTPProvider("http://127.0.0.1:9", request_kwargs={"timeout": 2})), chain.deployment, chain.worker
    )
    assert Settler(ledger, dead).settle_once() == (0, 1)
    assert "no Ethereum JSON-RPC endpoint answers" in ledger.get(channel).last_error
    assert ledger.pending_claims()[0].channel_id == channel  # still owed
    assert Settler(ledger, chain.client(chain.worker)).settle_once() == (1, 0)  # the chain is back
    assert chain.client().token_balance(chain.worker.address) == 2 * TOKEN


def test_a_claim_already_mined_is_caught_up_and_an_expired_one_given_up(chain, tmp_path):
    ledger = WorkerLedger.in_data_dir(tmp_path)
    channel = _paid_channel(chain, ledger, [4 * TOKEN])
    worker = chain.client(chain.worker)
    receipt = ledger.get(channel)
    worker.claim(channel, receipt.receipted, receipt.signature)  # mined, but the worker crashed before noting it
    assert Settler(ledger, worker).settle_once() == (1, 0)
    assert ledger.get(channel).claimed == 4 * TOKEN
    expiring = _paid_channel(chain, ledger, [TOKEN], expiry_in=60)
    chain.advance(120)
    assert Settler(ledger, worker).settle_once() == (1, 0)
    assert ledger.get(expiring).closed and "ChannelExpired" in ledger.get(expiring).last_error
    assert ledger.pending_claims() == []


def test_a_job_counted_during_a_claim_is_not_lost(chain, tmp_path):
    """The settler counts jobs on the trio thread while a claim runs in a worker thread: a job that finishes
    during the claim (its receipt came after the claim read the ledger) must still make its channel due."""
    ledger = WorkerLedger.in_data_dir(tmp_path)
    worker = chain.client(chain.worker)
    settler = Settler(ledger, worker)
    settler.settle_once()
    channel = _paid_channel(chain, ledger, [TOKEN])
    settler.job_done(channel)
    claim = worker.claim

    def claim_while_another_job_finishes(*args):
        receipt = claim(*args)
        settler.job_done(channel)  # as if the trio thread counted the next job now
        return receipt

    worker.claim = claim_while_another_job_finishes
    assert settler.settle_once() == (1, 0)
    worker.claim = claim
    signature = chain.client(chain.requester).sign_receipt(channel, 2 * TOKEN)
    ledger.record_receipt(
        channel, 2 * TOKEN, signature, chain_id=chain.deployment.chain_id,
        escrow=chain.deployment.escrow, requester=chain.requester.address, expiry=ledger.get(channel).expiry,
    )  # fmt: skip
    assert [c.channel_id for c in settler.due(settler.clock())] == [channel]  # the second job is still owed
