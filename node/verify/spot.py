"""Spot checks: hiring another worker to check a job's answer, over ``/llmarket/verify/1.0.0``.

The requester sends the verifier a ``JobRequest`` whose ``check`` holds the
answer (``verification_request``); the verifier re-runs it on its own engine
(node/verify/local.py's ``CheckingEngine``) and answers with a signed verdict
(node/verify/judge.py's ``verdict_text``), paid like any job at its
``verify_price_per_1k``.

Finding a checker (``spot_check``): every other worker that offers the model
is a candidate, ordered as routing orders workers (node/market/routing.py's
``rank``, with the worker's claimed numerics as the query's class, so that
verifiers that can check it exactly come first). An offer can outlive its
worker by its time to live, so a candidate we are not connected to is first
confirmed: dialled, ``CONFIRM_BATCH`` at a time and each within ``CONFIRM_S``,
before it is tried. Candidates are tried in order until one returns a verdict;
when none does, ``NoChecker`` names each one tried and why it failed. A
candidate that cannot be reached or fails counts against its reputation (a
short backoff ban), so the next check skips it.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from node.errors import JobFailed, PeerUnreachable
from node.market.jobs import VERIFY_PROTOCOL
from node.market.requester import Timeouts, attempt
from node.market.routing import Reputation, RouteQuery, rank
from node.payments.payer import FreePayer, Payer
from node.protocol.messages import CheckTask, JobRequest, Offer, SignedVerdict
from node.verify.judge import Verdict, describe, read_verdict

log = logging.getLogger(__name__)

#: How long a candidate verifier we are not connected to may take to answer a dial.
CONFIRM_S = 5.0
#: How many candidates are confirmed at once (each batch only when the ones before it failed).
CONFIRM_BATCH = 4


class NoChecker(JobFailed):
    """No other worker could check an answer: none offers the model, or every one tried failed (named)."""


@dataclass(frozen=True)
class SpotCheck:
    """Another worker's signed verdict on a job's answer, and what it cost."""

    verdict: Verdict
    signed: SignedVerdict
    cost: int

    @property
    def verifier(self) -> str:
        return self.signed.receipt.worker


def verification_request(proof, max_price_per_1k: int) -> JobRequest:
    """The verification job for ``proof`` (a ``node.market.requester.Proof``): see ``JobRequest.check``."""
    original = proof.request
    return JobRequest(
        job_id=secrets.token_hex(8),
        model=original.model,
        params={**original.params, "max_tokens": 1, "logprobs": None},
        messages=original.messages,
        prompt=original.prompt,
        max_price_per_1k=max_price_per_1k,
        resume_text=original.resume_text + proof.text,
        check=CheckTask(original=original, text=proof.text, done=proof.done),
    )


async def spot_check(
    host,
    offers: Callable[[], list[Offer]],
    result,
    *,
    reputation: Reputation,
    payer: Payer | None = None,
    query: RouteQuery | None = None,
    timeouts: Timeouts | None = None,
    clock: Callable[[], float] = time.time,
) -> SpotCheck | None:
    """Hire another worker serving ``result``'s model to check its answer (``/llmarket/verify/1.0.0``).

    ``query`` is the job's routing query (price limit, chain, free only); the verifier is chosen by it, at
    its ``verify_price_per_1k``, never the worker that answered, and every candidate is tried in turn (the
    module docstring). Returns None when the answer has nothing to check (no fingerprints).

    Raises:
        NoChecker: no candidate returned a verdict; the message names each one tried and why it failed.
        PaymentError: a verifier could not be paid at all (from ``payer``).
    """
    proof = result.proof
    if proof is None or not proof.done.fingerprints:
        return None
    claimed = proof.done.receipt.numerics
    query = dataclasses.replace(
        query or RouteQuery(result.model, free_only=True), model=result.model, pinned_peer=None, numerics=claimed
    )
    others = [dataclasses.replace(o, price_per_1k=o.verify_price_per_1k) for o in offers()
              if o.peer_id not in (proof.worker, host.peer_id)]  # fmt: skip
    candidates = rank(others, query, reputation, clock())
    if not candidates:
        raise NoChecker("no other worker offers the model (at the price asked)")
    request = verification_request(proof, query.max_price_per_1k or 0)
    tried: list[str] = []
    for start in range(0, len(candidates), CONFIRM_BATCH):
        batch = candidates[start : start + CONFIRM_BATCH]
        unreachable = await _confirm(host, batch)
        for offer in batch:
            who = f"{offer.peer_id[:12]}…"
            if offer.peer_id in unreachable:
                tried.append(f"{who} (unreachable: {unreachable[offer.peer_id]})")
                reputation.failure(offer.peer_id, clock())
                continue
            try:
                done = await attempt(host, offer, request, payer or FreePayer(), protocol=VERIFY_PROTOCOL,
                                     timeouts=timeouts or Timeouts())  # fmt: skip
                signed = SignedVerdict(done.request, done.text, done.done.receipt)
                verdict = read_verdict(signed)
            except (JobFailed, ValueError) as err:
                log.info("spot check of job %s by %s failed: %s", proof.request.job_id, who, err)
                tried.append(f"{who} ({err})")
                reputation.failure(offer.peer_id, clock())
                continue
            reputation.success(offer.peer_id)
            log.info("spot check of job %s by %s: %s", proof.request.job_id, who, describe(verdict))
            return SpotCheck(verdict, signed, done.cost)
    raise NoChecker(f"no other worker could check the answer; tried {len(tried)}: {'; '.join(tried)}")


async def _confirm(host, offers: list[Offer]) -> dict[str, str]:
    """Dial, at once, those of ``offers`` whose peers we are not connected to; returns the unreachable ones
    (peer id → why)."""
    connected = set(host.connected_peers())
    unreachable: dict[str, str] = {}

    async def confirm(offer: Offer) -> None:
        with trio.move_on_after(CONFIRM_S):
            try:
                await host.dial(offer.peer_id, list(offer.addrs))
            except PeerUnreachable as err:
                unreachable[offer.peer_id] = str(err)
            return
        unreachable[offer.peer_id] = f"no connection within {CONFIRM_S:.0f}s"

    async with trio.open_nursery() as nursery:
        for offer in offers:
            if offer.peer_id not in connected:
                nursery.start_soon(confirm, offer)
    return unreachable
