"""Payment as its own seam: the worker's meter and the requester's payer, against fakes (no chain, no network).

Receipts are really signed (eth-account, a local key) and really checked; the
ledgers are real SQLite files; only the chain and the stream are stand-ins.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
from eth_account import Account

from node.errors import InvalidReceipt, Overcharge, PaymentRefused
from node.payments.chainio import ChainIO
from node.payments.deposit_metering import DepositMetering
from node.payments.deposit_receipts import DepositDomain
from node.payments.deposit_receipts import check_receipt as check_deposit_receipt
from node.payments.deposit_receipts import sign_receipt as sign_deposit_receipt
from node.payments.deposits import DepositAccount, PairState
from node.payments.escrow import ChannelState, ChannelStatus
from node.payments.ledger import WalletChannel, WalletLedger, WorkerLedger
from node.payments.metering import EscrowMetering, FreeMetering
from node.payments.payer import CREDIT_TOKENS, DepositPayer, FreePayer, WalletPayer
from node.payments.policy import job_cost, prompt_token_bound
from node.payments.receipts import ReceiptDomain, sign_receipt
from node.protocol.messages import (
    DepositReceipt,
    DepositTerms,
    JobChunk,
    JobDone,
    JobRequest,
    PaymentTerms,
    PayReceipt,
    ResultReceipt,
)

from .factories import MODEL, offer

PRICE = 10**15  # per 1k tokens: 10**12 base units a token
REQUESTER = Account.from_key(b"\x11" * 32)
WORKER = Account.from_key(b"\x22" * 32)
DOMAIN = ReceiptDomain(31337, "0x" + "ee" * 20)
CHANNEL = b"\x07" * 32


@dataclass
class FakeDeployment:
    chain_id: int = DOMAIN.chain_id
    escrow: str = DOMAIN.escrow


@dataclass
class FakeChain:
    """What the meter and the wallet ask of an ``EscrowClient``, with a chain of one channel per worker."""

    account: object
    deposit: int = 10**18
    open_delay_s: float = 0.0
    opened: list = field(default_factory=list)
    deployment: FakeDeployment = field(default_factory=FakeDeployment)
    domain: ReceiptDomain = DOMAIN
    io: ChainIO = field(default_factory=ChainIO)
    opening: int = 0
    most_at_once: int = 0

    def get_channel(self, channel_id: bytes) -> ChannelState:
        return ChannelState(channel_id, REQUESTER.address, WORKER.address, self.deposit, 0, int(time.time()) + 86_400,
                            ChannelStatus.OPEN)  # fmt: skip

    def chain_time(self) -> int:
        return int(time.time())

    def open_channel(self, worker: str, amount: int, expiry: int, *, permit: bool = False) -> bytes:
        self.opening += 1
        self.most_at_once = max(self.most_at_once, self.opening)
        time.sleep(self.open_delay_s)  # a transaction being mined on a slow chain
        channel_id = len(self.opened).to_bytes(32, "big")
        self.opened.append((worker, amount))
        self.opening -= 1
        return channel_id

    def sign_receipt(self, channel_id: bytes, amount: int) -> bytes:
        return sign_receipt(REQUESTER, DOMAIN, channel_id, amount)


class FakeSettler:
    def __init__(self) -> None:
        self.jobs: list[bytes] = []

    def job_done(self, channel_id: bytes) -> None:
        self.jobs.append(channel_id)


def paid_request(prompt: str = "hi", max_tokens: int = 100, window: int = 64 * 10**12) -> JobRequest:
    terms = PaymentTerms(CHANNEL, DOMAIN.chain_id, DOMAIN.escrow, PRICE, str(window))
    return JobRequest("job", MODEL, {"max_tokens": max_tokens}, prompt=prompt, payment=terms)


def metering(tmp_path, **changes) -> EscrowMetering:
    fields = dict(max_credit_window=10**18, receipt_timeout_s=0.5) | changes
    return EscrowMetering(FakeChain(WORKER), WorkerLedger(tmp_path / "worker.db"), FakeSettler(), PRICE, **fields)


def receipt(amount: int, job_id: str = "job", signer=REQUESTER) -> PayReceipt:
    return PayReceipt(job_id, str(amount), sign_receipt(signer, DOMAIN, CHANNEL, amount))


# ------------------------------------------------------------------ the meter


async def test_the_free_meter_covers_everything_and_takes_nothing():
    meter = await FreeMetering().admit(JobRequest("job", MODEL, {}, prompt="x"))
    assert meter.covers(10**6, 10**6) and await meter.wait_for_credit(10**6, 10**6)
    assert not await meter.take(receipt(5))
    assert await meter.settle(1, 1) == ""


async def test_a_meter_streams_only_within_the_window_of_what_was_receipted(tmp_path):
    meter = await metering(tmp_path).admit(paid_request(window=job_cost(0, 64, PRICE)))
    assert meter.covers(0, 64) and not meter.covers(0, 65)
    assert not meter.covers(1500, 1)  # a long prompt is never within the window on its own…
    assert await meter.take(receipt(job_cost(1500, 0, PRICE)))  # …until the requester pays for it
    assert meter.covers(1500, 64) and not meter.covers(1500, 65)
    assert meter.metering.ledger.get(CHANNEL).receipted == job_cost(1500, 0, PRICE)  # persisted before use


async def test_a_meter_refuses_bad_receipts(tmp_path):
    meter = await metering(tmp_path).admit(paid_request())
    with pytest.raises(InvalidReceipt, match="not the requester"):
        await meter.take(receipt(100, signer=WORKER))
    with pytest.raises(InvalidReceipt, match="exceeds the channel's deposit"):
        await meter.take(receipt(2 * 10**18))
    with pytest.raises(InvalidReceipt, match="not a number"):
        await meter.take(PayReceipt("job", "lots", b""))
    assert not await meter.take(receipt(100, job_id="another job"))
    assert meter.metering.ledger.get(CHANNEL) is None


async def test_a_meter_waits_for_credit_and_gives_up_after_the_timeout(tmp_path):
    meter = await metering(tmp_path).admit(paid_request(window=job_cost(0, 64, PRICE)))
    async with trio.open_nursery() as nursery:

        async def pay_soon():
            await trio.sleep(0.05)
            await meter.take(receipt(job_cost(700, 0, PRICE)))

        nursery.start_soon(pay_soon)
        assert await meter.wait_for_credit(700, 1)
    assert not await meter.wait_for_credit(700, 500)  # nobody pays for that much: False after receipt_timeout_s


async def test_settling_waits_for_the_exact_final_amount_and_tells_the_settler(tmp_path):
    meter = await metering(tmp_path).admit(paid_request())
    final = job_cost(40, 10, PRICE)
    await meter.take(receipt(final - 1))
    assert await meter.settle(40, 10) == "final receipt missing"
    await meter.take(receipt(final))
    assert await meter.settle(40, 10) == "paid"
    assert meter.metering.settler.jobs == [CHANNEL, CHANNEL]


async def test_admission_refuses_a_channel_that_cannot_pay_the_worst_case(tmp_path):
    meters = metering(tmp_path)
    meters.client.deposit = job_cost(prompt_token_bound(paid_request()), 100, PRICE) - 1
    with pytest.raises(PaymentRefused, match="base units left"):
        await meters.admit(paid_request())
    with pytest.raises(PaymentRefused, match="send payment terms"):
        await meters.admit(JobRequest("job", MODEL, {}, prompt="x"))


# ------------------------------------------------------------------ the payer


class FakeWallet:
    """A ``Wallet`` on a ``FakeChain``: a real ledger, channels opened (slowly, if asked) on the fake chain."""

    def __init__(self, tmp_path, open_delay_s: float = 0.0) -> None:
        self.client = FakeChain(REQUESTER, open_delay_s=open_delay_s)
        self.ledger = WalletLedger(tmp_path / "wallet.db")
        self.threads: set[str] = set()

    def reusable_channel(self, worker, needed, *, exclude=frozenset()):
        self.threads.add(threading.current_thread().name)
        for channel in self.ledger.channels(status="open"):
            if channel.worker == worker and channel.channel_id not in exclude and channel.unsigned >= needed:
                return channel
        return None

    def open_channel(self, worker, needed, *, peer_id=""):
        self.threads.add(threading.current_thread().name)
        channel_id = self.client.open_channel(worker, needed * 11, 0)
        channel = WalletChannel(
            channel_id, DOMAIN.chain_id, DOMAIN.escrow, worker, needed * 11, 0, 10**10, "open", peer_id
        )
        self.ledger.add(channel)
        return channel

    def sign(self, channel_id, cumulative):
        amount = self.ledger.reserve(channel_id, cumulative)
        return amount, self.client.sign_receipt(channel_id, amount)


def paid_offer(peer: str = "12D3KooWpaid", slots: int = 1, payee: str = WORKER.address):
    return offer(peer, price_per_1k=PRICE, chain_id=DOMAIN.chain_id, escrow=DOMAIN.escrow, payee=payee,
                 slots_total=slots)  # fmt: skip


def done(prompt_tokens: int, completion_tokens: int) -> JobDone:
    return JobDone("job", "stop", ResultReceipt("job", MODEL, b"", b"", prompt_tokens, completion_tokens, "w"))


async def test_the_free_payer_attaches_nothing_and_signs_nothing():
    request = JobRequest("job", MODEL, {"max_tokens": 5}, prompt="x")
    async with FreePayer().pay(paid_offer(), request) as payment:
        assert payment.request is request
        await payment.on_chunk(None, JobChunk("job", "text", 1, 3))
        await payment.on_done(None, done(3, 1))
        assert payment.spent == 0


async def test_a_paid_attempt_pays_the_announced_prompt_then_text_as_it_arrives_then_exactly_the_usage(tmp_path):
    wallet = FakeWallet(tmp_path)
    sent: list[PayReceipt] = []

    async def send(message):
        sent.append(message)

    prompt = "word " * 1500  # about 1,500 tokens: far over the credit window
    request = JobRequest("job", MODEL, {"max_tokens": 100}, prompt=prompt)
    async with WalletPayer(wallet).pay(paid_offer(), request) as payment:
        assert payment.request.payment.price_per_1k == PRICE
        assert int(payment.request.payment.credit_window) == job_cost(0, CREDIT_TOKENS, PRICE)
        await payment.on_chunk(send, JobChunk("job", "", 0, 1503))  # the worker announces the prompt
        assert [int(r.cumulative) for r in sent] == [job_cost(1503, 0, PRICE)]
        for _ in range(CREDIT_TOKENS // 2 - 1):  # less than half a window of text: no new receipt yet
            await payment.on_chunk(send, JobChunk("job", "w", 1, 1503))
        assert len(sent) == 1
        await payment.on_chunk(send, JobChunk("job", "w", 1, 1503))
        assert int(sent[-1].cumulative) == job_cost(1503, CREDIT_TOKENS // 2, PRICE)
        await payment.on_done(send, done(1503, 40))
        assert int(sent[-1].cumulative) == job_cost(1503, 40, PRICE) == payment.spent


async def test_a_worker_that_claims_more_than_the_prompt_can_have_is_caught(tmp_path):
    request = JobRequest("job", MODEL, {"max_tokens": 10}, prompt="short")
    async with WalletPayer(FakeWallet(tmp_path)).pay(paid_offer(), request) as payment:
        bound = prompt_token_bound(request)
        with pytest.raises(Overcharge, match="prompt tokens"):
            await payment.on_chunk(None, JobChunk("job", "", 0, bound + 1))
        with pytest.raises(Overcharge, match="more than max_tokens"):
            await payment.on_done(None, done(3, 11))
        assert payment.spent == 0


async def test_a_channel_carries_one_job_at_a_time_up_to_the_workers_slots(tmp_path):
    wallet = FakeWallet(tmp_path)
    payer = WalletPayer(wallet)
    request = JobRequest("job", MODEL, {"max_tokens": 10}, prompt="x")
    two_slots = paid_offer(slots=2)
    async with payer.pay(two_slots, request) as first, payer.pay(two_slots, request) as second:
        assert first.channel_id != second.channel_id
        async with payer.pay(two_slots, request) as third:
            assert third is None  # both slots are in use by our own jobs
    async with payer.pay(two_slots, request) as again:
        assert again.channel_id in (first.channel_id, second.channel_id)  # leases were given back
    assert len(wallet.client.opened) == 2
    assert wallet.threads and "MainThread" not in wallet.threads  # chain calls ran off the event loop


async def test_opening_a_channel_on_a_slow_chain_never_stalls_the_event_loop(tmp_path):
    """One job opens a channel on a chain that takes 2 s; the loop keeps ticking every few ms meanwhile."""
    wallet = FakeWallet(tmp_path, open_delay_s=2.0)
    payer = WalletPayer(wallet)
    request = JobRequest("job", MODEL, {"max_tokens": 10}, prompt="x")
    lateness: list[float] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:

            async def heartbeat():
                while True:
                    before = trio.current_time()
                    await trio.sleep(0.01)
                    lateness.append(trio.current_time() - before - 0.01)

            nursery.start_soon(heartbeat)
            async with payer.pay(paid_offer("12D3KooWslow", payee=REQUESTER.address), request) as payment:
                assert payment is not None
            nursery.cancel_scope.cancel()
    assert len(lateness) > 50 and max(lateness) < 0.1


async def test_channels_are_opened_one_at_a_time(tmp_path):
    """Each opening uses the account's next permit nonce: two at once clashed (402 ERC20InsufficientAllowance)."""
    wallet = FakeWallet(tmp_path, open_delay_s=0.2)
    payer = WalletPayer(wallet)
    request = JobRequest("job", MODEL, {"max_tokens": 10}, prompt="x")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(4):

                async def job(peer=f"12D3KooW{i}", payee="0x" + f"{i + 1:040x}"):
                    async with payer.pay(paid_offer(peer, payee=payee), request) as payment:
                        assert payment is not None

                nursery.start_soon(job)
    assert len(wallet.client.opened) == 4 and wallet.client.most_at_once == 1


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


