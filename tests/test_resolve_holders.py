"""A new worker without the model looks for holders until its deadline, tries each, and names the ones it tried
(node/app/worker.py ``_resolve``); a model fetched by CID takes the name its holders advertise."""

from __future__ import annotations

import logging
import time

import pytest
import trio

from node.app.config import WorkerConfig
from node.app.worker import _resolve, market_name
from node.errors import ModelError
from node.market.offers import OfferBook, OfferGossip
from node.models.peers import ModelServer
from node.models.store import ModelStore
from node.net.identity import Identity
from node.net.network import Network
from node.progress import NO_PROGRESS
from node.protocol.messages import ModelInfo

from .factories import offer, signed_offer
from .test_model_peers import fake_gguf

NAME = "Tiny-Model.Q4_1"


async def _stale_holder(nursery, tmp_path, name: str, cid: str):
    """A holder that has stopped: its host ran, then ended, and its signed offer lives on in books."""
    identity = Identity.load(tmp_path / name)
    host = Network(identity)
    life = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with life:
            await host.run(task_status=task_status)

    await nursery.start(run)
    addrs = host.addrs()
    life.cancel()
    return signed_offer(
        identity, 1, time.time() + 60, addrs=addrs, models=[ModelInfo(cid, NAME, 2048, "Q4_1")], slots_free=1
    )


async def _live_holder(nursery, tmp_path, model_file):
    identity = Identity.load(tmp_path / "live")
    host = Network(identity)
    await nursery.start(host.run)
    store = ModelStore(tmp_path / "live-models")
    held = store.add_file(model_file)
    ModelServer(host, store).install()
    return held, signed_offer(
        identity, 1, time.time() + 60, addrs=host.addrs(), models=[ModelInfo(held.cid, NAME, 2048, "Q4_1")]
    )


async def _newcomer(nursery, tmp_path):
    host = Network(Identity.load(tmp_path / "new"))
    await nursery.start(host.run)
    return OfferGossip(host, OfferBook())  # offers are filed by the test, as gossip would file them


def _arrives(gossip: OfferGossip, *offers) -> None:
    for o in offers:
        assert gossip.book.add(o)
    gossip._kept()  # what gossip does when it keeps an offer: wake whoever waits for offers


async def test_a_stale_holder_is_tried_then_a_live_one_found_later_wins(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="node.models.store")
    model_file = fake_gguf(tmp_path / "tiny.gguf", 300_000)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            held, live = await _live_holder(nursery, tmp_path, model_file)
            stale = await _stale_holder(nursery, tmp_path, "stale", held.cid)
            gossip = await _newcomer(nursery, tmp_path)
            store = ModelStore.in_data_dir(tmp_path / "new")  # no IPFS daemon: only peers have it
            config = WorkerConfig(data_dir=tmp_path / "new", model=held.cid, peer_discovery_s=30)
            _arrives(gossip, stale)  # the stopped worker's offer is all the book holds at first

            async def live_offer_arrives_once_the_stale_holder_failed():
                while not any(stale.peer_id[:16] in r.getMessage() for r in caplog.records):
                    await trio.sleep(0.01)  # polling interval
                _arrives(gossip, live)

            nursery.start_soon(live_offer_arrives_once_the_stale_holder_failed)
            entry = await _resolve(config, store, gossip, NO_PROGRESS)
            nursery.cancel_scope.cancel()
    assert entry.cid == held.cid and entry.path.read_bytes() == model_file.read_bytes()
    assert entry.source == f"peer {live.peer_id[:16]}…"
    assert entry.name == NAME  # the name its holder advertised, not the CID
    assert store.get(held.cid).name == NAME


async def test_when_no_holder_delivers_the_one_line_error_names_each_one_tried(tmp_path):
    cid = ModelStore(tmp_path / "m").add_file(fake_gguf(tmp_path / "x.gguf", 5000)).cid
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            first = await _stale_holder(nursery, tmp_path, "gone-1", cid)
            second = await _stale_holder(nursery, tmp_path, "gone-2", cid)
            gossip = await _newcomer(nursery, tmp_path)
            store = ModelStore.in_data_dir(tmp_path / "new")
            config = WorkerConfig(data_dir=tmp_path / "new", model=cid, peer_discovery_s=3)
            _arrives(gossip, first)

            async def second_arrives_later():
                await trio.sleep(0.3)  # a second offer, while the worker is still looking
                _arrives(gossip, second)

            nursery.start_soon(second_arrives_later)
            with pytest.raises(ModelError) as failure:
                await _resolve(config, store, gossip, NO_PROGRESS)
            message = str(failure.value)
            with pytest.raises(ModelError, match=f"and no peer offered {cid} within 0s"):
                await _resolve(
                    WorkerConfig(data_dir=tmp_path / "new", model=cid, peer_discovery_s=0),
                    store,
                    await _newcomer(nursery, tmp_path / "empty"),
                    NO_PROGRESS,
                )
            nursery.cancel_scope.cancel()
    assert "\n" not in message and f"no peer delivered {cid} within 3s; tried 2: " in message
    assert f"peer {first.peer_id[:16]}… (" in message and f"peer {second.peer_id[:16]}… (" in message
    assert store.get(cid) is None


def test_the_market_name_is_the_most_common_one_and_never_a_cid():
    info = lambda name: [ModelInfo("bafycid", name, 2048)]  # noqa: E731
    offers = [offer("a", models=info("bafycid")), offer("b", models=info("Zed")), offer("c", models=info("Alpha"))]
    assert market_name(offers, "bafycid") == "Alpha"  # a tie: the first in order
    assert market_name([*offers, offer("d", models=info("Zed"))], "bafycid") == "Zed"
    assert market_name(offers[:1], "bafycid") == "" and market_name(offers, "bafyother") == ""
