"""Payment as its own seam: the worker's meter and the requester's payer, against fakes (no chain, no network).

Receipts are really signed (eth-account, a local key) and really checked; the
ledgers are real SQLite files; only the chain and the stream are stand-ins.
"""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import trio
from eth_account import Account

from node.app.worker import _priced
from node.errors import ChainUnreachable, InvalidReceipt, Overcharge, PaymentRefused
from node.payments.chainio import ChainIO
from node.payments.deposit_metering import ALLOWANCE_TOKENS, UNSECURED_ALLOWANCES, DepositMetering
from node.payments.deposit_receipts import DepositDomain, sign_job_terms
from node.payments.deposit_receipts import check_receipt as check_deposit_receipt
from node.payments.deposit_receipts import sign_receipt as sign_deposit_receipt
from node.payments.deposit_settlement import SettlementPolicy
from node.payments.deposits import DepositAccount, PairState
from node.payments.ledger import WalletLedger, WorkerLedger
from node.payments.metering import FreeMetering
from node.payments.payer import CREDIT_TOKENS, DepositPayer, FreePayer
from node.payments.policy import job_cost, prompt_token_bound
from node.protocol.messages import DepositReceipt, DepositTerms, JobChunk, JobDone, JobRequest, ResultReceipt

from .factories import MODEL, offer

PRICE = 10**15  # per 1k tokens: 10**12 base units a token
REQUESTER = Account.from_key(b"\x11" * 32)
WORKER = Account.from_key(b"\x22" * 32)
PEER = "12D3KooWrequester"  # the libp2p peer the requester sends jobs from
EXPIRES = 4_000_000_000  # terms bindings' expiry (unix seconds)


@dataclass
class FakeDeployment:
    chain_id: int = 31337
    escrow: str = ""


# ------------------------------------------------------------------ fakes

DEPOSITS = DepositDomain(31337, "0x" + "dd" * 20)


@dataclass
class FakeDeposits:
    """What ``DepositMetering`` and ``DepositPayer`` ask of a ``DepositClient``: one requester's account on a chain
    that pays claims from it (first come, first served), counting the reads."""

    account: object
    state: DepositAccount = field(default_factory=lambda: DepositAccount(10**18, 0, 0, 0, 0, 0))
    paid: dict = field(default_factory=dict)  # worker → paid
    deployment: FakeDeployment = field(default_factory=lambda: FakeDeployment(escrow=DEPOSITS.escrow))
    domain: DepositDomain = DEPOSITS
    address: str = DEPOSITS.escrow
    io: ChainIO = field(default_factory=ChainIO)
    reads: int = 0
    batches: list = field(default_factory=list)
    has_slot: bool = False
    guarantee: int = 0
    blocks: int = 0
    failing: dict = field(default_factory=dict)  # method name → exceptions it raises, one per call, first

    def account_of(self, requester: str) -> DepositAccount:
        self.reads += 1
        return self.state

    def _fail(self, method: str) -> None:
        if self.failing.get(method):
            raise self.failing[method].pop(0)

    def block_number(self) -> int:  # a block a call
        self._fail("block_number")
        self.blocks += 1
        return self.blocks

    def requesters_changed(self, from_block: int, to_block) -> set[str]:
        return set()

    def pair_of(self, requester: str, worker: str) -> PairState:
        self._fail("pair_of")
        return PairState(self.paid.get(worker, 0), 0, self.has_slot)

    def guarantee_of(self, requester: str, worker: str) -> int:
        return self.guarantee

    def sign_receipt(self, worker: str, cumulative: int) -> bytes:
        return sign_deposit_receipt(self.account, DEPOSITS, worker, cumulative)

    def sign_job_terms(self, job_id: str, worker: str, peer_id: str, expires_at: int) -> bytes:
        return sign_job_terms(self.account, DEPOSITS, job_id, worker, peer_id, expires_at)

    def claim_batch(self, claims) -> dict:
        self._fail("claim_batch")
        self.batches.append(list(claims))
        for requester, cumulative, signature in claims:
            check_deposit_receipt(DEPOSITS, requester, self.account.address, cumulative, signature)
            owed = min(cumulative - self.paid.get(self.account.address, 0), self.state.deposit)
            self.paid[self.account.address] = self.paid.get(self.account.address, 0) + max(owed, 0)
            self.state = dataclasses.replace(self.state, deposit=self.state.deposit - max(owed, 0))
        return {}