@pytest.fixture(params=["channel", "deposit"])
def scheme(request) -> str:
    """Both payers share the checked-usage code (``CheckedPayment``): every billing test runs on each."""
    return request.param


@asynccontextmanager
async def checked_payment(tmp_path, prompt_words: int = 300, max_tokens: int = 200, *, scheme: str = "channel"):
    from node.payments.usage import CheckedUsage

    async def usage(offer, request):
        return CheckedUsage(FakeTokenizer(), FakeTokenizer().count_sync(request))

    sent: list[PayReceipt] = []

    async def send(message):
        sent.append(message)

    request = JobRequest("job", MODEL, {"max_tokens": max_tokens}, prompt="word " * prompt_words)
    if scheme == "channel":
        payer = WalletPayer(FakeWallet(tmp_path), usage=usage)
    else:
        payer = DepositPayer(FakeDeposits(REQUESTER), WalletLedger(tmp_path / "wallet.db"), usage=usage)
    async with payer.pay(paid_offer(), request) as payment:
        yield payment, send, sent


async def test_with_the_tokenizer_an_honest_answer_is_paid_exactly_as_its_records_arrive(tmp_path, scheme):
    async with checked_payment(tmp_path, scheme=scheme) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        assert int(sent[-1].cumulative) == job_cost(300, 0, PRICE)
        answer = "a plain answer, " * 8
        for i in range(0, len(answer), 4):
            await payment.on_chunk(send, chunk(answer[i : i + 4], 300))
        assert int(sent[-1].cumulative) <= job_cost(300, len(answer), PRICE)
        await payment.on_done(send, checked_done(answer, 300))
        assert int(sent[-1].cumulative) == job_cost(300, len(answer), PRICE) == payment.spent


