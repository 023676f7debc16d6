"""Paid jobs on the worker's side: checking the channel, and streaming only against receipts.

Before generating, the worker reads the channel from the chain and refuses it
unless it is open, pays this worker, leaves time to claim, and has the job's
worst case left (``node.payments.policy.channel_problem``). While streaming,
the requester sends cumulative receipts; each one is verified exactly as the
contract will (signature of the channel's requester, this chain and escrow, not
below the last one, within the deposit) and written to the ledger before the
worker relies on it. The worker runs at most ``credit_window`` base units ahead
of the last receipt: past that it pauses, and stops if no receipt comes within
``receipt_timeout_s``. After the job it waits briefly for the final receipt
(exactly the job's cost) and tells the settler a job was paid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from node.errors import InvalidReceipt, PaymentError
from node.messages import JobRequest, PayReceipt
from node.payments.escrow import ChannelState, EscrowClient
from node.payments.ledger import WorkerLedger
from node.payments.policy import channel_problem, job_cost, worst_case_cost
from node.payments.receipts import verify_receipt
from node.payments.settlement import Settler

PROMPT_TOKEN_OVERHEAD = 64  # chat-template tokens, on top of one token per prompt byte at most


def prompt_token_bound(request: JobRequest) -> int:
    """An upper bound on the prompt's tokens (a BPE token covers at least one byte), known before tokenizing."""
    text = request.prompt or "".join(m.get("role", "") + m.get("content", "") for m in request.messages or [])
    return len((text + request.resume_text).encode()) + PROMPT_TOKEN_OVERHEAD


@dataclass
class WorkerPayments:
    """What a paid worker needs: its chain client (its own key), ledger and settler."""

    client: EscrowClient
    ledger: WorkerLedger
    settler: Settler
    max_credit_window: int  # the most a requester may ask this worker to stream ahead of receipts
    min_time_left_s: float = 1800.0  # a channel must outlive this to be served (claims need time)
    receipt_timeout_s: float = 10.0

    @property
    def payee(self) -> str:
        return self.client.account.address


class PaymentRefused(Exception):
    """The request's payment terms are not acceptable; the message is the rejection detail."""


