"""Composing a worker: ``serve`` loads, measures, advertises and serves one model until cancelled.

A trio service built from the library's parts (identity, model store, engine,
host, offers, jobs); the CLI only parses flags into a ``WorkerConfig`` and calls
it. Nothing here is global, so tests run several nodes in one process. A free
worker never imports web3: ``node.app.paid`` loads it when ``price_per_1k > 0``.

**The model.** ``_resolve`` takes it from the cache or an IPFS daemon; else it
looks for holders (live offers, DHT provider records) until
``peer_discovery_s`` has passed, tries each holder it finds once (per set of
addresses), and its error names every holder it tried and why. A model that
came without a name (fetched by CID) takes the name its holders advertise, so
the worker's offer, its log and the gateway's ``/v1/models`` all show the
market's name, never the CID.

**Workers sharing a machine.** Each worker notes its pid and llama.cpp threads
in a per-user runtime directory (``$XDG_RUNTIME_DIR/llmarket/workers``, else
``<tmp>/llmarket-<uid>/workers``) while its engine is open, and removes the
note when it stops; notes of dead processes are swept by the next worker. A
worker whose threads plus those of the others exceed the cores says so at start
(``WorkerNode.crowding``, one line that `serve` prints), with the ``--threads``
that would share the cores. It does not change its own threads: an explicit
``--threads`` is obeyed, and one worker alone keeps every core.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from node import __version__
from node.app.config import WorkerConfig
from node.app.paid import deposit_metering
from node.concurrency import open_service_nursery
from node.errors import ModelError, NodeError
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
from node.payments.deposit_metering import DepositMetering
from node.payments.metering import FreeMetering, Metering
from node.progress import NO_PROGRESS, Progress
from node.protocol.messages import ModelInfo, Offer
from node.services import pid_alive
from node.verify.fraud import FraudWatch
from node.verify.local import CheckingEngine

if TYPE_CHECKING:  # the engine (llama.cpp) is imported by serve() only: requesters never load it
    from node.inference.engine import Engine
    from node.inference.hardware import SpeedProfile

log = logging.getLogger(__name__)


def _priced(metering: Metering, price_per_1k: int) -> Metering:
    """The same payment scheme at another price (verification jobs); free when that price is 0.

    The copy shares the original's chain reads, pairs and settler: the requester's exposure is counted once. Its
    credit window is worked out again at its own price (a window is tokens' worth); the allowances are amounts of
    money, and stay."""
    if price_per_1k == 0 or isinstance(metering, FreeMetering):
        return FreeMetering()
    return dataclasses.replace(metering, price_per_1k=price_per_1k, max_credit_window=0)


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
    payments: DepositMetering | None = field(default=None, repr=False)  # a paid worker's chain and ledger
    verify_price_per_1k: int = 0
    crowding: str = ""  # one line when its threads and other workers' on this machine exceed the cores


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

    payments = await trio.to_thread.run_sync(deposit_metering, config) if config.price_per_1k > 0 else None
    metering: Metering = payments or FreeMetering()
    identity = Identity.load(config.data_dir, account=payments.client.account if payments else None)
    host = Network(identity, config.network)
    async with open_service_nursery() as nursery:
        await nursery.start(host.run)
        if payments is not None:
            await nursery.start(payments.run)  # escrow events and batch claims
        gossip = OfferGossip(host, OfferBook())
        await nursery.start(gossip.run)
        store = ModelStore.in_data_dir(config.data_dir, [IpfsSource(config.ipfs_api)] if config.ipfs_api else [])
        ModelServer(host, store).install()
        entry = await _resolve(config, store, gossip, progress or NO_PROGRESS)
        async with open_engine(
            entry.path, slots=config.slots, n_ctx=config.ctx_size, threads=config.threads,
            gpu_layers=config.gpu_layers, kind=config.engine,
        ) as engine, noting_threads(engine_threads(engine, config.engine), config.data_dir) as others:  # fmt: skip
            crowding = crowding_warning(engine.hardware.cpu_cores, engine_threads(engine, config.engine), others)
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
                        escrow=payments.escrow if payments else "",  # the DepositEscrow
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
                payments.settler.busy = lambda: service.free_slots < engine.slots
            await nursery.start(advertiser.run)
            nursery.start_soon(publish_net_status, host, config.data_dir)
            nursery.start_soon(readvertise_on_new_addresses, host, advertiser)
            nursery.start_soon(provide_model, host, model.cid)
            await nursery.start(FraudWatch(host, Reputation(), act=False).run)  # relay reports; workers do not route
            task_status.started(
                WorkerNode(
                    host, engine, model, speed, gossip, advertiser, service, activity, payments, verify_price, crowding
                )
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
    """The model to serve: from the cache or an IPFS daemon, else from peers that hold it; named as the market
    names it when it came without a name."""
    try:
        entry = await trio.to_thread.run_sync(lambda: resolve_model(store, config.model, progress=progress))
    except ModelError as first_failure:
        if not config.model.startswith(("Qm", "b")):
            raise
        cid = str(parse_cid(config.model))
        log.info("%s; looking for peers that offer %s", first_failure, cid)
        entry = await fetch_from_holders(
            store, cid, gossip, within_s=config.peer_discovery_s, progress=progress, why=str(first_failure)
        )
    return await _named(store, entry, gossip.book.live(time.time()))


def market_name(offers: list[Offer], cid: str) -> str:
    """The name the offers give model ``cid`` (the most common; ties: the first in order), or "" if none does.

    A CID given as a name (an old worker's, or one that fetched the model unnamed) is no name.
    """
    names = Counter(m.name for o in offers for m in o.models if m.cid == cid and m.name and m.name != cid)
    return min(names, key=lambda n: (-names[n], n)) if names else ""


async def _named(store: ModelStore, entry: StoredModel, offers: list[Offer]) -> StoredModel:
    """``entry``, renamed in the store to the market's name when it has none of its own (its name is its CID)."""
    if entry.name != entry.cid:
        return entry
    name = market_name(offers, entry.cid)
    if not name:
        return entry
    log.info("model %s… is named %s on the market", entry.cid[:16], name)
    return await trio.to_thread.run_sync(store.rename, entry.cid, name)


@dataclass
class HolderSearch:
    """Who holds model ``cid``: live offers in ``gossip``'s book and DHT provider records, as they come.

    ``watch`` runs until cancelled: it wakes ``news`` waiters whenever an offer is
    kept, and looks the model up in the DHT every ``dht_every_s``.
    """

    gossip: OfferGossip
    cid: str
    dht_every_s: float = 5.0
    providers: dict[str, list[str]] = field(default_factory=dict)
    _news: trio.Event = field(default_factory=trio.Event)

    def _wake(self) -> None:
        self._news.set()
        self._news = trio.Event()

    async def watch(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_offers)
            nursery.start_soon(self._watch_dht)
            task_status.started()

    async def _watch_offers(self) -> None:
        while True:
            await self.gossip.received.wait()
            self._wake()

    async def _watch_dht(self) -> None:
        while True:
            try:
                found = await self.gossip.host.find_providers(self.cid, timeout_s=self.dht_every_s)
            except NodeError as err:  # no DHT to ask: the offers still count
                log.debug("looking up providers of %s… failed: %s", self.cid[:16], err)
                found = []
            for peer, addrs in found:
                if self.providers.get(peer) != addrs:
                    self.providers[peer] = addrs
                    self._wake()
            await trio.sleep(self.dht_every_s)

    def holders(self) -> list[tuple[str, list[str], str]]:
        """(peer id, addresses, the name it gives the model) of every holder known now, offers first; a peer
        whose offer and provider record give other addresses is listed with each."""
        found: dict[tuple[str, frozenset[str]], tuple[str, list[str], str]] = {}
        for offer in self.gossip.book.live(time.time()):
            for m in offer.models:
                if m.cid == self.cid and offer.peer_id != self.gossip.host.peer_id:
                    found[(offer.peer_id, frozenset(offer.addrs))] = (offer.peer_id, list(offer.addrs), m.name)
        for peer, addrs in self.providers.items():
            found.setdefault((peer, frozenset(addrs)), (peer, list(addrs), ""))
        return list(found.values())

    async def news(self) -> None:
        """Wait until a holder may have appeared (an offer was kept, or the DHT named a provider)."""
        await self._news.wait()


async def fetch_from_holders(
    store: ModelStore,
    cid: str,
    gossip: OfferGossip,
    *,
    within_s: float,
    progress: Progress = NO_PROGRESS,
    why: str = "",
    dht_every_s: float = 5.0,
) -> StoredModel:
    """Fetch ``cid`` into ``store`` from a peer that holds it, verified block by block.

    Holders are looked for (new offers, DHT providers) for ``within_s`` seconds; each
    one found is tried in turn, once for each set of addresses, until one delivers. A
    transfer under way is never cut short by the deadline; holders already known
    when it passes are still tried.

    Raises:
        ModelError: no holder delivered; the one line names each holder tried and why it failed,
            after ``why`` (how the cache and the IPFS daemon failed).
    """
    tried: dict[tuple[str, frozenset[str]], str] = {}  # (peer, addresses) → why it failed
    search = HolderSearch(gossip, cid, dht_every_s=dht_every_s)
    deadline = trio.current_time() + within_s
    async with trio.open_nursery() as nursery:
        await nursery.start(search.watch)
        while True:
            untried = [h for h in search.holders() if (h[0], frozenset(h[1])) not in tried]
            if untried:
                peer, addrs, name = untried[0]
                source = PeerSource(gossip.host, peer, addrs)
                peers = ModelStore(store.root, [source], pace=store.pace)
                try:
                    fetch = partial(peers.fetch, cid, name=name if name and name != cid else None, progress=progress)
                    entry = await trio.to_thread.run_sync(fetch)
                except ModelError as err:
                    reason = str(err).removeprefix(f"could not fetch {cid}: ").removeprefix(f"{source.name}: ")
                    tried[(peer, frozenset(addrs))] = f"{source.name} ({reason})"
                    continue
                nursery.cancel_scope.cancel()
                return entry
            if trio.current_time() >= deadline:
                break
            with trio.move_on_at(deadline):
                await search.news()
        nursery.cancel_scope.cancel()
    before = f"{why}; " if why else ""
    if not tried:
        raise ModelError(f"{before}and no peer offered {cid} within {within_s:.0f}s")
    raise ModelError(
        f"{before}no peer delivered {cid} within {within_s:.0f}s; tried {len(tried)}: " + "; ".join(tried.values())
    )


# ----------------------------------------------------- workers sharing this machine


def engine_threads(engine: Engine, kind: str) -> int:
    """The llama.cpp threads ``engine`` may run at once: the batched engine's one context, or every slot's."""
    return engine.threads if kind == "batched" else engine.threads * engine.slots


def runtime_dir() -> Path:
    """Where running workers note their threads: ``$XDG_RUNTIME_DIR/llmarket/workers``, else
    ``<tmp>/llmarket-<uid>/workers`` (mode 700, refused unless this user owns it)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "llmarket" / "workers"
    base = Path(tempfile.gettempdir()) / f"llmarket-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(base)
    if base.is_symlink() or info.st_uid != os.getuid():
        raise OSError(f"{base} is not this user's own directory")
    return base / "workers"


@dataclass(frozen=True)
class RunningWorker:
    """Another worker on this machine, as its note in ``runtime_dir()`` says."""

    pid: int
    threads: int
    data_dir: str


def _started(pid: int) -> str:
    """The process's start time (in clock ticks since boot) from /proc, "" where unknown: it tells a pid reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def running_workers(root: Path, *, but: Path | None = None) -> list[RunningWorker]:
    """The workers whose notes are in ``root`` (except the note ``but``); notes of dead processes are removed."""
    found = []
    for note in sorted(root.glob("*.json")) if root.is_dir() else []:
        if note == but:
            continue
        try:
            data = json.loads(note.read_text())
            pid, threads = int(data["pid"]), int(data["threads"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours to read: skipped, never removed
        if not pid_alive(pid) or (data.get("started") and data["started"] != _started(pid)):
            note.unlink(missing_ok=True)
            continue
        found.append(RunningWorker(pid, threads, str(data.get("data_dir", ""))))
    return found


def _note(root: Path | None, threads: int, data_dir: Path) -> tuple[Path | None, list[RunningWorker]]:
    try:
        root = root or runtime_dir()
        root.mkdir(parents=True, exist_ok=True)
        others = running_workers(root)
        note = root / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        partial = note.with_suffix(".partial")
        partial.write_text(
            json.dumps(
                {"pid": os.getpid(), "started": _started(os.getpid()), "threads": threads, "data_dir": str(data_dir)}
            )  # fmt: skip
        )
        partial.replace(note)
        return note, others
    except OSError as err:
        log.debug("cannot note this worker's threads: %s", err)
        return None, []


@asynccontextmanager
async def noting_threads(threads: int, data_dir: Path, root: Path | None = None) -> AsyncIterator[list[RunningWorker]]:
    """Note this worker's threads in ``root`` (default ``runtime_dir()``) while the block runs; yields the other
    workers noted there. Where the directory cannot be used, nothing is noted and no other worker is seen."""
    note, others = await trio.to_thread.run_sync(_note, root, threads, data_dir)
    try:
        yield others
    finally:
        if note is not None:
            note.unlink(missing_ok=True)


def crowding_warning(cores: int, threads: int, others: list[RunningWorker]) -> str:
    """One line when ``threads`` plus the ``others``' threads exceed ``cores`` (what to do included), else ""."""
    theirs = sum(w.threads for w in others)
    if not others or threads + theirs <= cores:
        return ""
    workers = len(others) + 1
    pids = ", ".join(str(w.pid) for w in others[:4]) + (", …" if len(others) > 4 else "")
    return (
        f"warning: {len(others)} other llama.cpp worker(s) on this machine (pid {pids}) use {theirs} thread(s); "
        f"with this one's {threads} that is {threads + theirs} on {cores} cores, and workers decoding at once "
        f"slow each other down many times over: start each with --threads {max(1, cores // workers)} "
        f"(the cores divided among the {workers} workers)"
    )
