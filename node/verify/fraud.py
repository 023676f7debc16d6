"""Fraud reports on GossipSub topic ``llmarket/fraud/1``: a failed check, told so that nobody must trust the teller.

When a requester's check of a job fails (its own ``--verify``, or a spot check
by another worker), it bans the worker and publishes a ``FraudReport``: the
job's request, the worker's text, its ``JobDone`` (signed receipt and
fingerprints), and the signed verdicts against it. Anyone can check that the
accused really signed that answer (its receipt) and that each verifier really
signed its verdict (theirs); nobody can put words in an honest worker's mouth.

What a node does with a report that passes those checks (``FraudWatch``):

- **It has the model** (an engine for it): it re-checks the answer itself
  (node/verify/local.py). If the check fails, the accused is banned for
  ``CHEATER_BAN_S``. If the answer checks out, the report was false: the
  reporter and every verifier that signed a failing verdict are banned
  instead, and the accused is untouched. Framing an honest worker costs the
  framer, never the worker. Except where every failing verdict is statistical
  (``Verdict.statistical``; a reporter's own check signs none, so it may be):
  a check on other numerics can fail a count that passes here, so the report
  is ignored.
- **It does not have the model**: the report is a hint. Each distinct verifier
  that signed a failing verdict against a worker counts once (the reporter's
  own word counts for nothing: it could be anyone). From ``HINT_QUORUM``
  distinct verifiers on, each new one counts as one failure in routing (a
  short backoff ban, node/market/routing.py), never the long ban: a few colluding
  verifiers can make a worker less likely to be picked for a while, not
  exclude it.

Workers forward reports (they validate and relay the topic) but do not act on
them. A node acts on at most one report per reporter every
``REPORT_INTERVAL_S`` seconds, and re-checks one at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID

from node.errors import InvalidRequest, PaymentError, WireError
from node.inference.numerics import claims_exact
from node.market.jobs import check_result_receipt, request_hash
from node.market.routing import Reputation, RouteQuery
from node.market.trust import Trust
from node.net.host import Host
from node.net.identity import Identity, verify_peer_signature
from node.payments.payer import Payer
from node.protocol.messages import FraudReport, SignedVerdict
from node.protocol.wire import decode, encode, pack
from node.verify.judge import Verdict, read_verdict
from node.verify.local import LocalVerifier, examine_answer
from node.verify.spot import NoChecker, SpotCheck, spot_check

log = logging.getLogger(__name__)

TOPIC = "llmarket/fraud/1"
MAX_REPORT_BYTES = 512 * 1024
MAX_VERDICTS = 4
CHEATER_BAN_S = 24 * 3600.0
HINT_QUORUM = 2
REPORT_INTERVAL_S = 10.0


def sign_report(identity: Identity, report: FraudReport) -> FraudReport:
    unsigned = dataclasses.replace(report, reporter=identity.peer_id, signature=b"")
    return dataclasses.replace(unsigned, signature=identity.sign(pack(unsigned)))


def make_report(identity: Identity, proof, verdicts: list[SignedVerdict]) -> FraudReport:
    """A signed report against ``proof``'s worker (a ``node.market.requester.Proof``) with ``verdicts`` against it."""
    report = FraudReport(proof.request, proof.text, proof.done, verdicts[:MAX_VERDICTS], identity.peer_id)
    return sign_report(identity, report)


def report_problem(report: FraudReport, publisher: str) -> str | None:
    """Why ``report`` (as published by ``publisher``) is not a valid report, or None. Signatures only: cheap."""
    if report.reporter != publisher:
        return "published by another peer than it names"
    if not verify_peer_signature(report.reporter, pack(dataclasses.replace(report, signature=b"")), report.signature):
        return "bad reporter signature"
    if report.original.check is not None:
        return "a report about a verification job"
    problem = check_result_receipt(report.done.receipt, report.original, report.text, report.done.fingerprints)
    if problem:
        return f"the accused's answer: {problem}"
    if not report.done.fingerprints:
        return "the accused's answer has no fingerprints"
    if len(report.verdicts) > MAX_VERDICTS:
        return f"more than {MAX_VERDICTS} verdicts"
    accused, original = report.done.receipt.worker, request_hash(report.original)
    for signed in report.verdicts:
        task = signed.request.check
        if task is None or request_hash(task.original) != original or task.done.receipt != report.done.receipt:
            return "a verdict about another answer"
        if signed.receipt.worker == accused:
            return "a verdict by the accused"
        if problem := check_result_receipt(signed.receipt, signed.request, signed.text):
            return f"a verdict: {problem}"
        try:
            if read_verdict(signed).ok:
                return "a verdict that passed the answer"
        except ValueError as err:
            return f"a verdict: {err}"
    return None