@pytest.mark.parametrize("claimed", [301, 390, 2_000])  # one more, 30% more, and what the byte bound allowed
async def test_a_worker_claiming_more_prompt_tokens_is_paid_the_true_count_and_dropped(tmp_path, claimed, scheme):
    async with checked_payment(tmp_path, scheme=scheme) as (payment, send, sent):
        with pytest.raises(Overcharge, match=f"claims {claimed} prompt tokens; the model's tokenizer gives 300"):
            await payment.on_chunk(send, chunk("", claimed))
        assert payment.spent == job_cost(300, 0, PRICE)


async def test_a_chunk_billing_more_tokens_than_its_records_is_paid_only_its_records(tmp_path, scheme):
    async with checked_payment(tmp_path, scheme=scheme) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        await payment.on_chunk(send, chunk("honest", 300))
        with pytest.raises(Overcharge, match="bills 13 tokens with 10 fingerprint records") as caught:
            await payment.on_chunk(send, chunk(" text more", 300, tokens=13))  # 30% more
        assert payment.spent == job_cost(300, 6, PRICE)
        assert caught.value.kept == ("honest", 6)


async def test_an_answer_that_goes_on_after_end_of_generation_is_paid_up_to_it(tmp_path, scheme):
    async with checked_payment(tmp_path, scheme=scheme) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        await payment.on_chunk(send, chunk("The answer", 300))
        with pytest.raises(Overcharge, match="goes on after the model's end-of-generation") as caught:
            await payment.on_chunk(send, chunk(" is 4.", 300, eog_after=" And then some padding"))
        assert caught.value.kept == ("The answer is 4.", 16)
        assert payment.spent == job_cost(300, 16, PRICE)


