"""Composing a requester: ``open_requester`` joins the market, keeps the offer book and runs jobs.

What it yields, a ``RequesterNode``, is the node; ``node.market.requester`` holds the
job logic it runs (routing, streaming, failover). Payment is the caller's choice
of payer: this module never imports web3 (a wallet comes from ``node.app.paid``).
What the node brings to payment is the model's own tokenizer (``checked_usage``,
the payer's usage oracle) and, for a requester that checks answers itself,
``VerifyBeforePaying``: the gate that holds the final receipt until the
verdict (``run_job``'s ``gate``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from node.concurrency import open_service_nursery
from node.errors import ConfigError, InvalidRequest, ModelError, PeerUnreachable
from node.inference.tokenizer import TokenizerCache
from node.market.offers import OfferBook, OfferGossip
from node.market.requester import JobResult, Proof
from node.market.routing import Reputation
from node.market.trust import Trust
from node.models.cid import parse_cid
from node.models.default import DEFAULT_MODEL_CID
from node.models.peers import PeerSource
from node.net.host import HostConfig
from node.net.identity import Identity
from node.net.network import Network
from node.payments.usage import CheckedUsage
from node.protocol.messages import JobRequest, Offer
from node.verify.fraud import FraudWatch, make_report
from node.verify.judge import Verdict
from node.verify.local import LocalVerifier, examine_answer

log = logging.getLogger(__name__)


@dataclass
class RequesterNode:
    """A running requester, as ``open_requester`` yields it: its host, offer book, reputation, fraud watch."""

    host: Network
    gossip: OfferGossip
    reputation: Reputation = field(default_factory=Reputation)  # shared by every job this node runs
    fraud: FraudWatch | None = None  # fraud reports: acted on (re-checked with its engines), and published
    tokenizers: TokenizerCache | None = None  # the models' own tokenizers, to check what workers bill
    trust: Trust = field(default_factory=Trust)  # what we verified of each worker: spot checks and credit follow

    def offers(self) -> list[Offer]:
        return self.gossip.book.live(time.time())

    async def checked_usage(self, offer: Offer, request: JobRequest) -> CheckedUsage:
        """The payer's usage oracle (node/payments/usage.py): ``request``'s exact prompt tokens, counted with the
        model's tokenizer, which is verified against the model's CID. The embedded default model's comes from
        its file on this machine; another model's from the worker about to be hired (only the head of the file,
        block by block against the CID), then from the cache.

        Raises:
            ModelError, PeerUnreachable: the tokenizer could not be had; InvalidRequest: a malformed request.
        """
        tokenizers = self.tokenizers
        if tokenizers is None:
            raise ModelError("this requester keeps no tokenizers (open it with open_requester)")
        # A tokenizer in memory or cached by CID, or the embedded default model's, is used first; the worker is
        # asked only for a model this machine has never seen.
        tokenizer = await tokenizers.get(request.model, [PeerSource(self.host, offer.peer_id, offer.addrs)])
        if request.check is not None:  # a verification job: the checked prompt, and one per record checked
            return CheckedUsage(tokenizer, await trio.to_thread.run_sync(tokenizer.count_check, request), answer=False)
        return CheckedUsage(tokenizer, await trio.to_thread.run_sync(tokenizer.count_sync, request))

    async def wait_for_model(self, model: str, timeout_s: float, *, providers_after_s: float = 1.0) -> list[Offer]:
        """Offers for ``model``, waiting up to ``timeout_s`` for the first one to arrive.

        Offers come by gossip; if none has come after ``providers_after_s``, the
        DHT's provider records for the model are a second source: each provider
        is dialled and asked for its offers.
        """

        def has_model(live: list[Offer]) -> bool:
            return any(any(m.cid == model for m in o.models) for o in live)

        with trio.move_on_after(timeout_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ask_providers, model, providers_after_s)
                await self.gossip.wait_for(has_model)
                nursery.cancel_scope.cancel()
        return self.offers()

    async def _ask_providers(self, model: str, after_s: float) -> None:
        await trio.sleep(after_s)
        known = {o.peer_id for o in self.offers()}
        for peer_id, addrs in await self.host.find_providers(model):
            if peer_id in known:
                continue
            try:
                await self.host.dial(peer_id, addrs)
            except PeerUnreachable as err:
                log.debug("provider %s… of %s: %s", peer_id[:12], model, err)
                continue
            await self.gossip.sync_from(peer_id)


@asynccontextmanager
async def open_requester(
    data_dir: Path, bootstrap: tuple[str, ...] = (), *, network: HostConfig | None = None
) -> AsyncIterator[RequesterNode]:
    """A node that only asks: it joins the market, keeps the offer book and runs jobs.

    ``network`` (default: loopback, the ``bootstrap`` peers) says how it joins: through
    bootstrap peers, or with none, through peers found on the LAN by mDNS.
    """
    network = network or HostConfig(bootstrap=bootstrap)
    if not network.bootstrap and not network.mdns:
        raise ConfigError("give at least one --bootstrap MULTIADDR (a worker prints its own when it starts)")
    host = Network(Identity.load(data_dir), network)
    async with open_service_nursery() as nursery:
        await nursery.start(host.run)
        if network.bootstrap and not host.connected_peers():
            raise ConfigError(
                f"none of the bootstrap peers answered ({', '.join(network.bootstrap)}); is a worker running?"
            )
        if not network.bootstrap and not await host.wait_for_peer(LAN_DISCOVERY_S):
            raise ConfigError(
                f"no peer found on the local network within {LAN_DISCOVERY_S:g}s (mDNS); "
                "give --bootstrap MULTIADDR (a worker prints its own when it starts)"
            )
        reputation = Reputation()
        gossip = OfferGossip(host, OfferBook(valued=reputation.valued))  # a full book keeps peers that served us
        await nursery.start(gossip.run)
        fraud = await nursery.start(FraudWatch(host, reputation).run)
        tokenizers = TokenizerCache(data_dir)
        try:
            yield RequesterNode(host, gossip, reputation, fraud, tokenizers)
        finally:
            tokenizers.close()
        nursery.cancel_scope.cancel()


#: How long a requester with no --bootstrap looks for peers on the LAN.
LAN_DISCOVERY_S = 5.0


def model_cid_for_request(ref: str) -> str:
    """What a requester asks the market for: the default model's CID, or the CID given."""
    return DEFAULT_MODEL_CID if ref == "default" else str(parse_cid(ref))