@dataclass
class Billing:
    """One paid job's account: what it costs so far, and what the requester has receipted."""

    payments: WorkerPayments
    request: JobRequest
    channel: ChannelState
    price: int
    window: int
    base: int  # what was owed on the channel before this job
    receipted: int  # the highest receipt held (cumulative, whole channel)
    changed: trio.Event = field(default_factory=trio.Event)

    @classmethod
    async def open(cls, payments: WorkerPayments, request: JobRequest, price: int) -> Billing:
        """Check the request's channel on chain. Raises ``PaymentRefused`` with the reason."""
        terms = request.payment
        deployment = payments.client.deployment
        if terms is None:
            raise PaymentRefused(f"this worker charges {price} per 1k tokens: send payment terms (a channel)")
        if terms.chain_id != deployment.chain_id or terms.escrow.lower() != deployment.escrow.lower():
            raise PaymentRefused(f"this worker is paid on chain {deployment.chain_id}, escrow {deployment.escrow}")
        if terms.price_per_1k < price:
            raise PaymentRefused(f"price is {price} per 1k tokens, offered {terms.price_per_1k}")
        try:
            window = min(int(terms.credit_window), payments.max_credit_window)
            channel = await trio.to_thread.run_sync(payments.client.get_channel, terms.channel_id)
            now = await trio.to_thread.run_sync(payments.client.chain_time)
        except (ValueError, PaymentError) as err:
            raise PaymentRefused(f"cannot check the channel: {err}") from None
        held = await trio.to_thread.run_sync(payments.ledger.get, terms.channel_id)
        receipted = max(held.receipted if held else 0, channel.paid)
        needed = worst_case_cost(prompt_token_bound(request), int(request.params.get("max_tokens", 256)), price)
        problem = channel_problem(
            channel,
            payee=payments.payee,
            now=now,
            min_time_left_s=payments.min_time_left_s,
            signed_total=receipted,
            needed=needed,
        )
        if problem:
            raise PaymentRefused(problem)
        return cls(payments, request, channel, price, max(window, 1), receipted, receipted)

    def owed(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The channel's cumulative amount if this job stopped now."""
        return self.base + job_cost(prompt_tokens, completion_tokens, self.price)

    def within_credit(self, prompt_tokens: int, completion_tokens: int) -> bool:
        return self.owed(prompt_tokens, completion_tokens) - self.receipted <= self.window

    async def accept(self, receipt: PayReceipt) -> None:
        """Verify a receipt as the contract would and persist it. Raises ``InvalidReceipt``."""
        try:
            amount = int(receipt.cumulative)
        except ValueError:
            raise InvalidReceipt(f"receipt amount {receipt.cumulative!r} is not a number") from None
        if amount <= self.receipted:
            return  # nothing new (or a replay)
        if amount > self.channel.deposit:
            raise InvalidReceipt(f"receipt for {amount} exceeds the deposit {self.channel.deposit}")
        client = self.payments.client
        verify_receipt(client.domain, self.channel.channel_id, amount, receipt.signature, self.channel.requester)
        await trio.to_thread.run_sync(
            lambda: self.payments.ledger.record_receipt(
                self.channel.channel_id, amount, receipt.signature,
                chain_id=client.deployment.chain_id, escrow=client.deployment.escrow,
                requester=self.channel.requester, expiry=self.channel.expiry,
            )
        )  # fmt: skip
        self.receipted = amount
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for_credit(self, prompt_tokens: int, completion_tokens: int) -> bool:
        """Wait until the requester's receipts cover streaming this far; False if they did not in time."""
        with trio.move_on_after(self.payments.receipt_timeout_s):
            while not self.within_credit(prompt_tokens, completion_tokens):
                await self.changed.wait()
            return True
        return False

    async def wait_for_final(self, amount: int) -> bool:
        """Wait (briefly) for a receipt of at least ``amount``."""
        with trio.move_on_after(self.payments.receipt_timeout_s):
            while self.receipted < amount:
                await self.changed.wait()
            return True
        return False

    def done(self) -> None:
        self.payments.settler.job_done(self.channel.channel_id)


# ------------------------------------------------------------ closing channels

PAY_PROTOCOL = "/llmarket/pay/1.0.0"


def close_text(channel_id: bytes) -> str:
    return f"llmarket close 0x{channel_id.hex()}"


def sign_close(account, channel_id: bytes) -> bytes:
    """The requester's request to close ``channel_id`` (EIP-191)."""
    from eth_account.messages import encode_defunct

    return bytes(account.sign_message(encode_defunct(text=close_text(channel_id))).signature)


@dataclass
class CloseService:
    """Close channels on their requester's request: claim the last receipt, return the rest on chain."""

    payments: WorkerPayments

    def install(self, host) -> None:
        host.set_handler(PAY_PROTOCOL, self.handle)

    async def handle(self, stream) -> None:
        from node.messages import Closed, CloseRefused, CloseRequest
        from node.wire import receive_as, send

        with trio.fail_after(10):
            request = await receive_as(stream, CloseRequest)
        try:
            paid, returned = await trio.to_thread.run_sync(self.close, request.channel_id, request.signature)
        except PaymentRefused as err:
            await send(stream, CloseRefused(request.channel_id, str(err)))
        else:
            await send(stream, Closed(request.channel_id, str(paid), str(returned)))
        await stream.close()

    def close(self, channel_id: bytes, signature: bytes) -> tuple[int, int]:
        """Close on chain (blocking); returns (paid to the worker in all, returned to the requester)."""
        from eth_account import Account
        from eth_account.messages import encode_defunct

        client, ledger = self.payments.client, self.payments.ledger
        try:
            channel = client.get_channel(channel_id)
            signer = Account.recover_message(encode_defunct(text=close_text(channel_id)), signature=signature)
        except Exception as err:  # an unknown channel or a malformed signature
            raise PaymentRefused(f"cannot close: {err}") from None
        if signer.lower() != channel.requester.lower():
            raise PaymentRefused("only the channel's requester may ask to close it")
        held = ledger.get(channel_id)
        amount, receipt = (
            (held.receipted, held.signature) if held and held.receipted > channel.paid else (channel.paid, b"")
        )
        try:
            client.close(channel_id, amount, receipt or b"")
        except PaymentError as err:
            raise PaymentRefused(f"close failed on chain: {err}") from None
        if held:
            ledger.mark_claimed(channel_id, amount, closed=True)
        return amount, channel.deposit - amount


async def ask_to_close(host, peer_id: str, addrs: list[str], account, channel_id: bytes) -> tuple[int, int]:
    """Ask the worker at ``peer_id`` to close ``channel_id``; returns (paid to it, returned to us).

    Raises:
        PaymentError: the worker refused, or could not be reached.
    """
    from node.host import PeerUnreachable
    from node.messages import Closed, CloseRequest
    from node.wire import receive, send

    try:
        stream = await host.open_stream(peer_id, PAY_PROTOCOL, addrs)
    except PeerUnreachable as err:
        raise PaymentError(f"cannot reach the worker to close 0x{channel_id.hex()[:12]}…: {err}") from None
    try:
        await send(stream, CloseRequest(channel_id, sign_close(account, channel_id)))
        with trio.fail_after(120):  # an on-chain transaction
            reply = await receive(stream)
    except (EOFError, ConnectionError, trio.TooSlowError) as err:
        raise PaymentError(f"the worker did not answer the close request ({err!r})") from None
    finally:
        await stream.close()
    if not isinstance(reply, Closed):
        raise PaymentError(f"the worker refused to close: {getattr(reply, 'detail', reply.TYPE)}")
    return int(reply.paid), int(reply.returned)
