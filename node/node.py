"""Composing a node: a worker (``serve``) or a requester (``open_requester``).

Both are trio services built from the library's parts (identity, model store,
engine, host, offers, jobs); the CLI only parses flags into a config and calls
them. Nothing here is global, so tests run several nodes in one process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from node import __version__
from node.activity import Activity
from node.concurrency import open_service_nursery
from node.errors import ConfigError, ModelError, PeerUnreachable
from node.fraud import FraudWatch
from node.host import Host, HostConfig
from node.identity import Identity, load_or_create_account
from node.jobs import VERIFY_PROTOCOL, WorkerService
from node.messages import ModelInfo, Offer
from node.models import ModelStore, StoredModel, resolve_model
from node.models.cid import parse_cid
from node.models.default import DEFAULT_MODEL_CID
from node.models.ipfs import IpfsSource
from node.models.peers import ModelServer, PeerSource
from node.offers import FIELD_CHARS, MAX_ADDRS, Advertiser, OfferBook, OfferGossip, sign_offer
from node.payments.close import CloseService
from node.payments.escrow import EscrowClient
from node.payments.ledger import WalletLedger, WorkerLedger
from node.payments.metering import EscrowMetering, FreeMetering, Metering
from node.payments.policy import job_cost
from node.payments.settlement import SettlementPolicy, Settler
from node.payments.wallet import Wallet
from node.progress import NO_PROGRESS, Progress
from node.routing import Reputation
from node.verify import CheckingEngine

if TYPE_CHECKING:  # the engine (llama.cpp) is imported by serve() only: requesters never load it
    from node.engine import Engine
    from node.hardware import SpeedProfile

log = logging.getLogger("node.node")


@dataclass(frozen=True)
class WorkerConfig:
    data_dir: Path
    model: str = "default"
    network: HostConfig = HostConfig()  # listen, bootstrap, announce, mDNS, relaying
    price_per_1k: int = 0
    verify_price_per_1k: int | None = None  # verification jobs; default: price_per_1k // 10
    slots: int = 1
    ctx_size: int = 2048
    threads: int | None = None
    gpu_layers: int | None = None
    engine: str = "batched"  # node/batched.py; or "contexts": one llama.cpp context per slot
    ipfs_api: str | None = None
    advertise_interval_s: float = 10.0
    offer_ttl_s: float = 60.0
    peer_discovery_s: float = 15.0  # how long to look for peers holding a model no other source has
    # paid serving (price_per_1k > 0)
    rpc_url: str | None = None
    deployments_dir: Path | None = None
    insecure_dev_key: bool = False
    settle_every: int = 1
    settle_interval_s: float | None = None
    max_credit_window: int | None = None  # default: the price of 256 tokens

    @property
    def verify_price(self) -> int:
        return self.price_per_1k // 10 if self.verify_price_per_1k is None else self.verify_price_per_1k


def _priced(metering: Metering, price_per_1k: int) -> Metering:
    """The same payment channels at another price (verification jobs); free when that price is 0."""
    if price_per_1k == 0 or isinstance(metering, FreeMetering):
        return FreeMetering()
    return dataclasses.replace(metering, price_per_1k=price_per_1k)


@dataclass
class WorkerNode:
    """A running worker, as ``serve`` hands it to its caller."""

    host: Host
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
    from node.engine import open_engine
    from node.hardware import self_benchmark

    payments = await trio.to_thread.run_sync(_escrow_metering, config) if config.price_per_1k > 0 else None
    metering: Metering = payments or FreeMetering()
    identity = Identity.load(config.data_dir, account=payments.client.account if payments else None)
    host = Host(identity, config.network)
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


async def readvertise_on_new_addresses(host: Host, advertiser: Advertiser, *, every_s: float = 1.0) -> None:
    """Publish a new offer as soon as the advertised addresses change (a relay reservation, AutoNAT's verdict)."""
    last = host.advertised()
    while True:
        await trio.sleep(every_s)
        now = host.advertised()
        if now != last:
            last = now
            advertiser.changed()


async def provide_model(host: Host, cid: str, *, retry_s: float = 30.0) -> None:
    """Put a provider record for ``cid`` in the DHT ("who serves this model"), retried until a server takes it.

    py-libp2p republishes it every 22 hours while the host runs.
    """
    while not await host.discovery.provide(cid):
        await trio.sleep(retry_s)


#: Where a running node keeps its network status for ``llmarket net status`` (in its data dir).
NET_STATUS_FILE = "net-status.json"


async def publish_net_status(host: Host, data_dir: Path, *, every_s: float = 5.0) -> None:
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


def _escrow_metering(config: WorkerConfig) -> EscrowMetering:
    """Connect to the chain as the worker's account (blocking): client, ledger, settler."""
    if not config.rpc_url or config.deployments_dir is None:
        raise ConfigError("a paid worker (--price > 0) needs --rpc-url and --deployments")
    probe = EscrowClient.connect(config.rpc_url, deployments_dir=config.deployments_dir)
    account = load_or_create_account(
        config.data_dir, insecure_dev_key=config.insecure_dev_key, chain_id=probe.deployment.chain_id
    )
    client = EscrowClient(probe.w3, probe.deployment, account)
    ledger = WorkerLedger.in_data_dir(config.data_dir)
    policy = SettlementPolicy(settle_every=config.settle_every, settle_interval_s=config.settle_interval_s)
    window = config.max_credit_window or job_cost(0, 256, config.price_per_1k)
    settler = Settler(ledger, client, policy)
    return EscrowMetering(client, ledger, settler, config.price_per_1k, max_credit_window=max(window, 1))


def requester_wallet(data_dir: Path, rpc_url: str, deployments_dir: Path, *, insecure_dev_key: bool = False) -> Wallet:
    """The requester's wallet on the chain at ``rpc_url`` (blocking)."""
    probe = EscrowClient.connect(rpc_url, deployments_dir=deployments_dir)
    account = load_or_create_account(data_dir, insecure_dev_key=insecure_dev_key, chain_id=probe.deployment.chain_id)
    return Wallet(EscrowClient(probe.w3, probe.deployment, account), WalletLedger.in_data_dir(data_dir))


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


@dataclass
class Requester:
    host: Host
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
        for peer_id, addrs in await self.host.discovery.find_providers(model):
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
) -> AsyncIterator[Requester]:
    """A node that only asks: it joins the market, keeps the offer book and runs jobs.

    ``network`` (default: loopback, the ``bootstrap`` peers) says how it joins: through
    bootstrap peers, or with none, through peers found on the LAN by mDNS.
    """
    network = network or HostConfig(bootstrap=bootstrap)
    if not network.bootstrap and not network.mdns:
        raise ConfigError("give at least one --bootstrap MULTIADDR (a worker prints its own when it starts)")
    host = Host(Identity.load(data_dir), network)
    async with open_service_nursery() as nursery:
        await nursery.start(host.run)
        if network.bootstrap and not host.connected_peers():
            raise ConfigError(
                f"none of the bootstrap peers answered ({', '.join(network.bootstrap)}); is a worker running?"
            )
        if not network.bootstrap and not await host.discovery.wait_for_peer(LAN_DISCOVERY_S):
            raise ConfigError(
                f"no peer found on the local network within {LAN_DISCOVERY_S:g}s (mDNS); "
                "give --bootstrap MULTIADDR (a worker prints its own when it starts)"
            )
        reputation = Reputation()
        gossip = OfferGossip(host, OfferBook(valued=reputation.valued))  # a full book keeps peers that served us
        await nursery.start(gossip.run)
        fraud = await nursery.start(FraudWatch(host, reputation).run)
        yield Requester(host, gossip, reputation, fraud)
        nursery.cancel_scope.cancel()


#: How long a requester with no --bootstrap looks for peers on the LAN.
LAN_DISCOVERY_S = 5.0


def model_cid_for_request(ref: str) -> str:
    """What a requester asks the market for: the default model's CID, or the CID given."""
    return DEFAULT_MODEL_CID if ref == "default" else str(parse_cid(ref))
