"""A test-only worker process: ``llmarket serve`` with a scripted engine instead of llama.cpp.

    python -m tests.scripted_worker --data-dir DIR [--bootstrap MULTIADDR] [--listen MULTIADDR]
        [--no-relay] [--no-mdns] [--model NAME] [--words N] [--word-bytes B] [--tick S]

It is composed like ``node.app.worker.serve`` (a ``Network``: a host with AutoNAT, relay and
DCUtR, ``OfferGossip`` with an ``Advertiser``, a ``WorkerService``, and
``net-status.json`` in the data dir every 5 s) and talks like the CLI's
``serve``: "bootstrap others with:" on stderr, then its multiaddrs one per line
on stdout, then "reachable: …" lines on stderr, and each job logged on stderr
("job … accepted (direct connection)"). Only the engine differs: a
``tests.factories.ScriptedEngine`` that streams ``scripted_text`` one word
(token) every ``--tick`` seconds, so a job's length and pace are whatever a
test needs, and it starts in a second with no model to load.

For tests, it also keeps the offers in its book in ``<data dir>/offers.json`` (rewritten within half
a second of a change), so a test can see when an offer reached it without starting a ``peers`` process.

The model it offers is a made-up CID derived from ``--model`` (``scripted_model_cid``),
so it never answers requests for a real model; ``request --model <that CID>`` reaches it.
Run it from the repository root (it imports ``tests.factories``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import trio

from node import __version__
from node.app.worker import publish_net_status
from node.cli.common import bootstrap_flag, network_config
from node.cli.market import report_reachability
from node.concurrency import open_service_nursery
from node.market.jobs import WorkerService
from node.market.offers import MAX_ADDRS, Advertiser, OfferBook, OfferGossip, sign_offer
from node.models.cid import CID, CODEC_RAW
from node.net.identity import Identity
from node.net.network import Network
from node.protocol.messages import ModelInfo, Offer
from tests.factories import ScriptedEngine

CONTEXT_SIZE = 1 << 20  # tokens: a scripted job of any length fits
FILLER = "the market keeps streaming scripted text through the lab so that long jobs can be measured. "


def scripted_model_cid(name: str = "scripted") -> str:
    """The CID a scripted worker started with ``--model name`` offers (a raw-leaf CID of a made-up block)."""
    return str(CID.v1(CODEC_RAW, hashlib.sha256(f"llmarket scripted test model: {name}".encode()).digest()))


def scripted_words(words: int, word_bytes: int) -> list[str]:
    """The tokens a scripted worker streams: ``[00000] the market …``, each exactly ``word_bytes`` ASCII bytes."""
    out = []
    for i in range(words):
        head = f"[{i:05d}] "
        body = (FILLER * (word_bytes // len(FILLER) + 1))[: max(word_bytes - len(head), 0)]
        out.append((head + body)[:word_bytes])
    return out


def scripted_text(words: int, word_bytes: int) -> str:
    """The whole answer to a job with ``max_tokens`` ≥ ``words``."""
    return "".join(scripted_words(words, word_bytes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.scripted_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, metavar="DIR", help="keys and net-status.json")
    bootstrap_flag(parser, worker=True)
    parser.add_argument("--model", default="scripted", metavar="NAME", help="offers scripted_model_cid(NAME)")
    parser.add_argument("--words", type=int, default=20, metavar="N", help="tokens in a whole answer")
    parser.add_argument("--word-bytes", type=int, default=16, metavar="B", help="bytes per token")
    parser.add_argument("--tick", type=float, default=0.02, metavar="S", help="seconds per token")
    parser.add_argument("--slots", type=int, default=1, metavar="N")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir)
    identity = Identity.load(data_dir)
    host = Network(identity, network_config(args, dht_server=True))
    engine = ScriptedEngine(
        slots=args.slots, tick_s=args.tick, words=scripted_words(args.words, args.word_bytes), n_ctx=CONTEXT_SIZE
    )
    model = ModelInfo(scripted_model_cid(args.model), f"scripted-{args.model}", CONTEXT_SIZE, "none")
    async with open_service_nursery() as nursery:
        await nursery.start(host.run)
        gossip = OfferGossip(host, OfferBook())
        await nursery.start(gossip.run)
        service = WorkerService(host, identity, {model.cid: engine})

        def make_offer(seq: int, expires_at: float) -> Offer:
            return sign_offer(
                identity,
                Offer(
                    peer_id=identity.peer_id,
                    addrs=host.advertised()[:MAX_ADDRS],
                    payee=identity.payee,
                    binding=identity.binding,
                    models=[model],
                    price_per_1k=0,
                    chain_id=0,
                    escrow="",
                    slots_total=engine.slots,
                    slots_free=service.free_slots,
                    tokens_per_s=round(1 / max(args.tick, 1e-3), 1),
                    first_token_ms=round(max(1000 * args.tick, 1.0), 1),
                    hardware="scripted test engine",
                    version=__version__,
                    seq=seq,
                    expires_at=expires_at,
                ),
            )

        advertiser = Advertiser(gossip, make_offer)
        service.on_slots_changed = advertiser.changed
        service.install()
        await nursery.start(advertiser.run)
        nursery.start_soon(publish_net_status, host, data_dir)
        print(f"serving {model.name} ({model.cid}): {args.words} tokens of {args.word_bytes} bytes, "
              f"one every {args.tick}s", file=sys.stderr)  # fmt: skip
        print("bootstrap others with:", file=sys.stderr, flush=True)
        for addr in host.addrs():
            print(addr, flush=True)
        nursery.start_soon(report_reachability, host)
        await keep_book_file(gossip, data_dir / BOOK_FILE)


#: Where a scripted worker keeps the live offers of its book, for tests (a list of ``Offer`` fields as JSON).
BOOK_FILE = "offers.json"


async def keep_book_file(gossip: OfferGossip, path: Path) -> None:
    """Rewrite ``path`` with the book's live offers whenever they change (checked every half second)."""
    written = None
    while True:
        offers = sorted((dataclasses.asdict(o) for o in gossip.book.live(time.time())), key=lambda o: o["peer_id"])
        text = json.dumps(offers, default=lambda value: value.hex() if isinstance(value, bytes) else str(value))
        if text != written:
            partial = path.with_suffix(".partial")
            partial.write_text(text)
            partial.replace(path)
            written = text
        await trio.sleep(0.5)  # polling interval: the book has an event for new offers, not for expiries


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
    for name in ("node.market.jobs", "node.net.nat", "node.net.autonat", "node.net.relay", "node.net.dcutr"):
        log = logging.getLogger(name)
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    started = time.monotonic()
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        print(f"scripted worker: interrupted after {time.monotonic() - started:.1f}s", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
