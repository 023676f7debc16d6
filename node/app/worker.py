"""Composing a worker: ``serve`` loads, measures, advertises and serves one model until cancelled.

A trio service built from the library's parts (identity, model store, engine,
host, offers, jobs); the CLI only parses flags into a ``WorkerConfig`` and calls
it. Nothing here is global, so tests run several nodes in one process. A free
worker never imports web3: ``node.app.paid`` loads it when ``price_per_1k > 0``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from node import __version__
from node.app.config import WorkerConfig
from node.app.paid import escrow_metering
from node.concurrency import open_service_nursery
from node.errors import ModelError
from node.market.activity import Activity
from node.market.jobs import VERIFY_PROTOCOL, WorkerService
from node.market.offers import FIELD_CHARS, MAX_ADDRS, Advertiser, OfferBook, OfferGossip, sign_offer
from node.market.routing import Reputation
from node.models.cid import parse_cid
from node.models.ipfs import IpfsSource
from node.models.peers import ModelServer, PeerSource
from node.models.resolve import resolve_model
from node.models.store import ModelStore, StoredModel
from node.net.identity import Identity
from node.net.network import Network
from node.payments.close import CloseService
from node.payments.metering import EscrowMetering, FreeMetering, Metering
from node.progress import NO_PROGRESS, Progress
from node.protocol.messages import ModelInfo, Offer
from node.verify.fraud import FraudWatch
from node.verify.local import CheckingEngine

if TYPE_CHECKING:  # the engine (llama.cpp) is imported by serve() only: requesters never load it
    from node.inference.engine import Engine
    from node.inference.hardware import SpeedProfile

log = logging.getLogger(__name__)


def _priced(metering: Metering, price_per_1k: int) -> Metering:
    """The same payment channels at another price (verification jobs); free when that price is 0."""
    if price_per_1k == 0 or isinstance(metering, FreeMetering):
        return FreeMetering()
    return dataclasses.replace(metering, price_per_1k=price_per_1k)


@dataclass
class WorkerNode:
    """A running worker, as ``serve`` hands it to its caller."""

    host: Network
    engine: Engine
    model: ModelInfo
    speed: SpeedProfile
    gossip: OfferGossip
    advertiser: Advertiser
    service: WorkerService = field(repr=False)
    activity: Activity = field(default_factory=Activity, repr=False)  # its jobs, for the web page
    payments: EscrowMetering | None = field(default=None, repr=False)  # a paid worker's chain and ledger
    verify_price_per_1k: int = 0


def _quantization(name: str) -> str:
    for part in reversed(name.replace("-", ".").split(".")):
        if part.upper().startswith(("Q", "F16", "F32", "BF16", "IQ")):
            return part.upper()
    return ""


async def serve(
    config: WorkerConfig, *, progress: Progress | None = None, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Run a worker until cancelled: load the model, measure it, advertise it, serve jobs.

    ``task_status.started`` receives the ``WorkerNode`` once it is serving.
    """
    # Imported here, not at the top: a requester never loads llama.cpp.
    from node.inference.engine import open_engine
    from node.inference.hardware import self_benchmark

    payments = await trio.to_thread.run_sync(escrow_metering, config) if config.price_per_1k > 0 else None
    metering: Metering = payments or FreeMetering()
    identity = Identity.load(config.data_dir, account=payments.client.account if payments else None)
    host = Network(identity, config.network)
    async with open_service_nursery() as nursery:
        await nursery.start(host.run)
        if payments is not None:
            await nursery.start(payments.settler.run)
        gossip = OfferGossip(host, OfferBook())
        await nursery.start(gossip.run)
        store = ModelStore.in_data_dir(config.data_dir, [IpfsSource(config.ipfs_api)] if config.ipfs_api else [])
        ModelServer(host, store).install()
        entry = await _resolve(config, store, gossip, progress or NO_PROGRESS)
        async with open_engine(
            entry.path, slots=config.slots, n_ctx=config.ctx_size, threads=config.threads,
            gpu_layers=config.gpu_layers, kind=config.engine,
        ) as engine:  # fmt: skip
            speed = await self_benchmark(engine)
            model = ModelInfo(entry.cid, entry.name, config.ctx_size, _quantization(entry.name))
            hardware = engine.hardware.summary()  # probed once, in a thread, when the engine opened
            activity = Activity(amount_label="earned", model_names={entry.cid: entry.name})
            service = WorkerService(host, identity, {entry.cid: engine}, metering=metering, activity=activity)
            verify_price = config.verify_price
            checking = WorkerService(
                host,
                identity,
                {entry.cid: CheckingEngine(engine)},
                metering=_priced(metering, verify_price),
                protocol=VERIFY_PROTOCOL,
                activity=activity,
            )

            def make_offer(seq: int, expires_at: float) -> Offer:
                return sign_offer(
                    identity,
                    Offer(
                        peer_id=identity.peer_id,
                        addrs=host.advertised()[:MAX_ADDRS],
                        payee=identity.payee,
                        binding=identity.binding,
                        models=[model],
                        price_per_1k=config.price_per_1k,
                        chain_id=payments.client.deployment.chain_id if payments else 0,
                        escrow=payments.client.deployment.escrow if payments else "",
                        slots_total=engine.slots,
                        slots_free=service.free_slots,
                        tokens_per_s=round(speed.tokens_per_s, 1),
                        first_token_ms=round(1000 * speed.first_token_s, 1),
                        hardware=hardware[: FIELD_CHARS["hardware"]],
                        version=__version__,
                        seq=seq,
                        expires_at=expires_at,
                        reproducible=engine.reproducible,
                        verify_price_per_1k=verify_price,
                        numerics=engine.numerics,
                    ),
                )

            advertiser = Advertiser(
                gossip, make_offer, interval_s=config.advertise_interval_s, ttl_s=config.offer_ttl_s
            )
            service.on_slots_changed = checking.on_slots_changed = advertiser.changed
            service.install()
            checking.install()
            if payments is not None:
                CloseService(payments.client, payments.ledger).install(host)
                payments.settler.busy = lambda: service.free_slots < engine.slots
            await nursery.start(advertiser.run)
            nursery.start_soon(publish_net_status, host, config.data_dir)
            nursery.start_soon(readvertise_on_new_addresses, host, advertiser)
            nursery.start_soon(provide_model, host, model.cid)
            await nursery.start(FraudWatch(host, Reputation(), act=False).run)  # relay reports; workers do not route
            task_status.started(
                WorkerNode(host, engine, model, speed, gossip, advertiser, service, activity, payments, verify_price)
            )
            await trio.sleep_forever()


