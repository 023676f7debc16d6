"""Market benchmarks, in one process on 127.0.0.1 (real libp2p, real GossipSub).

    .venv/bin/python bench/market.py

1. Offer propagation: 10 nodes (each bootstrapping from the previous one, a chain,
   the worst case for hops); node 0 publishes an offer; the time until all 10 books
   hold it. Median of 5 offers. Target: under 1 s.
2. Routing: over 1,000 live offers with reputation for a third of them, the
   decision `run_job` makes before each attempt (`rank(..., limit=1)`: filter, score,
   pick the best) and, for reference, the full ordering. Median of 200. Target: a
   decision under 1 ms.
3. Model transfer between two peers: the 98 MB default model fetched with
   `PeerSource` into an empty cache (every block verified), against the raw ceiling:
   the same number of bytes written through one libp2p stream in 256 KiB pieces and
   read on the other side. Median of 3 each, alternating.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging  # noqa: E402

from node.market.offers import OfferBook, OfferGossip, sign_offer  # noqa: E402
from node.market.routing import Reputation, RouteQuery, rank  # noqa: E402
from node.models.default import default_model_file  # noqa: E402
from node.models.peers import ModelServer, PeerSource  # noqa: E402
from node.models.store import ModelStore  # noqa: E402
from node.net.identity import Identity  # noqa: E402
from node.net.network import Network  # noqa: E402
from node.protocol.messages import ModelInfo, Offer  # noqa: E402

logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def offer(identity: Identity, seq: int, **changes) -> Offer:
    base = Offer(
        peer_id=identity.peer_id, addrs=[], payee="", binding=b"", models=[ModelInfo("bafybench", "m", 2048)],
        price_per_1k=0, chain_id=0, escrow="", slots_total=1, slots_free=1, tokens_per_s=100.0,
        first_token_ms=10.0, hardware="", version="", seq=seq, expires_at=time.time() + 60,
    )  # fmt: skip
    return sign_offer(identity, base.__class__(**{**base.__dict__, **changes}))


async def propagation(root: Path) -> list[float]:
    times = []
    async with trio.open_nursery() as nursery:
        nodes = []
        for i in range(10):
            host = Network(Identity.load(root / f"n{i}"))
            host.config = host.config.__class__(bootstrap=tuple(nodes[-1][0].addrs()) if nodes else ())
            await nursery.start(host.run)
            gossip = OfferGossip(host, OfferBook())
            await nursery.start(gossip.run)
            nodes.append((host, gossip))
        publisher_host, publisher = nodes[0]
        await trio.sleep(2)  # let the GossipSub mesh form (heartbeat 1 s) before measuring
        for seq in range(1, 6):
            sent = time.perf_counter()
            await publisher.publish(offer(publisher_host.identity, seq))
            for _, gossip in nodes[1:]:
                await gossip.wait_for(
                    lambda live, seq=seq: any(o.peer_id == publisher_host.peer_id and o.seq == seq for o in live)
                )
            times.append(time.perf_counter() - sent)
            await trio.sleep(1.1)  # stay under GossipSub's per-peer rate limit
        nursery.cancel_scope.cancel()
    return times


def routing(root: Path) -> list[float]:
    identity = Identity.load(root / "r")
    template = offer(identity, 1)
    offers = [
        template.__class__(**{**template.__dict__, "peer_id": f"peer{i:04d}", "price_per_1k": i % 17,
                              "tokens_per_s": 50.0 + i % 90})
        for i in range(1000)
    ]  # fmt: skip
    rep = Reputation()
    for i in range(0, 1000, 3):
        rep.latency(f"peer{i:04d}", float(i % 40))
    query = RouteQuery(model="bafybench")
    decision, full = [], []
    for _ in range(200):
        started = time.perf_counter()
        rank(offers, query, rep, time.time(), limit=1)  # what run_job asks for each attempt
        decision.append(time.perf_counter() - started)
        started = time.perf_counter()
        rank(offers, query, rep, time.time())
        full.append(time.perf_counter() - started)
    return decision, full


async def transfer(root: Path) -> tuple[list[float], list[float], int]:
    model = default_model_file()
    size = model.stat().st_size
    raw_times, fetch_times = [], []
    async with trio.open_nursery() as nursery:
        server, client = Network(Identity.load(root / "s")), Network(Identity.load(root / "c"))
        await nursery.start(server.run)
        await nursery.start(client.run)
        store = ModelStore(root / "server-models")
        held = store.add_file(model)
        ModelServer(server, store).install()
        piece = b"\0" * (256 * 1024)

        async def sink(stream) -> None:
            while await stream.read(1 << 20):
                pass

        server.set_handler("/bench/raw/1", sink)
        for run in range(3):
            stream = await client.open_stream(server.peer_id, "/bench/raw/1", server.addrs())
            started = time.perf_counter()
            for _ in range(size // len(piece)):
                await stream.write(piece)
            await stream.close()
            raw_times.append(time.perf_counter() - started)
            target = ModelStore(root / f"client-{run}", [PeerSource(client, server.peer_id, server.addrs())])
            started = time.perf_counter()
            await trio.to_thread.run_sync(target.fetch, held.cid)
            fetch_times.append(time.perf_counter() - started)
        nursery.cancel_scope.cancel()
    return raw_times, fetch_times, size


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prop = trio.run(propagation, root)
        decision, full = routing(root)
        raw, fetched, size = trio.run(transfer, root)
    rows = [
        (
            "offer reaches all 10 nodes (chain of bootstraps), median of 5",
            f"{1000 * statistics.median(prop):.0f} ms",
            "< 1 s",
        ),
        (
            "routing decision (best of 1,000 offers), median of 200",
            f"{1000 * statistics.median(decision):.2f} ms",
            "< 1 ms",
        ),
        ("full ranking of 1,000 offers, median of 200", f"{1000 * statistics.median(full):.2f} ms", ""),
    ]
    raw_rate, fetch_rate = size / 1e6 / statistics.median(raw), size / 1e6 / statistics.median(fetched)
    rows.append(("raw libp2p stream, one way, 256 KiB writes", f"{raw_rate:.0f} MB/s", "ceiling"))
    rows.append(
        ("verified model transfer from a peer (98 MB)", f"{fetch_rate:.0f} MB/s ({fetch_rate / raw_rate:.0%})", "")
    )
    print("| measurement | result | target |")
    print("|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
