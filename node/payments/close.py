"""Closing a channel on its requester's request (``/llmarket/pay/1.0.0``).

A requester that is done with a worker signs "llmarket close 0x<channel id>"
(EIP-191) and sends it in a ``CloseRequest``. The worker checks the signer is
the channel's requester, closes the channel on chain with the highest receipt
it holds (the contract pays the worker and returns the rest), and answers
``Closed`` with both amounts, or ``CloseRefused`` with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from eth_account import Account
from eth_account.messages import encode_defunct

from node.errors import PaymentError, PaymentRefused, PeerUnreachable, WireError
from node.payments.ledger import WorkerLedger
from node.protocol.messages import Closed, CloseRefused, CloseRequest
from node.protocol.wire import receive, receive_as, send

if TYPE_CHECKING:
    from node.payments.escrow import EscrowClient

log = logging.getLogger(__name__)

PAY_PROTOCOL = "/llmarket/pay/1.0.0"
CLOSE_TIMEOUT_S = 120.0  # an on-chain transaction


def close_text(channel_id: bytes) -> str:
    return f"llmarket close 0x{channel_id.hex()}"


def sign_close(account, channel_id: bytes) -> bytes:
    """The requester's request to close ``channel_id`` (EIP-191)."""
    return bytes(account.sign_message(encode_defunct(text=close_text(channel_id))).signature)


@dataclass
class CloseService:
    """The worker's side: close channels on their requester's request."""

    client: EscrowClient  # with the worker's key
    ledger: WorkerLedger

    def install(self, host) -> None:
        host.set_handler(PAY_PROTOCOL, self.handle)

    async def handle(self, stream) -> None:
        with trio.fail_after(10):
            request = await receive_as(stream, CloseRequest)
        try:
            paid, returned = await self.client.io(self.close, request.channel_id, request.signature)
        except PaymentRefused as err:
            await send(stream, CloseRefused(request.channel_id, str(err)))
        else:
            await send(stream, Closed(request.channel_id, str(paid), str(returned)))
        await stream.close()

    def close(self, channel_id: bytes, signature: bytes) -> tuple[int, int]:
        """Close on chain (blocking); returns (paid to the worker in all, returned to the requester)."""
        try:
            channel = self.client.get_channel(channel_id)
            signer = Account.recover_message(encode_defunct(text=close_text(channel_id)), signature=signature)
        except Exception as err:  # an unknown channel or a malformed signature
            raise PaymentRefused(f"cannot close: {err}") from None
        if signer.lower() != channel.requester.lower():
            raise PaymentRefused("only the channel's requester may ask to close it")
        held = self.ledger.get(channel_id)
        amount, receipt = (
            (held.receipted, held.signature) if held and held.receipted > channel.paid else (channel.paid, b"")
        )
        try:
            self.client.close(channel_id, amount, receipt or b"")
        except PaymentError as err:
            raise PaymentRefused(f"close failed on chain: {err}") from None
        if held:
            self.ledger.mark_claimed(channel_id, amount, closed=True)
        log.info("closed channel 0x%s… on its requester's request: %d paid", channel_id.hex()[:12], amount)
        return amount, channel.deposit - amount


async def ask_to_close(host, peer_id: str, addrs: list[str], account, channel_id: bytes) -> tuple[int, int]:
    """The requester's side: ask the worker at ``peer_id`` to close ``channel_id``.

    Returns (paid to the worker, returned to us).

    Raises:
        PaymentError: the worker refused, or could not be reached.
    """
    try:
        stream = await host.open_stream(peer_id, PAY_PROTOCOL, addrs)
    except PeerUnreachable as err:
        raise PaymentError(f"cannot reach the worker to close 0x{channel_id.hex()[:12]}…: {err}") from None
    try:
        await send(stream, CloseRequest(channel_id, sign_close(account, channel_id)))
        with trio.fail_after(CLOSE_TIMEOUT_S):
            reply = await receive(stream)
    except (EOFError, ConnectionError, WireError, trio.TooSlowError) as err:
        raise PaymentError(f"the worker did not answer the close request ({err!r})") from None
    finally:
        await stream.close()
    if not isinstance(reply, Closed):
        raise PaymentError(f"the worker refused to close: {getattr(reply, 'detail', reply.TYPE)}")
    return int(reply.paid), int(reply.returned)