def deposit_request(
    job_id: str = "job",
    max_tokens: int = 100,
    window: int = 64 * 10**12,
    *,
    signer=REQUESTER,
    peer: str = PEER,
    worker: str = WORKER.address,
    expires_at: int = EXPIRES,
    **terms,
) -> JobRequest:
    """A request paid from REQUESTER's deposit, its terms bound by ``signer`` to ``peer`` sending it to ``worker``."""
    binding = sign_job_terms(signer, DEPOSITS, job_id, worker, peer, expires_at)
    fields = (
        dict(
            requester=REQUESTER.address,
            chain_id=DEPOSITS.chain_id,
            escrow=DEPOSITS.escrow,
            price_per_1k=PRICE,
            credit_window=str(window),
            expires_at=expires_at,
            binding=binding,
        )
        | terms
    )
    payment = DepositTerms(**fields)
    return JobRequest(job_id, MODEL, {"max_tokens": max_tokens}, prompt="hi", payment=payment)


def deposit_metering(tmp_path, **changes) -> DepositMetering:
    fields = dict(max_credit_window=10**18, receipt_timeout_s=0.5) | changes
    return DepositMetering(FakeDeposits(WORKER), WorkerLedger(tmp_path / "worker.db"), PRICE, **fields)


def deposit_receipt(cumulative: int, job_amount: int, job_id: str = "job", signer=REQUESTER, worker=WORKER):
    signature = sign_deposit_receipt(signer, DEPOSITS, worker.address, cumulative)
    return DepositReceipt(job_id, str(cumulative), str(job_amount), signature)


def deposit_payer(tmp_path, **changes) -> DepositPayer:
    return DepositPayer(FakeDeposits(REQUESTER), WalletLedger(tmp_path / "wallet.db"), PEER, **changes)


def paid_offer(peer: str = "12D3KooWpaid", slots: int = 1, payee: str = WORKER.address):
    return offer(peer, price_per_1k=PRICE, chain_id=DEPOSITS.chain_id, escrow=DEPOSITS.escrow, payee=payee,
                 slots_total=slots)  # fmt: skip


def done(prompt_tokens: int, completion_tokens: int) -> JobDone:
    return JobDone("job", "stop", ResultReceipt("job", MODEL, b"", b"", prompt_tokens, completion_tokens, "w"))


# ------------------------------------------------------------------ the meter


async def test_the_free_meter_covers_everything_and_takes_nothing():
    meter = await FreeMetering().admit(JobRequest("job", MODEL, {}, prompt="x"))
    assert meter.covers(10**6, 10**6) and await meter.wait_for_credit(10**6, 10**6)
    assert not await meter.take(deposit_receipt(5, 5))
    assert await meter.settle(1, 1) == ""


async def test_a_meter_streams_only_within_the_window_of_what_was_receipted(tmp_path):
    metering = deposit_metering(tmp_path)
    meter = await metering.admit(deposit_request(window=job_cost(0, 64, PRICE)), PEER)
    assert meter.covers(0, 64) and not meter.covers(0, 65)
    assert not meter.covers(1500, 1)  # a long prompt is never within the window on its own…
    prompt = job_cost(1500, 0, PRICE)
    assert await meter.take(deposit_receipt(prompt, prompt))  # …until the requester pays for it
    assert meter.covers(1500, 64) and not meter.covers(1500, 65)
    held = metering.ledger.get_pair(DEPOSITS.chain_id, DEPOSITS.escrow, REQUESTER.address)
    assert held.best == held.credited == prompt  # persisted before use


async def test_a_meter_waits_for_credit_and_gives_up_after_the_timeout(tmp_path):
    meter = await deposit_metering(tmp_path).admit(deposit_request(window=job_cost(0, 64, PRICE)), PEER)
    async with trio.open_nursery() as nursery:

        async def pay_soon():
            await trio.sleep(0.05)
            await meter.take(deposit_receipt(job_cost(700, 0, PRICE), job_cost(700, 0, PRICE)))

        nursery.start_soon(pay_soon)
        assert await meter.wait_for_credit(700, 1)
    assert not await meter.wait_for_credit(700, 500)  # nobody pays for that much: False after receipt_timeout_s


# ------------------------------------------------------------------ the payer


async def test_the_free_payer_attaches_nothing_and_signs_nothing():
    request = JobRequest("job", MODEL, {"max_tokens": 5}, prompt="x")
    async with FreePayer().pay(paid_offer(), request) as payment:
        assert payment.request is request
        await payment.on_chunk(None, JobChunk("job", "text", 1, 3))
        await payment.on_done(None, done(3, 1))
        assert payment.spent == 0


