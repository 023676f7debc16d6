"""Composing a requester: ``open_requester`` joins the market, keeps the offer book and runs jobs.

What it yields, a ``RequesterNode``, is the node; ``node.market.requester`` holds the
job logic it runs (routing, streaming, failover). Payment is the caller's choice
of payer: this module never imports web3 (a wallet comes from ``node.app.paid``).
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
from node.errors import ConfigError, PeerUnreachable
from node.market.offers import OfferBook, OfferGossip
from node.market.routing import Reputation
from node.models.cid import parse_cid
from node.models.default import DEFAULT_MODEL_CID
from node.net.host import HostConfig
from node.net.identity import Identity
from node.net.network import Network
from node.protocol.messages import Offer
from node.verify.fraud import FraudWatch

log = logging.getLogger(__name__)


@dataclass
class RequesterNode:
    """A running requester, as ``open_requester`` yields it: its host, offer book, reputation, fraud watch."""

    host: Network
    gossip: OfferGossip
    reputation: Reputation = field(default_factory=Reputation)  # shared by every job this node runs
    fraud: FraudWatch | None = None  # fraud reports: acted on (re-checked with its engines), and published

    def offers(self) -> list[Offer]:
        return self.gossip.book.live(time.time())

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
        yield RequesterNode(host, gossip, reputation, fraud)
        nursery.cancel_scope.cancel()


#: How long a requester with no --bootstrap looks for peers on the LAN.
LAN_DISCOVERY_S = 5.0


def model_cid_for_request(ref: str) -> str:
    """What a requester asks the market for: the default model's CID, or the CID given."""
    return DEFAULT_MODEL_CID if ref == "default" else str(parse_cid(ref))