async def test_a_final_receipt_that_bills_more_than_its_records_is_paid_for_the_records(tmp_path, scheme):
    async with checked_payment(tmp_path, scheme=scheme) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        await payment.on_chunk(send, chunk("forty characters of a well-made answer..", 300))
        with pytest.raises(Overcharge, match="bills 52 completion tokens; its records hold 40"):
            await payment.on_done(send, checked_done("forty characters of a well-made answer..", 300, 52))
        assert payment.spent == job_cost(300, 40, PRICE)
        with pytest.raises(Overcharge, match="claims 301 prompt tokens"):
            await payment.on_done(send, checked_done("forty characters of a well-made answer..", 301))
        assert payment.spent == job_cost(300, 40, PRICE)


async def test_text_that_the_records_do_not_spell_is_not_paid(tmp_path, scheme):
    async with checked_payment(tmp_path, scheme=scheme) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        forged = JobChunk("job", "other words", 11, 300, [], records("eleven char"))
        with pytest.raises(Overcharge, match="not what the records' tokens spell"):
            await payment.on_chunk(send, forged)
        assert payment.spent == job_cost(300, 0, PRICE)


async def test_false_finish_reasons_are_refused(tmp_path, scheme):
    async with checked_payment(tmp_path, max_tokens=200, scheme=scheme) as (payment, send, sent):
        await payment.on_chunk(send, chunk("", 300))
        await payment.on_chunk(send, chunk("cut short", 300))
        with pytest.raises(Overcharge, match="finish 'length' after 9 of max_tokens 200"):
            await payment.on_done(send, checked_done("cut short", 300, eog=False))
        assert payment.spent == job_cost(300, 9, PRICE)


