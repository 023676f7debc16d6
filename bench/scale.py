"""The market at scale: many real nodes on this machine, with churn, changing offers and requesters coming and going.

    .venv/bin/python bench/scale.py                      # 100, 300 and 1,000 nodes (the full run)
    .venv/bin/python bench/scale.py --sizes 60 --steady 30 --procs 1   # a quick look

What runs is the market's real code: every node is a ``node.net.network.Network``
(TCP on 127.0.0.1, Noise, yamux, GossipSub with strict signing, AutoNAT, the relay
service, the Kademlia DHT: workers are DHT servers and put a provider record for their
model, as ``llmarket serve`` does) with an ``OfferGossip`` and its ``OfferBook``
(``node.market.offers``). Workers publish through ``Advertiser`` (every 10 s, offers
live 30 s, as ``llmarket serve``) and serve ``/llmarket/job/1.0.0`` with
``WorkerService``; a scripted engine (``tests/factories.py``) stands in for llama.cpp,
nothing else is stubbed. Requesters are built as ``open_requester`` builds them
(host, book that keeps the peers that served it, offer sync from the bootstrap peers),
wait for the model with ``RequesterNode.wait_for_model`` (gossip, then the DHT's
provider records) and run a job with ``run_job``. There is no in-memory transport:
nodes are many per process (``--procs`` processes, the sizes split evenly between
them), all on real loopback sockets.

Loopback is one IP: every connection comes from 127.0.0.1, so the per-IP inbound
limits (``HostConfig.max_connections_per_ip``, the per-IP connection rate) would
see a thousand nodes as one hostile address. Here they are raised to the totals
(``--no-ip-relief`` keeps them, to see that). Prices are what offers say: the
offers name a chain and an escrow and requesters route on price, but jobs run
unpaid (``FreePayer``/``FreeMetering``), because payment is not what is measured.

The market: ``N`` workers; 80% serve model A, 15% model B, 5% model C; prices,
speeds and times to first token are spread (seeded). Each node bootstraps from 3
nodes already up, picked at random (the first from the first node). Once all are
up and ``--settle`` seconds have passed comes the steady state, ``--steady``
seconds, during which:

- each worker changes its offer once a minute on average (``--change-every``): its
  free slots, or its price by ±20%; it calls ``Advertiser.changed()``, as a worker
  does when a job starts or ends;
- ``--churn`` of the workers a minute leave (their tasks cancelled, connections
  dropped) and as many new ones join;
- every ``--requester-every`` seconds per process a new requester starts from
  nothing, bootstraps from 3 random nodes, waits for model A and runs one job,
  then stays 5 s and leaves.

Measured (steady state only):

- propagation: for every change of a traced worker (1 in 10, ``--trace``), the time
  from ``changed()`` to the moment each other node's book is handed that offer or a
  newer one (``OfferBook.admit`` is called by the topic validator for every valid
  offer, kept or not); nodes that were not up for the whole 10 s after the change
  are left out; a node not reached within 10 s is a miss;
- gossip bytes per node per second: every byte written to a TCP socket by any node
  (all protocols), and the part that is GossipSub RPCs (``Pubsub.write_msg``), over
  the steady state, divided by the nodes up;
- book size (offers held) and memory: the process's RSS per node (everything: the
  libp2p host too), and the market state alone (an offer book of that size, measured
  with tracemalloc);
- a new requester's time from start to its first job done, and how many failed;
- routing quality: at each job, the requester ranks its own book (capped) with
  ``rank``; the reference is a book with no caps fed the same offers beside it
  ("full book"). Reported: the share of jobs whose first choice is in the top 10%
  of the full book by the same score, and the same for the choice from the full book
  (ideally 100%: it is the gossip's own coverage, not a cap);
- failures: failed starts, failed jobs, requesters that found no offer, nodes whose
  book was empty, and GossipSub's rate-limit drops (py-libp2p logs "Rate limit
  exceeded": a peer forwarding more than 10 messages a second on one topic has the
  excess neither forwarded nor cached, and is penalised).

The mesh overrides (``--degree``, ``--heartbeat``, ``--rate-limit``) set the same attributes on each
host's ``GossipSub`` that ``HostConfig``'s gossip fields stand for (node/net/config.py).
It prints one table row per size, plus the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# three made-up models (CIDs of b"llmarket scale model a" etc.): 80%, 15% and 5% of the workers
MODELS = (
    ("bafkreicr7ifimopoe2gtf7anzbo4zccyibrh3xo6qfgvgqtxsujgorravy", 0.80),
    ("bafkreiapj66k37g446ha6jaeahtlajn5wr2vwp4lidwpihrkwsqcouxh5q", 0.15),
    ("bafkreih23526yv6rnm2okfrlsaf4emzgugl4c66rjdxhribkprbwwimev4", 0.05),
)
CHAIN_ID, ESCROW = 31337, "0x" + "e5" * 20
PROPAGATION_WINDOW_S = 10.0


# ----------------------------------------------------------------------------- one process's nodes


def child(args: argparse.Namespace) -> None:
    import trio
    from libp2p.pubsub.pubsub import Pubsub

    from node.market.jobs import WorkerService
    from node.market.offers import REFUSED_NO_BASE, TOPIC, Advertiser, OfferBook, OfferGossip, sign_offer
    from node.market.requester import JobObserver, run_job
    from node.market.routing import Reputation, RouteQuery, rank
    from node.net.config import HostConfig
    from node.net.identity import Identity
    from node.net.network import Network
    from node.payments.payer import FreePayer
    from node.protocol.messages import ModelInfo, Offer
    from tests.factories import SPEC, ScriptedEngine

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("libp2p", "node", "multiaddr", "async_service"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    class RateLimitCounter(logging.Handler):
        count = 0

        def emit(self, record: logging.LogRecord) -> None:
            if "Rate limit exceeded" in record.getMessage():
                RateLimitCounter.count += 1

    gossip_log = logging.getLogger("libp2p.pubsub.gossipsub")
    gossip_log.setLevel(logging.WARNING)
    gossip_log.addHandler(RateLimitCounter())
    gossip_log.propagate = False

    rng = random.Random(args.seed * 1000 + args.index)
    work = Path(args.dir)
    addr_dir = work / "addrs"
    addr_dir.mkdir(exist_ok=True)
    counters = {"socket_bytes": 0, "pubsub_bytes": 0, "pubsub_peers": 0}

    # ---- byte counters (bench-only wrappers; they count and pass through)
    send_all = trio.SocketStream.send_all

    async def counted_send_all(self, data):
        counters["socket_bytes"] += len(data)
        return await send_all(self, data)

    trio.SocketStream.send_all = counted_send_all
    write_msg = Pubsub.write_msg

    async def counted_write_msg(self, stream, rpc_msg):
        counters["pubsub_bytes"] += rpc_msg.ByteSize() + 2
        return await write_msg(self, stream, rpc_msg)

    Pubsub.write_msg = counted_write_msg
    handle_new_peer = Pubsub._handle_new_peer

    async def counted_new_peer(self, peer_id):
        counters["pubsub_peers"] += 1  # a pubsub stream opened to a newly connected peer: one per connection
        return await handle_new_peer(self, peer_id)

    Pubsub._handle_new_peer = counted_new_peer

    # ---- the record of what happens
    t0 = args.start
    steady_from = t0 + args.join_s + args.settle
    steady_to = steady_from + args.steady
    traced: set[str] = set()  # peer ids whose changes are traced
    changes: list[tuple[str, int, float]] = []  # (peer, seq, t of changed())
    arrivals: dict[str, list] = {}  # node → [(peer, seq, t)]
    lifetimes: dict[str, list[float]] = {}  # node → [up, down]
    requesters: list[dict] = []
    in_flight = [0]  # requesters running
    starts: list[dict] = []  # how long each worker's start took, step by step
    failures: defaultdict[str, int] = defaultdict(int)
    book_sizes: list[int] = []
    books: list[OfferBook] = []

    def in_steady(t: float) -> bool:
        return steady_from <= t <= steady_to

    class TracedBook(OfferBook):
        """An OfferBook that notes when it is handed a traced worker's offer (and feeds a shadow book)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            self.node = ""
            self.shadow: OfferBook | None = None

        def admit(self, offer, *, data=None, rate_limited=False):
            if offer.peer_id in traced:
                arrivals.setdefault(self.node, []).append((offer.peer_id, offer.seq, time.time()))
            if self.shadow is not None:
                self.shadow.admit(offer, data=data)
            return super().admit(offer, data=data, rate_limited=rate_limited)

        def amend(self, delta, *, data=None):
            if delta.peer_id in traced:  # a change sent as a delta (or a still-here)
                arrivals.setdefault(self.node, []).append((delta.peer_id, delta.seq, time.time()))
            if self.shadow is not None:
                self.shadow.amend(delta, data=data)
            refused = super().amend(delta, data=data)
            if refused == REFUSED_NO_BASE:  # the node asks the forwarder for the base (OfferGossip)
                failures["deltas that came before their base"] += 1
            return refused

    def bootstrap_addrs(k: int) -> tuple[str, ...]:
        names = sorted(os.listdir(addr_dir))
        if not names:
            return ()
        picks = {names[0]} if rng.random() < 0.34 else set()
        while len(picks) < min(k, len(names)):
            picks.add(rng.choice(names))
        return tuple((addr_dir / n).read_text() for n in picks)

    def host_config(bootstrap, *, server: bool) -> HostConfig:
        relief = {} if args.no_ip_relief else dict(
            max_connections_per_ip=100_000, connection_rate_per_ip=1e6, connection_burst_per_ip=1e6,
            max_pending_per_ip=64,
        )  # fmt: skip
        if args.degree:
            relief.update(gossip_degree=args.degree, gossip_degree_low=max(1, args.degree - 2),
                          gossip_degree_high=2 * args.degree)  # fmt: skip
        if args.heartbeat:
            relief.update(gossip_heartbeat_s=args.heartbeat)
        if args.watermarks:
            low, high = (int(x) for x in args.watermarks.split(","))
            relief.update(min_connections=min(low, 8), low_watermark=low, high_watermark=high,
                          max_connections=max(300, high))  # fmt: skip
        return HostConfig(bootstrap=bootstrap, dht_server=server, **relief)

    def tune(host: Network) -> None:
        if args.rate_limit is not None:  # after OfferGossip.run, which sets the offers topic's own
            host.set_topic_rate_limit(TOPIC, args.rate_limit)

    async def worker(k: int, nursery_task_status=trio.TASK_STATUS_IGNORED) -> None:
        identity = Identity.load(work / f"w{args.index}-{k}")
        models = [m for m, _ in MODELS]
        model = rng.choices(models, weights=[w for _, w in MODELS])[0]
        state = {
            "price": int(math.exp(rng.uniform(math.log(10), math.log(1000)))),
            "tps": round(rng.uniform(5, 120), 1),
            "ftt": round(rng.uniform(50, 2000), 1),
            "free": rng.randint(0, 4),
            "pending": None,
        }
        if rng.random() < 0.1:
            traced.add(identity.peer_id)
        host = Network(identity, host_config(bootstrap_addrs(3), server=True))
        engine = ScriptedEngine(slots=4, tick_s=0.005)
        async with trio.open_nursery() as nursery:
            began = time.time()
            await nursery.start(host.run)
            steps = {"host": time.time() - began}
            book = TracedBook()
            book.node = identity.peer_id
            book.host = host
            books.append(book)
            gossip = OfferGossip(host, book)
            await nursery.start(gossip.run)
            tune(host)
            steps["gossip"] = time.time() - began
            service = WorkerService(host, identity, {model: engine})
            service.install()

            def make_offer(seq: int, expires_at: float) -> Offer:
                if state["pending"] is not None:
                    changes.append((identity.peer_id, seq, state["pending"]))
                    state["pending"] = None
                return sign_offer(identity, Offer(
                    peer_id=identity.peer_id, addrs=host.advertised()[:8], payee="", binding=b"",
                    models=[ModelInfo(model, "scale-model", 4096, "Q4_K_M")], price_per_1k=state["price"],
                    chain_id=CHAIN_ID, escrow=ESCROW, slots_total=4, slots_free=state["free"],
                    tokens_per_s=state["tps"], first_token_ms=state["ftt"], hardware="AMD EPYC, 2 cores, 23 GB",
                    version="0.1.0", seq=seq, expires_at=expires_at, numerics="",
                ))  # fmt: skip

            advertiser = Advertiser(
                gossip, make_offer, interval_s=args.refresh, ttl_s=args.ttl, full_interval_s=args.full_every,
                full_for_every_newcomer=args.newcomer_flood == "every",
            )  # fmt: skip
            await nursery.start(advertiser.run)
            steps["advertiser"] = time.time() - began
            starts.append(steps)
            nursery.start_soon(provide, host, model)
            (addr_dir / f"{args.index}-{k}").write_text(host.addrs()[0])
            lifetimes[identity.peer_id] = [time.time(), math.inf]
            nursery_task_status.started()
            try:
                while True:
                    await trio.sleep(rng.expovariate(1 / args.change_every))
                    if rng.random() < 0.5:
                        state["free"] = rng.randint(0, 4)
                    else:
                        state["price"] = max(1, int(state["price"] * rng.uniform(0.8, 1.2)))
                    if state["pending"] is None and identity.peer_id in traced:
                        state["pending"] = time.time()
                    advertiser.changed()
            finally:
                lifetimes[identity.peer_id][1] = time.time()
                (addr_dir / f"{args.index}-{k}").unlink(missing_ok=True)

    async def provide(host: Network, model: str) -> None:
        try:
            if not await host.provide(model, timeout_s=30):
                failures["provider record taken by no DHT server"] += 1
        except Exception:
            failures["provider record failed"] += 1
            if failures["provider record failed"] <= 2:
                traceback.print_exc()

    async def requester(k: int) -> None:
        from node.app.requester import RequesterNode

        began = time.time()
        identity = Identity.load(work / f"r{args.index}-{k}")
        host = Network(identity, host_config(bootstrap_addrs(3), server=False))
        record: dict = {"t": began}
        reputation = Reputation()
        book = TracedBook(valued=reputation.valued)
        book.node = identity.peer_id
        book.shadow = OfferBook(max_offers=10**9, max_per_model=10**9, new_peers_per_s=1e9, new_peer_burst=1e9)
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await nursery.start(host.run)
                    lifetimes[identity.peer_id] = [time.time(), math.inf]
                    gossip = OfferGossip(host, book)
                    await nursery.start(gossip.run)
                    tune(host)
                    node = RequesterNode(host, gossip, reputation)
                    model = MODELS[0][0]
                    await node.wait_for_model(model, 20)
                    record["offers_at_start"] = len(book)
                    query = RouteQuery(model=model, chain_id=CHAIN_ID, escrow=ESCROW)
                    now = time.time()
                    full = rank(book.shadow.live(now), query, reputation, now)
                    capped = rank(book.live(now), query, reputation, now)
                    if not capped:
                        record["error"] = "no offer"
                    else:
                        top = {o.peer_id for o in full[: max(1, math.ceil(0.1 * len(full)))]}
                        record.update(
                            capped_top=capped[0].peer_id in top, full_top=full[0].peer_id in top if full else False,
                            full_size=len(full), capped_size=len(capped),
                            percentile=[o.peer_id for o in full].index(capped[0].peer_id) / len(full)
                            if capped[0].peer_id in {o.peer_id for o in full} else None,
                        )  # fmt: skip
                        observer = JobObserver()
                        await run_job(
                            host, lambda: book.live(time.time()), query, dataclasses.replace(SPEC, model=model),
                            reputation=reputation,
                            deadline_s=30, observer=observer, payer=FreePayer(),
                        )  # fmt: skip
                        record["first_job_s"] = time.time() - began
                    book_sizes.append(len(book))
                    await trio.sleep(5)
                    nursery.cancel_scope.cancel()
        except BaseException as err:  # noqa: BLE001 - a failed requester is a measurement, not a crash
            if isinstance(err, KeyboardInterrupt):
                raise
            while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
                err = err.exceptions[0]
            record["error"] = f"{err.__class__.__name__}: {str(err)[:120]}"
            if len(requesters) < 2:
                traceback.print_exception(err)
        finally:
            if identity.peer_id in lifetimes:
                lifetimes[identity.peer_id][1] = time.time()
        requesters.append(record)
        in_flight[0] -= 1

    async def main() -> None:
        n = args.nodes
        async with trio.open_nursery() as nursery:
            scopes: list[trio.CancelScope] = []

            async def start_worker(k: int) -> None:
                scope = trio.CancelScope()

                async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    with scope:
                        await worker(k, task_status)

                try:
                    with trio.fail_after(60):
                        await nursery.start(run)
                    scopes.append(scope)
                except Exception as err:  # noqa: BLE001
                    failures[f"worker start: {err.__class__.__name__}"] += 1
                    if failures[f"worker start: {err.__class__.__name__}"] <= 2:
                        traceback.print_exc()
                    scope.cancel()

            # join: node 0 of process 0 first, then everyone at a steady pace
            if args.index != 0:
                while not os.listdir(addr_dir):
                    await trio.sleep(0.1)
            pace = args.join_s / max(n, 1)
            for k in range(n):
                nursery.start_soon(start_worker, k)
                await trio.sleep(pace if k else max(pace, 0.5))
            await trio.sleep_until(trio.current_time() + max(0.0, steady_from - time.time()))
            socket0, pubsub0, up0 = counters["socket_bytes"], counters["pubsub_bytes"], len(scopes)
            conns0 = counters["pubsub_peers"]
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            next_k, r = n, 0
            churn_every = 60.0 / (args.churn * n) if args.churn > 0 else math.inf
            next_churn = time.time() + rng.uniform(0, min(churn_every, args.steady))
            next_req = time.time() + rng.uniform(0, args.requester_every)
            while time.time() < steady_to:
                now = time.time()
                if now >= next_churn and scopes:
                    scopes.pop(rng.randrange(len(scopes))).cancel()
                    nursery.start_soon(start_worker, next_k)
                    next_k += 1
                    next_churn += churn_every
                if now >= next_req:
                    in_flight[0] += 1
                    nursery.start_soon(requester, r)
                    r += 1
                    next_req += args.requester_every
                await trio.sleep(0.05)
            socket1, pubsub1 = counters["socket_bytes"], counters["pubsub_bytes"]
            new_conns = counters["pubsub_peers"] - conns0
            degree = [len(b.host.connected_peers()) for b in books if hasattr(b, "host")]
            with trio.move_on_after(70):  # the requesters started in the steady state finish (60 s at most)
                while in_flight[0]:
                    await trio.sleep(0.2)
            for book in books:
                book_sizes.append(len(book))
            size = statistics.median(book_sizes) if book_sizes else 0
            tracemalloc.start()
            sample = OfferBook(max_offers=10**9, max_per_model=10**9)
            live = [o for b in books for o in b.live(time.time())][: max(1, int(size))]
            before = tracemalloc.get_traced_memory()[0]
            for i, o in enumerate(live):
                sample.add(o.__class__(**{**o.__dict__, "peer_id": f"{o.peer_id}{i}"}))
            book_bytes = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            report = {
                "index": args.index, "workers": len(scopes), "workers_at_start": up0,
                "socket_bytes": socket1 - socket0, "pubsub_bytes": pubsub1 - pubsub0,
                "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss0_kb": rss0,
                "book_sizes": book_sizes, "book_bytes": book_bytes, "book_offers": len(live),
                "changes": [c for c in changes if in_steady(c[2])], "arrivals": arrivals, "lifetimes": lifetimes,
                "requesters": [q for q in requesters if in_steady(q["t"])], "failures": dict(failures),
                "rate_limited": RateLimitCounter.count, "starts": starts, "new_conns": new_conns,
                "conns_per_node": statistics.median(degree) if degree else 0,
                "empty_books": sum(1 for b in books if not b.live(time.time())),
                "cpu_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime
                + resource.getrusage(resource.RUSAGE_SELF).ru_stime,
            }  # fmt: skip
            (work / f"report-{args.index}.json").write_text(json.dumps(report, default=str))
            nursery.cancel_scope.cancel()

    if os.environ.get("SCALE_PROFILE"):  # development aid: where the node processes spend their time
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            trio.run(main)
        finally:
            profiler.disable()
            profiler.dump_stats(f"{os.environ['SCALE_PROFILE']}-{args.index}")
    else:
        trio.run(main)
    os._exit(0)  # skip the teardown of a thousand hosts: the measurement is written