def parse_report(data: bytes, publisher: str) -> FraudReport:
    """Decode and check a gossiped report; ``WireError`` if it is not a valid one."""
    if len(data) > MAX_REPORT_BYTES:
        raise WireError(f"report of {len(data)} bytes is over {MAX_REPORT_BYTES}")
    report = decode(data, max_size=MAX_REPORT_BYTES)
    if not isinstance(report, FraudReport):
        raise WireError(f"expected fraud.report/1, got {report.TYPE}")
    if problem := report_problem(report, publisher):
        raise WireError(f"fraud report from {publisher[:12]}…: {problem}")
    return report


@dataclass
class Outcome:
    """What this node made of one report (kept for ``status`` and tests)."""

    accused: str
    reporter: str
    action: str  # "banned the worker", "banned the reporter", "hint", "ignored"
    detail: str = ""


@dataclass
class FraudWatch:
    """Validate, forward and (with ``act``) act on fraud reports; publish our own.

    ``engines`` (model CID → engine) are what this node can re-check with;
    without one for a report's model, the report is a hint.
    """

    host: Host
    reputation: Reputation
    engines: dict[str, Any] = field(default_factory=dict)
    act: bool = True
    clock: Callable[[], float] = time.time
    outcomes: list[Outcome] = field(default_factory=list)
    _hints: dict[str, set[str]] = field(default_factory=dict)  # accused → verifiers that said it cheated
    _last: dict[str, float] = field(default_factory=dict)  # reporter → when we last took one of its reports
    _seen: set[bytes] = field(default_factory=set)  # reports acted on (the same report arrives from many peers)

    def __post_init__(self) -> None:
        self._inbox_send, self._inbox = trio.open_memory_channel(8)
        self.acted = trio.Event()  # set (and replaced) after each report is acted on

    def _validate(self, forwarder: ID, msg) -> bool:
        try:
            report = parse_report(msg.data, ID(msg.from_id).to_base58())
        except (WireError, ValueError) as err:
            log.info("dropping a fraud report relayed by %s…: %s", str(forwarder)[:12], err)
            return False
        if self.act and report.reporter != self.host.identity.peer_id:
            try:
                self._inbox_send.send_nowait(report)
            except trio.WouldBlock:
                log.info("too many fraud reports at once; not acting on one from %s…", report.reporter[:12])
        return True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.host.pubsub.set_topic_validator(TOPIC, self._validate, is_async_validator=False)
        subscription = await self.host.pubsub.subscribe(TOPIC)
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                while True:
                    await subscription.get()  # the validator queued it already

            nursery.start_soon(drain)
            task_status.started(self)
            async for report in self._inbox:
                await self._handle(report)

    async def publish(self, report: FraudReport) -> None:
        await self.host.pubsub.publish(TOPIC, encode(report))

    async def _handle(self, report: FraudReport) -> None:
        key = report.signature
        now = self.clock()
        if key in self._seen or now - self._last.get(report.reporter, -REPORT_INTERVAL_S) < REPORT_INTERVAL_S:
            return
        self._seen.add(key)
        self._last[report.reporter] = now
        outcome = await self._judge(report)
        log.info("fraud report from %s… against %s…: %s %s", report.reporter[:12], outcome.accused[:12],
                 outcome.action, outcome.detail)  # fmt: skip
        self.outcomes.append(outcome)
        self.acted.set()
        self.acted = trio.Event()

    async def _judge(self, report: FraudReport) -> Outcome:
        accused, now = report.done.receipt.worker, self.clock()
        accusers = {signed.receipt.worker for signed in report.verdicts}
        engine = self.engines.get(report.original.model)
        if engine is None:
            known = self._hints.setdefault(accused, set())
            new = accusers - known
            known |= accusers
            if len(known) >= HINT_QUORUM:
                for _ in new:
                    self.reputation.failure(accused, now)
            return Outcome(accused, report.reporter, "hint", f"{len(known)} distinct verifier(s) so far")
        try:
            verdict, _ = await examine_answer(engine, report.original, report.text, report.done)
        except InvalidRequest as err:  # ContextTooLong included: this node cannot re-check it
            return Outcome(accused, report.reporter, "ignored", f"cannot re-check: {err}")
        if not verdict.ok:
            self.reputation.ban(accused, now, CHEATER_BAN_S)
            return Outcome(accused, report.reporter, "banned the worker", verdict.reason)
        if all(_statistical(signed) for signed in report.verdicts):
            # The report's failures are statistical (a reporter's own check signs no verdict, so it may be too):
            # an answer checked on other numerics can fail a count there and pass here, within honest noise.
            # Not proof that the reporter lied; and the worker is untouched either way.
            return Outcome(accused, report.reporter, "ignored", "passes here; the report's failures are statistical")
        for framer in {report.reporter} | accusers:
            self.reputation.ban(framer, now, CHEATER_BAN_S)
        return Outcome(accused, report.reporter, "banned the reporter", "the answer checks out")