@dataclass
class VerifyBeforePaying:
    """``--verify``: check each finished answer on this machine before its final receipt is signed.

    ``gate`` is ``run_job``'s gate: it examines the answer with the verifier's
    engine and says whether to pay. The verdict is kept, so the job's audit
    (node/verify/fraud.py, which reports a failed check) does not run it again:
    pass this object as the audit's ``verifier``. A model this machine does not
    have is paid unchecked, as before (``request --verify`` loads the model it
    asks for, so that happens only in the gateway, for other models).
    """

    verifier: LocalVerifier
    _verdicts: dict[tuple[str, str], Verdict] = field(default_factory=dict)

    @property
    def engines(self) -> dict:
        return self.verifier.engines

    async def gate(self, proof: Proof) -> bool:
        engine = self.verifier.engines.get(proof.request.model)
        if engine is None or not proof.done.fingerprints:
            return True
        try:
            verdict, _ = await examine_answer(engine, proof.request, proof.text, proof.done)
        except InvalidRequest as err:  # ContextTooLong included: the answer does not fit the local context
            log.info("job %s: not checked before paying: %s", proof.request.job_id, err)
            return True
        self._verdicts[(proof.request.job_id, proof.worker)] = verdict
        return verdict.ok

    async def check_result(self, result: JobResult) -> Verdict | None:
        """The verdict the gate reached on ``result``'s answer (or a check now, if it made none)."""
        proof = result.proof
        if proof is not None and (verdict := self._verdicts.pop((proof.request.job_id, proof.worker), None)):
            return verdict
        return await self.verifier.check_result(result)


async def report_overcharges(node: RequesterNode, result: JobResult) -> int:
    """Publish a fraud report for every answer in ``result`` whose signed receipt billed more than its records
    hold (``JobResult.overcharges``): any node with the model re-checks it and bans the worker. Returns how many."""
    if node.fraud is None:
        return 0
    for proof in result.overcharges:
        await node.fraud.publish(make_report(node.host.identity, proof, []))
    return len(result.overcharges)