# ----------------------------------------------------------------------------- the coordinator


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_size(size: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="llmarket-scale-") as tmp:
        join_s = args.join_s if args.join_s else max(10.0, size / 12)
        start = time.time() + 3
        per = [size // args.procs + (1 if i < size % args.procs else 0) for i in range(args.procs)]
        procs = []
        for i, n in enumerate(per):
            argv = [sys.executable, __file__, "--child", str(i), "--nodes", str(n), "--dir", tmp, "--start",
                    str(start), "--join-s", str(join_s)] + [a for a in args.passthrough]  # fmt: skip
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/err-{i}", "w")))
        deadline = start + join_s + args.settle + args.steady + 120
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        reports = []
        for i in range(args.procs):
            path = Path(tmp) / f"report-{i}.json"
            if args.verbose:
                print((Path(tmp) / f"err-{i}").read_text()[-60000:], file=sys.stderr)
            if path.exists():
                reports.append(json.loads(path.read_text()))
            else:
                err = (Path(tmp) / f"err-{i}").read_text()[-2000:]
                print(f"process {i} of size {size} wrote no report:\n{err}", file=sys.stderr)
        return summarise(size, reports, args)


def summarise(size: int, reports: list[dict], args: argparse.Namespace) -> dict:
    lifetimes: dict[str, list[float]] = {}
    arrivals: dict[str, list] = {}
    changes, reqs, sizes, starts = [], [], [], []
    fails: defaultdict[str, int] = defaultdict(int)
    for r in reports:
        lifetimes.update(r["lifetimes"])
        arrivals.update(r["arrivals"])
        changes += r["changes"]
        reqs += r["requesters"]
        sizes += r["book_sizes"]
        starts += r["starts"]
        for k, v in r["failures"].items():
            fails[k] += v
    # first sight, per node, of each traced peer's seqs
    seen: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for node, items in arrivals.items():
        for peer, seq, t in items:
            seen[(node, peer)].append((seq, t))
    delays, misses, per_change_p99 = [], 0, []
    for peer, seq, t in changes:
        mine = []
        for node, (up, down) in lifetimes.items():
            down = math.inf if down is None or down == "inf" else float(down)
            if node == peer or float(up) > t or down < t + PROPAGATION_WINDOW_S:
                continue
            reached = [ts for s, ts in seen.get((node, peer), ()) if s >= seq and ts >= t]
            if reached and min(reached) - t <= PROPAGATION_WINDOW_S:
                mine.append(min(reached) - t)
            else:
                misses += 1
                mine.append(math.inf)
        delays += [d for d in mine if math.isfinite(d)]
        if mine:
            per_change_p99.append(percentile(mine, 0.99))
    up = sum(r["workers"] for r in reports)
    steady = args.steady
    socket_bps = sum(r["socket_bytes"] for r in reports) / max(up, 1) / steady
    pubsub_bps = sum(r["pubsub_bytes"] for r in reports) / max(up, 1) / steady
    rss_per_node = sum(r["rss_kb"] for r in reports) * 1024 / max(up, 1)
    book_bytes = statistics.median([r["book_bytes"] / max(r["book_offers"], 1) for r in reports]) if reports else 0
    done = [q for q in reqs if "first_job_s" in q]
    judged = [q for q in reqs if "capped_top" in q]
    reached_total = len(delays) + misses
    return {
        "nodes": size, "up": up, "changes": len(changes), "samples": reached_total,
        "p50_ms": 1000 * percentile(delays, 0.5), "p99_ms": 1000 * percentile(delays + [math.inf] * misses, 0.99),
        "miss": misses / reached_total if reached_total else math.nan,
        "within_2s": sum(d <= 2.0 for d in delays) / reached_total if reached_total else math.nan,
        "socket_Bps": socket_bps, "pubsub_Bps": pubsub_bps,
        "book_median": statistics.median(sizes) if sizes else 0, "book_max": max(sizes, default=0),
        "book_bytes_per_offer": book_bytes, "rss_per_node": rss_per_node,
        "requesters": len(reqs), "first_job_p50_s": percentile([q["first_job_s"] for q in done], 0.5),
        "first_job_max_s": max((q["first_job_s"] for q in done), default=math.nan),
        "failed_requesters": len(reqs) - len(done),
        "requester_errors": sorted({q["error"] for q in reqs if "error" in q})[:5],
        "capped_top10": sum(q["capped_top"] for q in judged) / len(judged) if judged else math.nan,
        "full_top10": sum(q["full_top"] for q in judged) / len(judged) if judged else math.nan,
        "full_size": statistics.median([q["full_size"] for q in judged]) if judged else 0,
        "rate_limited": sum(r["rate_limited"] for r in reports), "empty_books": sum(r["empty_books"] for r in reports),
        "failures": dict(fails), "cpu_s": sum(r["cpu_s"] for r in reports),
        "new_conns_per_node_s": sum(r["new_conns"] for r in reports) / max(up, 1) / steady,
        "conns_per_node": statistics.median([r["conns_per_node"] for r in reports]) if reports else 0,
        "worker_start_s": {step: (percentile([x[step] for x in starts], 0.5), max((x[step] for x in starts), default=0))
                           for step in ("host", "gossip", "advertiser")},
    }  # fmt: skip


def print_table(rows: list[dict]) -> None:
    print("| nodes (up) | propagation p50 / p99 | reached in 2 s / missed | bytes/node/s: all / GossipSub "
          "| book: median (max) offers | market state / RSS per node | first job p50 (max) | "
          "top 10%: capped / full | failures |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fails = [f"{r['failed_requesters']}/{r['requesters']} requesters"]
        if r["rate_limited"]:
            fails.append(f"{r['rate_limited']} GossipSub rate-limit drops")
        if r["empty_books"]:
            fails.append(f"{r['empty_books']} empty books")
        fails += [f"{v} {k}" for k, v in r["failures"].items()]
        print(
            f"| {r['nodes']} ({r['up']}) | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} ms ({r['changes']} changes) "
            f"| {r['within_2s']:.1%} / {r['miss']:.1%} "
            f"| {r['socket_Bps'] / 1000:.1f} KB / {r['pubsub_Bps'] / 1000:.1f} KB "
            f"| {r['book_median']:.0f} ({r['book_max']}) "
            f"| {r['book_median'] * r['book_bytes_per_offer'] / 1e6:.2f} MB / {r['rss_per_node'] / 1e6:.1f} MB "
            f"| {r['first_job_p50_s']:.2f} s ({r['first_job_max_s']:.2f} s) "
            f"| {r['capped_top10']:.0%} / {r['full_top10']:.0%} (of {r['full_size']:.0f}) "
            f"| {'; '.join(fails)} |"
        )
        if r["requester_errors"]:
            print(f"|   | requester errors: {'; '.join(r['requester_errors'])} |||||||| ")


def routing(
    sizes: tuple[int, ...] = (1_000, 10_000), repeats: int = 50
) -> list[tuple[int, float, float, float, float]]:
    """A routing decision over n live offers for one model, a third of the peers with a measured round trip, one
    peer's record changed before each decision (as a job's outcome changes it). Timed: what ``run_job`` asks
    before each attempt, ``best_offer(book.live(now), ...)`` (the book's columns), and the reference
    ``rank(offers, ..., limit=1)`` over a list; they must choose alike. (n, median ms, p90 ms, the reference's)."""
    from node.market.offers import OfferBook, best_offer
    from node.market.routing import Reputation, RouteQuery, rank
    from node.protocol.messages import ModelInfo, Offer

    model = MODELS[0][0]
    rows = []
    for n in sizes:
        base = Offer(
            peer_id="", addrs=[], payee="", binding=b"", models=[ModelInfo(model, "m", 4096)], price_per_1k=0,
            chain_id=CHAIN_ID, escrow=ESCROW, slots_total=4, slots_free=1, tokens_per_s=100.0, first_token_ms=10.0,
            hardware="", version="", seq=1, expires_at=time.time() + 3600,
        )  # fmt: skip
        offers = [
            dataclasses.replace(base, peer_id=f"peer{i:05d}", price_per_1k=1 + i % 17, tokens_per_s=50.0 + i % 90,
                                first_token_ms=50.0 + i % 300, slots_free=i % 3)
            for i in range(n)
        ]  # fmt: skip
        book = OfferBook(max_offers=n, max_per_model=n)
        for offer in offers:
            book.add(offer, data=b"")
        reputation = Reputation()
        for i in range(0, n, 3):
            reputation.latency(f"peer{i:05d}", float(i % 40))
        query = RouteQuery(model=model, chain_id=CHAIN_ID, escrow=ESCROW)
        times, reference = [], []
        for k in range(repeats):
            reputation.latency(f"peer{(7 * k) % n:05d}", float(k % 40))
            started = time.perf_counter()
            best_offer(book.live(time.time()), query, reputation, time.time())
            times.append(1000 * (time.perf_counter() - started))
        for _ in range(repeats):
            started = time.perf_counter()
            ranked = rank(offers, query, reputation, time.time(), limit=1)
            reference.append(1000 * (time.perf_counter() - started))
        chosen = best_offer(book.live(time.time()), query, reputation, time.time())
        assert chosen == ranked[0], "the book's columns chose another worker than rank"
        rows.append((n, statistics.median(times), percentile(times, 0.9), statistics.median(reference),
                     percentile(reference, 0.9)))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,300,1000", help="comma-separated node counts")
    parser.add_argument("--procs", type=int, default=2, help="processes the nodes are split between")
    parser.add_argument("--join-s", type=float, default=0.0, help="seconds over which nodes join (default N/12)")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds between the last join and measuring")
    parser.add_argument("--steady", type=float, default=60.0, help="seconds of steady state measured")
    parser.add_argument("--json", action="store_true", help="also print each row as JSON")
    parser.add_argument("--verbose", action="store_true", help="show the node processes' errors")
    parser.add_argument("--routing", action="store_true", help="only time routing at 1,000 and 10,000 offers")
    # passed to the processes that run the nodes
    parser.add_argument("--change-every", type=float, default=60.0, help="mean seconds between a worker's changes")
    parser.add_argument("--churn", type=float, default=0.05, help="share of workers replaced per minute")
    parser.add_argument("--requester-every", type=float, default=4.0, help="seconds between requesters, per process")
    parser.add_argument("--refresh", type=float, default=10.0, help="Advertiser interval (llmarket serve: 10 s)")
    parser.add_argument("--ttl", type=float, default=30.0, help="offer lifetime (llmarket serve: 30 s)")
    parser.add_argument(
        "--full-every",
        type=float,
        default=300.0,
        help="seconds between full offers; deltas in between (Advertiser: 300 s)",
    )
    parser.add_argument(
        "--newcomer-flood",
        choices=("every", "first"),
        default="first",
        help="a worker publishes its full offer for its first topic neighbours only (Advertiser's default), "
        "or for every new one",
    )
    parser.add_argument("--degree", type=int, default=0, help="GossipSub mesh degree D (0: the host's, 6)")
    parser.add_argument("--heartbeat", type=int, default=0, help="seconds between GossipSub heartbeats (0: the host's)")
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        help="GossipSub offers/s one peer may forward (default: the offers topic's, 1000)",
    )
    parser.add_argument("--watermarks", default="", help="connection watermarks LOW,HIGH (default: the host's)")
    parser.add_argument("--no-ip-relief", action="store_true", help="keep the per-IP inbound limits on loopback")
    parser.add_argument("--seed", type=int, default=1)
    # internal
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        args.index = args.child
        args.join_s = args.join_s or 10.0
        child(args)
        return
    args.passthrough = [
        "--settle", str(args.settle), "--steady", str(args.steady), "--change-every", str(args.change_every),
        "--churn", str(args.churn), "--requester-every", str(args.requester_every), "--refresh", str(args.refresh),
        "--ttl", str(args.ttl), "--full-every", str(args.full_every), "--newcomer-flood", args.newcomer_flood,
        "--degree", str(args.degree), "--heartbeat", str(args.heartbeat), "--seed", str(args.seed),
    ] + (["--rate-limit", str(args.rate_limit)] if args.rate_limit is not None else []) + (
        ["--watermarks", args.watermarks] if args.watermarks else []
    ) + (
        ["--no-ip-relief"] if args.no_ip_relief else []
    )  # fmt: skip
    print(f"# {os.cpu_count()} CPUs, load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.routing:
        print("| live offers | routing decision (book columns), median (p90) of 50 | `rank` over a list | target |")
        print("|---:|---|---|---|")
        for n, median, p90, ref_median, ref_p90 in routing():
            print(f"| {n:,} | {median:.3f} ms ({p90:.3f} ms) | {ref_median:.2f} ms ({ref_p90:.2f} ms) | < 1 ms |")
        print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        started = time.time()
        row = run_size(size, args)
        row["wall_s"] = time.time() - started
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    print_table(rows)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = ", ".join(f"{r['nodes']}: {r['cpu_s']:.0f} s in {r['wall_s']:.0f} s" for r in rows)
    print(f"# load average after: {load}; CPU time of the node processes (size: CPU in wall): {cpu}")


if __name__ == "__main__":
    main()
