"""Spot checks: hiring another worker to check a job's answer, over ``/llmarket/verify/1.0.0``.

The requester sends the verifier a ``JobRequest`` whose ``check`` holds the
answer (``verification_request``); the verifier re-runs it on its own engine
(node/verify/local.py's ``CheckingEngine``) and answers with a signed verdict
(node/verify/judge.py's ``verdict_text``), paid like any job at its
``verify_price_per_1k``.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from node.errors import JobFailed
from node.market.jobs import VERIFY_PROTOCOL
from node.market.requester import Timeouts, attempt
from node.market.routing import Reputation, RouteQuery, rank
from node.payments.payer import FreePayer, Payer
from node.protocol.messages import CheckTask, JobRequest, Offer, SignedVerdict
from node.verify.judge import Verdict, describe, read_verdict

log = logging.getLogger(__name__)


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
    tries: int = 2,
) -> SpotCheck | None:
    """Hire another worker serving ``result``'s model to check its answer (``/llmarket/verify/1.0.0``).

    ``query`` is the job's routing query (price limit, chain, free only); the verifier is chosen by it, at
    its ``verify_price_per_1k``, never the worker that answered. Returns None when nobody could check it
    (no other worker, or ``tries`` of them failed); a verifier that fails counts against its reputation.
    """
    proof = result.proof
    if proof is None or not proof.done.fingerprints:
        return None
    query = dataclasses.replace(query or RouteQuery(result.model, free_only=True), model=result.model, pinned_peer=None)
    others = [dataclasses.replace(o, price_per_1k=o.verify_price_per_1k) for o in offers() if o.peer_id != proof.worker]
    request = verification_request(proof, query.max_price_per_1k or 0)
    for offer in rank(others, query, reputation, clock(), limit=tries):
        try:
            done = await attempt(host, offer, request, payer or FreePayer(), protocol=VERIFY_PROTOCOL,
                                 timeouts=timeouts or Timeouts())  # fmt: skip
            signed = SignedVerdict(done.request, done.text, done.done.receipt)
            verdict = read_verdict(signed)
        except (JobFailed, ValueError) as err:
            log.info("spot check of job %s by %s… failed: %s", proof.request.job_id, offer.peer_id[:12], err)
            reputation.failure(offer.peer_id, clock())
            continue
        reputation.success(offer.peer_id)
        log.info("spot check of job %s by %s…: %s", proof.request.job_id, offer.peer_id[:12], describe(verdict))
        return SpotCheck(verdict, signed, done.cost)
    return None