async def readvertise_on_new_addresses(host: Network, advertiser: Advertiser, *, every_s: float = 1.0) -> None:
    """Publish a new offer as soon as the advertised addresses change (a relay reservation, AutoNAT's verdict)."""
    last = host.advertised()
    while True:
        await trio.sleep(every_s)
        now = host.advertised()
        if now != last:
            last = now
            advertiser.changed()


async def provide_model(host: Network, cid: str, *, retry_s: float = 30.0) -> None:
    """Put a provider record for ``cid`` in the DHT ("who serves this model"), retried until a server takes it.

    py-libp2p republishes it every 22 hours while the host runs.
    """
    while not await host.provide(cid):
        await trio.sleep(retry_s)


#: Where a running node keeps its network status for ``llmarket net status`` (in its data dir).
NET_STATUS_FILE = "net-status.json"


async def publish_net_status(host: Network, data_dir: Path, *, every_s: float = 5.0) -> None:
    """Write ``host.status()`` to ``<data dir>/net-status.json`` every ``every_s`` until cancelled."""
    path = data_dir / NET_STATUS_FILE
    while True:
        status = {"source": f"the node running with this data dir (pid {os.getpid()})", **host.status()}
        status.update(pid=os.getpid(), updated_at=time.time())
        try:
            await trio.to_thread.run_sync(_write_atomically, path, json.dumps(status, indent=2))
        except OSError as err:
            log.warning("cannot write %s: %s", path, err)
        await trio.sleep(every_s)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


async def _resolve(config: WorkerConfig, store: ModelStore, gossip: OfferGossip, progress: Progress) -> StoredModel:
    """The model to serve: from the cache or an IPFS daemon, else from peers that offer it."""
    try:
        return await trio.to_thread.run_sync(lambda: resolve_model(store, config.model, progress=progress))
    except ModelError as first_failure:
        if not config.model.startswith(("Qm", "b")):
            raise
        cid = str(parse_cid(config.model))
        log.info("%s; looking for peers that offer %s", first_failure, cid)
        with trio.move_on_after(config.peer_discovery_s):
            await gossip.wait_for(lambda live: any(any(m.cid == cid for m in o.models) for o in live))
        holders = [o for o in gossip.book.live(time.time()) if any(m.cid == cid for m in o.models)]
        if not holders:
            raise ModelError(
                f"{first_failure}; and no peer offered {cid} within {config.peer_discovery_s:.0f}s"
            ) from None
        peers = ModelStore(store.root, [PeerSource(gossip.host, o.peer_id, o.addrs) for o in holders])
        return await trio.to_thread.run_sync(lambda: resolve_model(peers, config.model, progress=progress))
