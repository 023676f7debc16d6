"""The worker's side of payment: a meter per job.

``WorkerService`` (node/market/jobs.py) knows nothing of chains. For every request it
asks its ``Metering`` to ``admit`` it, naming the libp2p peer the request came from
(the stream's authenticated remote peer), which returns a ``JobMeter`` or raises
``PaymentRefused`` (the rejection is sent to the requester). While the job
streams, the service hands the meter every payment message the requester
sends (``take``), asks it whether the text produced so far is covered
(``covers``) and waits for credit when it is not (``wait_for_credit``). After
the job it asks the meter to ``settle`` the final amount. However the job ends
(settled, cancelled, cut off, a bad receipt, receipts fell behind), the service
then ``close``s the meter: it gives back what the job held and hands the
receipts taken to settlement.

Two meterings exist:

- ``FreeMetering`` (here): the no-op meter of a free worker (everything is covered).
- ``DepositMetering`` (node/payments/deposit_metering.py): payment from the
  requester's deposit in the ``DepositEscrow``. Before generating, it checks the
  requester bound the terms to the sending peer, reads the requester's account
  from the chain and refuses the job unless the deposit can cover it within
  this worker's bound (``node.payments.policy.deposit_problem``).
  While streaming, the requester sends cumulative receipts for the (requester,
  worker) pair; each is checked exactly as the contract will and written to the
  ledger before the worker relies on it.

The credit window. The prompt is paid first: once the worker has evaluated
the prompt it announces the prompt's exact size (a chunk with no text, see
node/market/jobs.py), and the requester signs for it, after checking the count
against a bound it computed from the prompt's bytes. From then on the worker
streams at most ``credit_window`` base units ahead of the last receipt, so a
requester that stops paying gets at most a window of text for free, and a
worker that stops streaming has been paid for at most what it sent plus the
prompt it evaluated. A window therefore only has to cover generation: any
prompt that fits the context can be paid for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import trio

from node.protocol.messages import JobRequest
from node.protocol.wire import Message


class JobMeter(Protocol):
    """One admitted job's account."""

    def covers(self, prompt_tokens: int, completion_tokens: int) -> bool:
        """Whether streaming this far is within the credit the requester has given."""

    async def take(self, message: Message) -> bool:
        """Handle a payment message from the requester; False if it is not one. Raises ``InvalidReceipt``."""

    async def wait_for_credit(self, prompt_tokens: int, completion_tokens: int) -> bool:
        """Wait until streaming this far is covered; False if the requester did not pay in time."""

    async def settle(self, prompt_tokens: int, completion_tokens: int) -> str:
        """After the job: collect the final amount for this usage. Returns a note for the job's log line."""

    def close(self) -> None:
        """The job ended, however (called once, after ``settle`` if it ran; safe to call again): give back what
        the job held and hand what was paid to settlement. Never blocks: it runs in a ``finally``."""


class Metering(Protocol):
    """Admits jobs: one meter per request."""

    price_per_1k: int

    async def admit(self, request: JobRequest, peer_id: str) -> JobMeter:
        """The meter for ``request``, sent by the libp2p peer ``peer_id``. Raises ``PaymentRefused`` with the
        reason."""


# ---------------------------------------------------------------------- free


class FreeMeter:
    def covers(self, prompt_tokens: int, completion_tokens: int) -> bool:
        return True

    async def take(self, message: Message) -> bool:
        return False

    async def wait_for_credit(self, prompt_tokens: int, completion_tokens: int) -> bool:
        return True

    async def settle(self, prompt_tokens: int, completion_tokens: int) -> str:
        return ""

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class FreeMetering:
    """A free worker: every job is admitted and nothing is owed."""

    price_per_1k: int = 0

    async def admit(self, request: JobRequest, peer_id: str = "") -> JobMeter:
        return FreeMeter()


# ------------------------------------------------------------- paid meters


class WaitsForReceipts:
    """What the paid meters share: waiting until the receipts taken cover something.

    A subclass has ``metering`` (with ``receipt_timeout_s``), a ``_changed`` event and ``covers``, and calls
    ``_receipt_taken`` after each new receipt.
    """

    metering: Any  # the job's metering: ``receipt_timeout_s``
    _changed: trio.Event

    def covers(self, prompt_tokens: int, completion_tokens: int) -> bool:
        raise NotImplementedError

    def _receipt_taken(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_until(self, covered, timeout_s: float | None = None) -> bool:
        with trio.move_on_after(self.metering.receipt_timeout_s if timeout_s is None else timeout_s):
            while not covered():
                await self._changed.wait()
            return True
        return False

    async def wait_for_credit(self, prompt_tokens: int, completion_tokens: int) -> bool:
        return await self._wait_until(lambda: self.covers(prompt_tokens, completion_tokens))