# --------------------------------------------------------- the deposit scheme (DepositEscrow), against fakes

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

    def account_of(self, requester: str) -> DepositAccount:
        self.reads += 1
        return self.state

    def pair_of(self, requester: str, worker: str) -> PairState:
        return PairState(self.paid.get(worker, 0), 0, False)

    def guarantee_of(self, requester: str, worker: str) -> int:
        return 0

    def sign_receipt(self, worker: str, cumulative: int) -> bytes:
        return sign_deposit_receipt(self.account, DEPOSITS, worker, cumulative)

    def claim_batch(self, claims) -> dict:
        self.batches.append(list(claims))
        for requester, cumulative, signature in claims:
            check_deposit_receipt(DEPOSITS, requester, self.account.address, cumulative, signature)
            owed = min(cumulative - self.paid.get(self.account.address, 0), self.state.deposit)
            self.paid[self.account.address] = self.paid.get(self.account.address, 0) + max(owed, 0)
            self.state = dataclasses.replace(self.state, deposit=self.state.deposit - max(owed, 0))
        return {}


def deposit_request(job_id: str = "job", max_tokens: int = 100, window: int = 64 * 10**12, **terms) -> JobRequest:
    fields = dict(requester=REQUESTER.address, chain_id=DEPOSITS.chain_id, escrow=DEPOSITS.escrow,
                  price_per_1k=PRICE, credit_window=str(window)) | terms  # fmt: skip
    return JobRequest(job_id, MODEL, {"max_tokens": max_tokens}, prompt="hi", payment=DepositTerms(**fields))


def deposit_metering(tmp_path, **changes) -> DepositMetering:
    fields = dict(max_credit_window=10**18, receipt_timeout_s=0.5) | changes
    return DepositMetering(FakeDeposits(WORKER), WorkerLedger(tmp_path / "worker.db"), PRICE, **fields)


def deposit_receipt(cumulative: int, job_amount: int, job_id: str = "job", signer=REQUESTER, worker=WORKER):
    signature = sign_deposit_receipt(signer, DEPOSITS, worker.address, cumulative)
    return DepositReceipt(job_id, str(cumulative), str(job_amount), signature)