async def test_a_paid_attempt_pays_the_announced_prompt_then_text_as_it_arrives_then_exactly_the_usage(tmp_path):
    sent: list[DepositReceipt] = []

    async def send(message):
        sent.append(message)

    prompt = "word " * 1500  # about 1,500 tokens: far over the credit window
    request = JobRequest("job", MODEL, {"max_tokens": 100}, prompt=prompt)
    async with deposit_payer(tmp_path).pay(paid_offer(), request) as payment:
        assert payment.request.payment.price_per_1k == PRICE
        assert int(payment.request.payment.credit_window) == job_cost(0, CREDIT_TOKENS, PRICE)
        await payment.on_chunk(send, JobChunk("job", "", 0, 1503))  # the worker announces the prompt
        assert [int(r.job_amount) for r in sent] == [job_cost(1503, 0, PRICE)]
        for _ in range(CREDIT_TOKENS // 2 - 1):  # less than half a window of text: no new receipt yet
            await payment.on_chunk(send, JobChunk("job", "w", 1, 1503))
        assert len(sent) == 1
        await payment.on_chunk(send, JobChunk("job", "w", 1, 1503))
        assert int(sent[-1].job_amount) == job_cost(1503, CREDIT_TOKENS // 2, PRICE)
        await payment.on_done(send, done(1503, 40))
        assert int(sent[-1].job_amount) == int(sent[-1].cumulative) == job_cost(1503, 40, PRICE) == payment.spent


async def test_a_worker_that_claims_more_than_the_prompt_can_have_is_caught(tmp_path):
    request = JobRequest("job", MODEL, {"max_tokens": 10}, prompt="short")
    async with deposit_payer(tmp_path).pay(paid_offer(), request) as payment:
        bound = prompt_token_bound(request)
        with pytest.raises(Overcharge, match="prompt tokens"):
            await payment.on_chunk(None, JobChunk("job", "", 0, bound + 1))
        with pytest.raises(Overcharge, match="more than max_tokens"):
            await payment.on_done(None, done(3, 11))
        assert payment.spent == 0


# ------------------------------------------------- paying what the model's tokenizer can check


class FakeTokenizer:
    """A tokenizer of one byte per token (id = the byte), 0 ending generation; a prompt is a token per word."""

    def count_sync(self, request: JobRequest) -> int:
        return len(request.prompt.split())

    def is_eog(self, token: int) -> bool:
        return token == 0

    def answer_bytes(self, tokens) -> bytes:
        return bytes(t for t in tokens if t != 0)


def records(text: str, *, eog: bool = False) -> bytes:
    from node.inference.fingerprints import pack

    tokens = list(text.encode()) + ([0] if eog else [])
    n = len(tokens)
    return pack(tokens, tokens, tokens, [1.0] * n, [0.5] * n, [1.0] * n)


def chunk(text: str, prompt_tokens: int, *, tokens: int | None = None, eog_after: str = "") -> JobChunk:
    """A worker's chunk of ``text``, one record per byte (and an end-of-generation record, then ``eog_after``)."""
    fingerprints = records(text, eog=bool(eog_after)) + (records(eog_after) if eog_after else b"")
    count = len(text) + (len(eog_after) + 1 if eog_after else 0)
    return JobChunk("job", text + eog_after, count if tokens is None else tokens, prompt_tokens, [], fingerprints)


def checked_done(text: str, prompt_tokens: int, completion_tokens: int | None = None, *, eog=True) -> JobDone:
    receipt = ResultReceipt("job", MODEL, b"", b"", prompt_tokens, len(text) if completion_tokens is None
                            else completion_tokens, "w")  # fmt: skip
    return JobDone("job", "stop" if eog else "length", receipt, records(text, eog=eog))


@asynccontextmanager
async def checked_payment(tmp_path, prompt_words: int = 300, max_tokens: int = 200):
    from node.payments.usage import CheckedUsage

    async def usage(offer, request):
        return CheckedUsage(FakeTokenizer(), FakeTokenizer().count_sync(request))

    sent: list[DepositReceipt] = []

    async def send(message):
        sent.append(message)

    request = JobRequest("job", MODEL, {"max_tokens": max_tokens}, prompt="word " * prompt_words)
    payer = DepositPayer(FakeDeposits(REQUESTER), WalletLedger(tmp_path / "wallet.db"), PEER, usage=usage)
    async with payer.pay(paid_offer(), request) as payment:
        yield payment, send, sent


async def test_with_the_tokenizer_an_honest_answer_is_paid_exactly_as_its_records_arrive(tmp_path):
    async with checked_payment(tmp_path) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        assert int(sent[-1].cumulative) == job_cost(300, 0, PRICE)
        answer = "a plain answer, " * 8
        for i in range(0, len(answer), 4):
            await payment.on_chunk(send, chunk(answer[i : i + 4], 300))
        assert int(sent[-1].cumulative) <= job_cost(300, len(answer), PRICE)
        await payment.on_done(send, checked_done(answer, 300))
        assert int(sent[-1].cumulative) == job_cost(300, len(answer), PRICE) == payment.spent


@pytest.mark.parametrize("claimed", [301, 390, 2_000])  # one more, 30% more, and what the byte bound allowed
async def test_a_worker_claiming_more_prompt_tokens_is_paid_the_true_count_and_dropped(tmp_path, claimed):
    async with checked_payment(tmp_path) as (payment, send, sent):
        with pytest.raises(Overcharge, match=f"claims {claimed} prompt tokens; the model's tokenizer gives 300"):
            await payment.on_chunk(send, chunk("", claimed))
        assert payment.spent == job_cost(300, 0, PRICE)


async def test_a_chunk_billing_more_tokens_than_its_records_is_paid_only_its_records(tmp_path):
    async with checked_payment(tmp_path) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        await payment.on_chunk(send, chunk("honest", 300))
        with pytest.raises(Overcharge, match="bills 13 tokens with 10 fingerprint records") as caught:
            await payment.on_chunk(send, chunk(" text more", 300, tokens=13))  # 30% more
        assert payment.spent == job_cost(300, 6, PRICE)
        assert caught.value.kept == ("honest", 6)


async def test_an_answer_that_goes_on_after_end_of_generation_is_paid_up_to_it(tmp_path):
    async with checked_payment(tmp_path) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        await payment.on_chunk(send, chunk("The answer", 300))
        with pytest.raises(Overcharge, match="goes on after the model's end-of-generation") as caught:
            await payment.on_chunk(send, chunk(" is 4.", 300, eog_after=" And then some padding"))
        assert caught.value.kept == ("The answer is 4.", 16)
        assert payment.spent == job_cost(300, 16, PRICE)


async def test_a_final_receipt_that_bills_more_than_its_records_is_paid_for_the_records(tmp_path):
    async with checked_payment(tmp_path) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        await payment.on_chunk(send, chunk("forty characters of a well-made answer..", 300))
        with pytest.raises(Overcharge, match="bills 52 completion tokens; its records hold 40"):
            await payment.on_done(send, checked_done("forty characters of a well-made answer..", 300, 52))
        assert payment.spent == job_cost(300, 40, PRICE)
        with pytest.raises(Overcharge, match="claims 301 prompt tokens"):
            await payment.on_done(send, checked_done("forty characters of a well-made answer..", 301))
        assert payment.spent == job_cost(300, 40, PRICE)


async def test_text_that_the_records_do_not_spell_is_not_paid(tmp_path):
    async with checked_payment(tmp_path) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        forged = JobChunk("job", "other words", 11, 300, [], records("eleven char"))
        with pytest.raises(Overcharge, match="not what the records' tokens spell"):
            await payment.on_chunk(send, forged)
        assert payment.spent == job_cost(300, 0, PRICE)


async def test_false_finish_reasons_are_refused(tmp_path):
    async with checked_payment(tmp_path, max_tokens=200) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        await payment.on_chunk(send, chunk("cut short", 300))
        with pytest.raises(Overcharge, match="finish 'length' after 9 of max_tokens 200"):
            await payment.on_done(send, checked_done("cut short", 300, eog=False))
        assert payment.spent == job_cost(300, 9, PRICE)


# --------------------------------------------------------- the deposit scheme


async def test_a_deposit_meter_credits_each_job_its_part_of_the_pairs_receipts_in_any_order(tmp_path):
    """Two concurrent jobs: the requester allocated A 100 (total 100), then B 50 (total 150), then A 30 more
    (total 180). B's receipt comes first, A's second receipt before its first."""
    metering = deposit_metering(tmp_path)
    a = await metering.admit(deposit_request("a"), PEER)
    b = await metering.admit(deposit_request("b"), PEER)
    assert await b.take(deposit_receipt(150, 50, "b"))
    assert await a.take(deposit_receipt(180, 130, "a"))
    assert await a.take(deposit_receipt(100, 100, "a"))  # older: nothing new
    assert (a.credited, b.credited) == (130, 50)
    held = metering.ledger.get_pair(DEPOSITS.chain_id, DEPOSITS.escrow, REQUESTER.address)
    assert (held.best, held.credited) == (180, 180)  # persisted before use; credits add up to the best receipt
    assert not await a.take(deposit_receipt(200, 150, "b"))  # another job's receipt is not this meter's


async def test_a_deposit_meter_refuses_receipts_that_do_not_back_the_credit(tmp_path):
    metering = deposit_metering(tmp_path)
    a = await metering.admit(deposit_request("a"), PEER)
    b = await metering.admit(deposit_request("b"), PEER)
    assert await a.take(deposit_receipt(100, 100, "a"))
    with pytest.raises(InvalidReceipt, match="does not back"):  # the same total again, claimed for another job
        await b.take(deposit_receipt(100, 100, "b"))
    with pytest.raises(InvalidReceipt, match="not the requester"):
        await b.take(deposit_receipt(300, 200, "b", signer=WORKER))
    with pytest.raises(InvalidReceipt, match="not the requester"):  # signed to another worker
        await b.take(deposit_receipt(300, 200, "b", worker=REQUESTER))
    with pytest.raises(InvalidReceipt, match="more than the pair's total"):
        await b.take(deposit_receipt(300, 301, "b"))
    with pytest.raises(InvalidReceipt, match="not numbers"):
        await b.take(DepositReceipt("b", "lots", "1", b""))
    assert b.credited == 0
    assert metering.ledger.get_pair(DEPOSITS.chain_id, DEPOSITS.escrow, REQUESTER.address).credited == 100


async def test_deposit_admission_refuses_unlocking_and_overcommitted_requesters(tmp_path):
    metering = deposit_metering(tmp_path, cache_ttl_s=0)
    worst = job_cost(prompt_token_bound(deposit_request()), 100, PRICE)
    metering.allowance = 2 * worst
    first = await metering.admit(deposit_request("a"), PEER)
    second = await metering.admit(deposit_request("b"), PEER)  # held: a running job
    with pytest.raises(PaymentRefused, match="exposure to the requester would pass its bound"):
        await metering.admit(deposit_request("c"), PEER)  # two worst cases reserved: the allowance is full
    await first.take(deposit_receipt(worst, worst, "a"))
    assert await first.settle(prompt_token_bound(deposit_request()), 100) == "paid"
    with pytest.raises(PaymentRefused, match="exposure"):  # a finished job's receipt is owed until claimed
        await metering.admit(deposit_request("c"), PEER)
    assert await trio.to_thread.run_sync(metering.settler.settle_once) == (1, 0)
    assert second.credited == 0
    await metering.admit(deposit_request("c"), PEER)  # claimed: room again
    metering.client.state = dataclasses.replace(metering.client.state, deposit=worst - 1)
    with pytest.raises(PaymentRefused, match="cannot cover"):
        await metering.admit(deposit_request("d"), PEER)
    metering.client.state = dataclasses.replace(metering.client.state, deposit=10**18, unlock_at=12_345)
    with pytest.raises(PaymentRefused, match="unlocking"):
        await metering.admit(deposit_request("d"), PEER)
    for terms, reason in [
        (dict(escrow="0x" + "ee" * 20), "deposit escrow"),
        (dict(price_per_1k=PRICE - 1), "offered"),
        (dict(requester="nobody"), "not an address"),
    ]:
        with pytest.raises(PaymentRefused, match=reason):
            await metering.admit(deposit_request("e", **terms), PEER)
    with pytest.raises(PaymentRefused, match="send payment terms"):
        await metering.admit(JobRequest("f", MODEL, {}, prompt="x"), PEER)


async def test_a_cancelled_job_frees_its_reservation(tmp_path):
    metering = deposit_metering(tmp_path)
    worst = job_cost(prompt_token_bound(deposit_request()), 100, PRICE)
    metering.allowance = worst
    meter = await metering.admit(deposit_request("a"), PEER)
    with pytest.raises(PaymentRefused, match="exposure"):
        await metering.admit(deposit_request("b"), PEER)
    meter.close()  # the job service closes its meter however the job ends, settled or not
    assert await metering.admit(deposit_request("b"), PEER)


def worst_case(request: JobRequest | None = None) -> int:
    request = request or deposit_request()
    return job_cost(prompt_token_bound(request), int(request.params["max_tokens"]), PRICE)


async def test_terms_are_admitted_only_if_the_requester_bound_them_to_the_sending_peer(tmp_path):
    """A stranger naming someone's deposit (issue 20 review, F2) cannot bind the terms to its own peer: it is
    refused before anything is read or reserved, and the owner's own job still fits the worker's bound."""
    metering = deposit_metering(tmp_path, allowance=worst_case())  # room for one job
    stranger = Account.from_key(b"\x33" * 32)
    for request, peer, reason in [
        (deposit_request("a", signer=stranger), PEER, "not the requester's"),  # names a deposit not its own
        (deposit_request("a"), "12D3KooWstranger", "not the requester's"),  # the owner's terms, from another peer
        (deposit_request("a", worker=REQUESTER.address), PEER, "not the requester's"),  # bound to another worker
        (dataclasses.replace(deposit_request("a"), job_id="b"), PEER, "not the requester's"),  # another job
        (deposit_request("a", expires_at=1_000), PEER, "expired"),
        (deposit_request("a", binding=b""), PEER, "not signed by the requester"),
        (deposit_request("a", binding=b"\x01" * 64), PEER, "65 bytes"),
    ]:
        with pytest.raises(PaymentRefused, match=reason):
            await metering.admit(request, peer)
    assert metering.client.reads == 0  # refused before any chain read
    assert await metering.admit(deposit_request("a"), PEER)  # the owner's job: nothing was reserved
    async with deposit_payer(tmp_path).pay(paid_offer(), deposit_request("c")) as payment:  # the payer binds
        with pytest.raises(PaymentRefused, match="not the requester's"):
            await deposit_metering(tmp_path / "other").admit(payment.request, "12D3KooWstranger")


async def test_a_job_that_ends_without_settling_has_its_receipts_claimed(tmp_path):
    """A cancelled job (F1) never settles: closing its meter hands its receipts to the settler, even at a slot
    holder whose claims wait for the policy (every job)."""
    metering = deposit_metering(tmp_path)
    metering.client.has_slot, metering.client.guarantee = True, 10**18
    assert metering.settler.settle_once() == (0, 0)  # started, nothing held
    meter = await metering.admit(deposit_request("a"), PEER)
    assert await meter.take(deposit_receipt(100, 100, "a"))
    assert metering.settler.settle_once() == (0, 0)  # running: not due yet
    meter.close()  # cancelled by the requester: jobs.py closes the meter in a finally
    meter.close()  # once is enough
    assert metering.settler.settle_once() == (1, 0)
    assert metering.client.paid[WORKER.address] == 100
    idle = await metering.admit(deposit_request("b"), PEER)
    idle.close()  # no receipt taken: nothing for the settler
    assert metering.settler._unclaimed_jobs(REQUESTER.address) == 0


async def test_a_worker_that_lost_its_ledger_never_credits_a_receipt_the_chain_already_paid(tmp_path):
    """F3: same key, new data dir; the requester replays a receipt the chain paid, after an event dropped the
    worker's cached read: the job's credit starts from what the chain had paid at its admission."""
    first = deposit_metering(tmp_path / "old")
    meter = await first.admit(deposit_request("a"), PEER)
    assert await meter.take(deposit_receipt(100, 100, "a"))
    meter.close()
    assert first.settler.settle_once() == (1, 0)
    lost = DepositMetering(first.client, WorkerLedger(tmp_path / "new.db"), PRICE, max_credit_window=10**18)
    replayed = await lost.admit(deposit_request("b"), PEER)
    lost.forget(REQUESTER.address)  # an event named the requester (its own 1-wei deposit, say)
    with pytest.raises(InvalidReceipt, match="does not back"):
        await replayed.take(deposit_receipt(100, 100, "b"))
    assert await replayed.take(deposit_receipt(150, 50, "b"))  # what it really owes on top is credited
    assert replayed.credited == 50


async def test_a_slot_holder_is_never_stricter_than_a_worker_without_a_slot(tmp_path):
    """F5: a slot holder's bound is its guarantee plus the allowance any requester gets."""
    worst = worst_case()
    metering = deposit_metering(tmp_path, allowance=worst, cache_ttl_s=0)
    metering.client.has_slot, metering.client.guarantee = True, worst // 2  # a small reserve's share
    a = await metering.admit(deposit_request("a"), PEER)
    with pytest.raises(PaymentRefused, match=rf"> {worst + worst // 2} \(what the requester's reserve guarantees"):
        await metering.admit(deposit_request("b"), PEER)
    a.close()
    metering.client.guarantee = 0  # its share is used up: still the allowance
    assert await metering.admit(deposit_request("c"), PEER)


async def test_a_worker_caps_its_unsecured_exposure_over_all_requesters(tmp_path):
    """F4: addresses cost nothing, so the allowance per requester is not a bound on its own; the unsecured
    exposure summed over every requester is capped (default: UNSECURED_ALLOWANCES allowances)."""
    worst = worst_case()
    assert deposit_metering(tmp_path / "d").unsecured_cap == UNSECURED_ALLOWANCES * job_cost(0, ALLOWANCE_TOKENS, PRICE)
    metering = deposit_metering(tmp_path, allowance=worst, unsecured_cap=2 * worst)
    keys = [Account.from_key(bytes([0x41 + i]) * 32) for i in range(3)]
    meters = [
        await metering.admit(deposit_request(f"j{i}", signer=k, requester=k.address), PEER)
        for i, k in enumerate(keys[:2])
    ]
    with pytest.raises(PaymentRefused, match="over all requesters would pass its cap"):
        await metering.admit(deposit_request("j2", signer=keys[2], requester=keys[2].address), PEER)
    meters[0].close()
    assert await metering.admit(deposit_request("j2", signer=keys[2], requester=keys[2].address), PEER)


async def test_the_allowance_admits_a_job_at_its_own_edge(tmp_path):
    """F8: the default allowance is one job of an 8 KiB conversation (4 messages, roles included) at the default
    max_tokens, as the worker bounds it; a byte more, or a client's max_tokens of 16k, is refused with why."""
    metering = deposit_metering(tmp_path)  # no slot: the allowance alone

    def conversation(job_id: str, size: int, max_tokens: int = 256) -> JobRequest:
        roles = ["system", "user", "assistant", "user"]
        content = size - sum(len(r) for r in roles)
        messages = [{"role": r, "content": "x" * (content // 4 + (i < content % 4))} for i, r in enumerate(roles)]
        return dataclasses.replace(deposit_request(job_id, max_tokens), prompt=None, messages=messages)

    edge = conversation("a", 8192)
    assert worst_case(edge) == metering.allowance == job_cost(0, ALLOWANCE_TOKENS, PRICE)
    (await metering.admit(edge, PEER)).close()
    with pytest.raises(PaymentRefused, match="worst case .* is over this worker's bound"):
        await metering.admit(conversation("b", 8193), PEER)
    with pytest.raises(PaymentRefused, match="ask for fewer max_tokens"):
        await metering.admit(conversation("c", 100, max_tokens=16_000), PEER)


async def test_the_settler_survives_chain_errors_and_never_claims_twice(tmp_path):
    """F6: a read that fails after a claim landed is read again next round (no second transaction); a round that
    fails with any error is retried with backoff, and the event watcher goes on too: ``serve`` never stops."""
    metering = deposit_metering(tmp_path, events_poll_s=0.01)
    client = metering.client
    assert metering.settler.settle_once() == (0, 0)
    meter = await metering.admit(deposit_request("a"), PEER)
    assert await meter.take(deposit_receipt(100, 100, "a"))
    meter.close()
    client.failing["pair_of"] = [ChainUnreachable("the endpoint went away")]
    assert metering.settler.settle_once() == (0, 1)  # the claim landed, what it paid is not known yet
    assert metering.settler.settle_once() == (0, 0) and len(client.batches) == 1  # read: paid, no second claim
    assert metering.ledger.get_pair(DEPOSITS.chain_id, DEPOSITS.escrow, REQUESTER.address).claimed == 100

    fresh = deposit_metering(tmp_path / "fresh", events_poll_s=0.01)
    meter = await fresh.admit(deposit_request("b"), PEER)
    assert await meter.take(deposit_receipt(100, 100, "b"))
    meter.close()
    fresh.client.failing = {"claim_batch": [RuntimeError("HTTP 429")], "block_number": [ValueError("range")] * 3}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(fresh.run)
            while fresh.client.paid.get(WORKER.address) != 100 or fresh.client.failing["block_number"]:
                await trio.sleep(0.05)  # polling interval: both loops went on past their errors
            nursery.cancel_scope.cancel()


async def test_a_claim_dropped_by_a_reorg_is_claimed_again(tmp_path):
    """F7: a landed claim is read again (every ``recheck_s``, for ``reorg_window_s``); gone, it is claimed again."""
    metering = deposit_metering(tmp_path)
    now = [1_000.0]
    settler = metering.settler
    settler.clock = lambda: now[0]
    meter = await metering.admit(deposit_request("a"), PEER)
    assert await meter.take(deposit_receipt(100, 100, "a"))
    meter.close()
    assert settler.settle_once() == (1, 0)
    metering.client.paid[WORKER.address] = 0  # the block with the claim was reorganised out
    now[0] += 1
    assert settler.settle_once() == (0, 0)  # not read again yet
    now[0] += settler.recheck_s
    assert settler.settle_once() == (1, 0)
    assert metering.client.paid[WORKER.address] == 100 and len(metering.client.batches) == 2
    now[0] += settler.reorg_window_s + 1
    assert settler.settle_once() == (0, 0) and not settler._landed  # past the window: no more reads


async def test_an_unlock_seen_in_the_escrow_s_events_is_recorded_and_claimed_at_once(tmp_path):
    """F1: the events name the requester, whose receipts the worker holds: it is read again, its unlock recorded,
    and its receipts claimed at once, though no job of it comes again."""
    metering = deposit_metering(tmp_path, events_poll_s=0.01)
    metering.client.has_slot, metering.client.guarantee = True, 10**18
    metering.settler.policy = SettlementPolicy(settle_every=100)  # only the unlock makes it due
    metering.client.requesters_changed = lambda start, end: {REQUESTER.address}  # an event names it each poll
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(metering.run)
            while not metering.settler._started:
                await trio.sleep(0.01)  # polling interval: the start-up round is over (nothing held)
            meter = await metering.admit(deposit_request("a"), PEER)
            assert await meter.take(deposit_receipt(100, 100, "a"))
            meter.close()  # a slot holder's job: its claim waits for the policy
            metering.client.state = dataclasses.replace(metering.client.state, unlock_at=12_345)
            while metering.client.paid.get(WORKER.address) != 100:
                await trio.sleep(0.01)  # polling interval
            nursery.cancel_scope.cancel()
    held = metering.ledger.get_pair(DEPOSITS.chain_id, DEPOSITS.escrow, REQUESTER.address)
    assert held.unlock_at == 12_345 and held.claimed == 100


async def test_chain_reads_are_cached_per_requester(tmp_path):
    metering = deposit_metering(tmp_path)
    for job in "abc":
        await metering.admit(deposit_request(job), PEER)
    assert metering.client.reads == 1
    metering.forget(REQUESTER.address)  # an event named the requester
    await metering.admit(deposit_request("d"), PEER)
    assert metering.client.reads == 2


async def test_a_deposit_payer_pays_a_new_worker_with_no_chain_step_and_concurrent_jobs_add_up(tmp_path):
    payer = deposit_payer(tmp_path)
    sent: list[DepositReceipt] = []

    async def send(message):
        sent.append(message)

    requests = [JobRequest(f"job{i}", MODEL, {"max_tokens": 100}, prompt="x") for i in range(3)]
    async with trio.open_nursery() as nursery:
        for request in requests:

            async def job(request=request):
                async with payer.pay(paid_offer(), request) as payment:
                    assert payment.request.payment.requester == REQUESTER.address
                    await payment.on_chunk(send, JobChunk(request.job_id, "", 0, 50))
                    await payment.on_done(send, done(50, 10))
                    assert payment.spent == job_cost(50, 10, PRICE)

            nursery.start_soon(job)
    assert payer.client.reads == 0  # not one chain call
    totals = sorted(int(r.cumulative) for r in sent)
    assert totals[-1] == 3 * job_cost(50, 10, PRICE) and len(set(totals)) == len(totals)  # increments add up
    for r in sent:
        check_deposit_receipt(DEPOSITS, REQUESTER.address, WORKER.address, int(r.cumulative), r.signature)
    again = deposit_payer(tmp_path)  # a restarted requester goes on from the total it committed
    async with again.pay(paid_offer(), requests[0]) as payment:
        await payment.on_chunk(send, JobChunk("job0", "", 0, 50))
    assert int(sent[-1].cumulative) == 3 * job_cost(50, 10, PRICE) + job_cost(50, 0, PRICE)


async def test_a_deposit_meter_and_payer_settle_a_job_between_them(tmp_path):
    """The two sides of the deposit scheme against each other: what the payer signs the meter credits."""
    metering = deposit_metering(tmp_path / "w")
    payer = deposit_payer(tmp_path / "r")
    request = JobRequest("job", MODEL, {"max_tokens": 100}, prompt="word " * 1500)
    async with payer.pay(paid_offer(), request) as payment:
        meter = await metering.admit(payment.request, PEER)

        async def send(message):
            assert await meter.take(message)

        await payment.on_chunk(send, JobChunk("job", "", 0, 1500))
        assert meter.covers(1500, 1)
        await payment.on_done(send, done(1500, 40))
        assert await meter.settle(1500, 40) == "paid"
    assert await trio.to_thread.run_sync(metering.settler.settle_once) == (1, 0)
    assert metering.client.paid[WORKER.address] == job_cost(1500, 40, PRICE)


def test_the_verification_price_copy_has_its_own_credit_window_and_shares_the_rest():
    """``serve --verify-price``: the copy's credit window is 256 tokens at its own price (a window is tokens'
    worth); its allowances (money), chain reads, pairs and settler are the original's."""
    main = DepositMetering(client=SimpleNamespace(), ledger=SimpleNamespace(), price_per_1k=10**15)
    verify = _priced(main, 10**14)
    assert verify.max_credit_window == job_cost(0, 256, 10**14) < main.max_credit_window
    assert (verify.allowance, verify.unsecured_cap) == (main.allowance, main.unsecured_cap)
    assert verify._views is main._views and verify._pairs is main._pairs and verify.settler is main.settler
