"""Billing is exact against workers that bill more than they used (issue 19): real engines, anvil, libp2p.

A paid market of two workers on the default model: an overcharger, the cheaper
one (so the requester tries it first), and an honest one. The requester counts
with the model's own tokenizer (verified against its CID) and pays for records
it can check; the overcharger is dropped and banned, the honest worker finishes
the job, and on chain each worker earns exactly what it truly used × its price, paid from the requester's one
deposit in the DepositEscrow.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from node.app.requester import RequesterNode
from node.inference.engine import open_engine
from node.inference.sampling import SamplingParams
from node.inference.tokenizer import TokenizerCache
from node.market.jobs import WorkerService
from node.market.requester import OVERCHARGE_BAN_S, JobSpec, run_job
from node.market.routing import Reputation, RouteQuery
from node.models.default import DEFAULT_MODEL_CID
from node.net.identity import Identity
from node.net.network import Network
from node.payments.deposit_metering import DepositMetering
from node.payments.deposits import DepositClient
from node.payments.ledger import WalletLedger, WorkerLedger
from node.payments.payer import DepositPayer
from node.payments.policy import job_cost
from node.protocol.messages import JobRequest, ModelInfo

from . import overchargers
from .conftest import TOKEN
from .factories import Recorder, requester, signed_offer

pytestmark = pytest.mark.slow

PRICE = 10**15  # base units per 1,000 tokens: the overcharger's; the honest worker asks twice as much
DOCUMENT = " ".join(
    f"Clause {i}: the supplier delivers crate {i} of apples to the market on day {i % 7 + 1}." for i in range(40)
)  # about 800 tokens
SPEC = JobSpec(
    model=DEFAULT_MODEL_CID,
    params=SamplingParams(max_tokens=48, temperature=0.0),
    messages=[
        {"role": "system", "content": DOCUMENT},
        {"role": "user", "content": "On which day does crate 12 arrive? Answer in one short sentence."},
    ],
    max_price_per_1k=2 * PRICE,
)


def deposits(chain, account=None) -> DepositClient:
    return DepositClient.connect(chain.chain.rpc_url, deployment=chain.deployment, account=account)


@asynccontextmanager
async def paid_worker(chain, tmp_path, name, engine, account, price):
    identity = Identity.load(tmp_path / name, account=account)
    ledger = WorkerLedger.in_data_dir(tmp_path / name)
    metering = DepositMetering(deposits(chain, account), ledger, price, max_credit_window=TOKEN,
                               receipt_timeout_s=5.0)  # fmt: skip
    host = Network(identity)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        WorkerService(host, identity, {DEFAULT_MODEL_CID: engine}, metering=metering).install()
        offer = signed_offer(
            identity, 1, time.time() + 600, addrs=host.addrs(), price_per_1k=price, payee=account.address,
            chain_id=chain.deployment.chain_id, escrow=chain.deployment.deposits,
            models=[ModelInfo(DEFAULT_MODEL_CID, "default", 2048, "Q4_1")],
        )  # fmt: skip
        yield offer, metering
        nursery.cancel_scope.cancel()


async def run_against(chain, tmp_path, default_model_file, make_cheater):
    """One job on the two-worker market; returns what the test checks."""
    with trio.fail_after(240):
        async with AsyncExitStack() as stack:
            engine = await stack.enter_async_context(open_engine(default_model_file, slots=1, threads=1))
            own = await stack.enter_async_context(open_engine(default_model_file, slots=1, threads=1))
            cheater_engine = stack.enter_context(make_cheater(own))
            tokenizers = TokenizerCache(tmp_path / "requester")
            stack.callback(tokenizers.close)
            cheat, cheat_meter = await stack.enter_async_context(
                paid_worker(chain, tmp_path, "cheat", cheater_engine, chain.worker, PRICE)
            )
            honest, honest_meter = await stack.enter_async_context(
                paid_worker(chain, tmp_path, "honest", engine, chain.other_worker, 2 * PRICE)
            )
            host = await stack.enter_async_context(requester(tmp_path))
            node = RequesterNode(host, None, tokenizers=tokenizers)
            client = deposits(chain, chain.requester)
            await trio.to_thread.run_sync(client.deposit, TOKEN)  # the one deposit both workers are paid from
            payer = DepositPayer(client, WalletLedger.in_data_dir(tmp_path / "requester"), host.peer_id,
                                 usage=node.checked_usage)  # fmt: skip
            query = RouteQuery(DEFAULT_MODEL_CID, max_price_per_1k=2 * PRICE, chain_id=chain.deployment.chain_id,
                               escrow=chain.deployment.deposits)  # fmt: skip
            reputation, heard = Reputation(), Recorder()
            result = await run_job(host, lambda: [cheat, honest], query, SPEC, reputation=reputation, payer=payer,
                                   observer=heard)  # fmt: skip
            tokenizer = await tokenizers.get(DEFAULT_MODEL_CID)
            exact = tokenizer.count_sync(JobRequest("x", DEFAULT_MODEL_CID, {}, messages=SPEC.messages))
            for meter in (cheat_meter, honest_meter):  # every receipt the worker holds, claimed on chain
                await trio.to_thread.run_sync(meter.settler.settle_once)
    earned = {name: deposits(chain).token_balance(acct.address) for name, acct in
              (("cheat", chain.worker), ("honest", chain.other_worker))}  # fmt: skip
    return result, heard, reputation, exact, earned, cheat.peer_id


def no_cheat(engine):
    from contextlib import nullcontext

    return nullcontext(engine)


CHEATS = {
    "one more prompt token": lambda e: no_cheat(overchargers.Overcharging(e, prompt=overchargers.one_more)),
    "30% more prompt tokens": lambda e: no_cheat(overchargers.Overcharging(e, prompt=overchargers.thirty_percent)),
    "the old byte bound": lambda e: no_cheat(overchargers.Overcharging(e, prompt=overchargers.byte_bound)),
    "30% more completion tokens": lambda e: no_cheat(overchargers.Overcharging(e, completion=overchargers.inflated)),
    "30% more in the receipt only": lambda e: no_cheat(
        overchargers.Overcharging(e, completion=overchargers.inflated, receipt_only=True)
    ),
    "padding past end-of-generation": overchargers.padding,
}


# Two in the default suite, the rest with --all (each runs two ~930-token prefills and a job on real engines).
FAST = ("30% more prompt tokens", "padding past end-of-generation")


@pytest.mark.parametrize("cheat", [c if c in FAST else pytest.param(c, marks=pytest.mark.long) for c in CHEATS])
async def test_an_overcharger_earns_exactly_its_true_usage_and_the_honest_worker_the_rest(
    chain, tmp_path, default_model_file, cheat
):
    result, heard, reputation, exact, earned, cheat_id = await run_against(
        chain, tmp_path, default_model_file, CHEATS[cheat]
    )
    (failover,) = heard.failovers
    assert failover[0] == cheat_id and "overcharge" in failover[1]
    assert reputation.banned(cheat_id, time.time() + OVERCHARGE_BAN_S - 60)
    honest_receipt = result.receipts[-1]
    kept = result.completion_tokens - honest_receipt.completion_tokens  # the overcharger's tokens that checked out
    # on chain: the overcharger is paid its true prompt and the tokens that checked out, at its price; the
    # honest worker exactly what it used (the prompt, and the text resumed after the overcharger's), at its own
    assert earned["cheat"] == job_cost(exact, kept, PRICE)
    assert earned["honest"] == job_cost(honest_receipt.prompt_tokens, honest_receipt.completion_tokens, 2 * PRICE)
    assert earned["cheat"] + earned["honest"] == result.cost
    if cheat == "padding past end-of-generation":
        assert kept > 0 and result.finish_reason == "stop"  # paid up to the model's end, not for the padding
    if cheat == "30% more in the receipt only":
        assert [proof.worker for proof in result.overcharges] == [cheat_id]  # its signed receipt: evidence
        assert kept > 0