async def test_a_deposit_meter_credits_each_job_its_part_of_the_pairs_receipts_in_any_order(tmp_path):
    """Two concurrent jobs: the requester allocated A 100 (total 100), then B 50 (total 150), then A 30 more
    (total 180). B's receipt comes first, A's second receipt before its first."""
    metering = deposit_metering(tmp_path)
    a = await metering.admit(deposit_request("a"))
    b = await metering.admit(deposit_request("b"))
    assert await b.take(deposit_receipt(150, 50, "b"))
    assert await a.take(deposit_receipt(180, 130, "a"))
    assert await a.take(deposit_receipt(100, 100, "a"))  # older: nothing new
    assert (a.credited, b.credited) == (130, 50)
    held = metering.ledger.get_pair(DEPOSITS.chain_id, DEPOSITS.escrow, REQUESTER.address)
    assert (held.best, held.credited) == (180, 180)  # persisted before use; credits add up to the best receipt
    assert not await a.take(deposit_receipt(200, 150, "b"))  # another job's receipt is not this meter's


async def test_a_deposit_meter_refuses_receipts_that_do_not_back_the_credit(tmp_path):
    metering = deposit_metering(tmp_path)
    a = await metering.admit(deposit_request("a"))
    b = await metering.admit(deposit_request("b"))
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
    first = await metering.admit(deposit_request("a"))
    second = await metering.admit(deposit_request("b"))  # held: a running job
    with pytest.raises(PaymentRefused, match="exposure to the requester would pass its bound"):
        await metering.admit(deposit_request("c"))  # two worst cases reserved: the allowance is full
    await first.take(deposit_receipt(worst, worst, "a"))
    assert await first.settle(prompt_token_bound(deposit_request()), 100) == "paid"
    with pytest.raises(PaymentRefused, match="exposure"):  # a finished job's receipt is owed until claimed
        await metering.admit(deposit_request("c"))
    assert await trio.to_thread.run_sync(metering.settler.settle_once) == (1, 0)
    assert second.credited == 0
    await metering.admit(deposit_request("c"))  # claimed: room again
    metering.client.state = dataclasses.replace(metering.client.state, deposit=worst - 1)
    with pytest.raises(PaymentRefused, match="cannot cover"):
        await metering.admit(deposit_request("d"))
    metering.client.state = dataclasses.replace(metering.client.state, deposit=10**18, unlock_at=12_345)
    with pytest.raises(PaymentRefused, match="unlocking"):
        await metering.admit(deposit_request("d"))
    for terms, reason in [
        (dict(escrow="0x" + "ee" * 20), "deposit escrow"),
        (dict(price_per_1k=PRICE - 1), "offered"),
        (dict(requester="nobody"), "not an address"),
    ]:
        with pytest.raises(PaymentRefused, match=reason):
            await metering.admit(deposit_request("e", **terms))
    with pytest.raises(PaymentRefused, match="not channels"):
        await metering.admit(paid_request())
    with pytest.raises(PaymentRefused, match="not the deposit scheme"):
        await metering_for_channels(tmp_path).admit(deposit_request())


def metering_for_channels(tmp_path) -> EscrowMetering:
    return metering(tmp_path / "channels")


async def test_a_cancelled_job_frees_its_reservation(tmp_path):
    metering = deposit_metering(tmp_path)
    worst = job_cost(prompt_token_bound(deposit_request()), 100, PRICE)
    metering.allowance = worst
    meter = await metering.admit(deposit_request("a"))
    with pytest.raises(PaymentRefused, match="exposure"):
        await metering.admit(deposit_request("b"))
    del meter  # the job service drops its meter when the job ends, settled or not
    gc.collect()
    assert await metering.admit(deposit_request("b"))


async def test_chain_reads_are_cached_per_requester(tmp_path):
    metering = deposit_metering(tmp_path)
    for job in "abc":
        await metering.admit(deposit_request(job))
    assert metering.client.reads == 1
    metering.forget(REQUESTER.address)  # an event named the requester
    await metering.admit(deposit_request("d"))
    assert metering.client.reads == 2


def deposit_payer(tmp_path, **changes) -> DepositPayer:
    return DepositPayer(FakeDeposits(REQUESTER), WalletLedger(tmp_path / "wallet.db"), **changes)


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
        meter = await metering.admit(payment.request)

        async def send(message):
            assert await meter.take(message)

        await payment.on_chunk(send, JobChunk("job", "", 0, 1500))
        assert meter.covers(1500, 1)
        await payment.on_done(send, done(1500, 40))
        assert await meter.settle(1500, 40) == "paid"
    assert await trio.to_thread.run_sync(metering.settler.settle_once) == (1, 0)
    assert metering.client.paid[WORKER.address] == job_cost(1500, 40, PRICE)