def _statistical(signed: SignedVerdict) -> bool:
    """Whether a (valid, failing) verdict failed only statistically."""
    try:
        return read_verdict(signed).statistical
    except ValueError:
        return False


# ------------------------------------------------------------------ after a job


@dataclass
class Audit:
    """The checks made of one finished job (``audit``)."""

    local: Verdict | None = None  # our own check (--verify)
    spot: SpotCheck | None = None  # another worker's (--spot-check)
    reported: bool = False  # a fraud report was published
    struck: bool = False  # the check failed only statistically: a strike (``Trust.struck``), not yet a ban
    notes: list[str] = field(default_factory=list)  # checks that were asked for and could not be made, and why

    @property
    def verdict(self) -> Verdict | None:
        """The verdict that counts: our own when we made one, else the spot check's."""
        return self.local if self.local is not None else (self.spot.verdict if self.spot else None)

    def to_dict(self) -> dict:
        return {
            "local": self.local.to_dict() if self.local else None,
            "spot_check": None
            if self.spot is None
            else {"verifier": self.spot.verifier, "cost": self.spot.cost, **self.spot.verdict.to_dict()},
            "reported": self.reported,
            "struck": self.struck,
            "notes": self.notes,
        }


async def audit(
    requester,
    result,
    *,
    verifier: LocalVerifier | None = None,
    spot_check_probability: float = 0.0,
    payer: Payer | None = None,
    query: RouteQuery | None = None,
    draw: Callable[[], float] = random.random,
    trust: Trust | None = None,
) -> Audit:
    """Check ``result`` (a ``JobResult`` from ``requester``) as asked, and act on a failed check.

    Our own check (``verifier``) is made always. A spot check by another worker is made with probability
    ``spot_check_probability``; with ``trust`` (node/market/trust.py), with the probability it gives the
    worker for that base instead (a stranger's first jobs are always checked, then less as checks pass),
    unless our own check was made. Every verdict is recorded in ``trust``. A failed check bans the worker
    (``CHEATER_BAN_S``: no more jobs, so no more receipts signed to it) and publishes a fraud report, except
    a statistical failure of a noisy worker (``Verdict.statistical``) with ``trust``: that is a strike
    (``Trust.struck``), and only ``STRIKES`` in a row ban and report. When our own check passes an answer
    that a spot check failed, the verifier lied: it is banned instead.
    """
    checks = Audit()
    if verifier is not None:
        try:
            checks.local = await verifier.check_result(result)
        except InvalidRequest as err:  # ContextTooLong included: the answer does not fit the local context
            checks.notes.append(f"not checked here: {err}")
    proof = result.proof
    probability = spot_check_probability
    if trust is not None and checks.local is None and proof is not None:
        probability = trust.spot_probability(proof.worker, probability, exact=claims_exact(proof.done.receipt.numerics))
    if probability > 0 and draw() < probability:
        try:
            checks.spot = await spot_check(requester.host, requester.offers, result,
                                           reputation=requester.reputation, payer=payer, query=query)  # fmt: skip
        except (PaymentError, NoChecker) as err:
            checks.notes.append(f"no spot check: {err}")
        else:
            if checks.spot is None:
                checks.notes.append("no spot check: the answer carries no fingerprints to check")
    verdict, now = checks.verdict, time.time()
    if checks.local is not None and checks.local.ok and checks.spot is not None and not checks.spot.verdict.ok:
        log.info("spot check by %s… failed an answer our own check passed: banning it", checks.spot.verifier[:12])
        requester.reputation.ban(checks.spot.verifier, now, CHEATER_BAN_S)
    if verdict is None:
        return checks
    if verdict.ok:
        if trust is not None:
            trust.passed(proof.worker)
        return checks
    if trust is not None:
        if verdict.statistical and not trust.struck(proof.worker):
            checks.struck = True
            checks.notes.append(
                f"a statistical failure, which honest noisy workers make now and then: a strike, not a ban; "
                f"{trust.strikes} in a row ban and report the worker"
            )
            return checks
        trust.failed(proof.worker)
    requester.reputation.ban(proof.worker, now, CHEATER_BAN_S)
    against = [checks.spot.signed] if checks.spot is not None and not checks.spot.verdict.ok else []
    await requester.fraud.publish(make_report(requester.host.identity, proof, against))
    checks.reported = True
    return checks
