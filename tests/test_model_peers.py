"""Models fetched from another peer over /llmarket/model/1.0.0, verified like any source."""

from __future__ import annotations

import random

import pytest
import trio

from node.errors import ModelError
from node.models.cid import CHUNK_SIZE
from node.models.peers import ModelServer, PeerSource
from node.models.store import ModelStore
from node.net.identity import Identity
from node.net.network import Network


def fake_gguf(path, size):
    path.write_bytes(b"GGUF" + random.Random(size).randbytes(size - 4))
    return path


async def _pair(nursery, tmp_path):
    server_host, client_host = Network(Identity.load(tmp_path / "server")), Network(Identity.load(tmp_path / "client"))
    await nursery.start(server_host.run)
    await nursery.start(client_host.run)
    server_store = ModelStore(tmp_path / "server-models")
    ModelServer(server_host, server_store).install()
    return server_host, server_store, client_host


@pytest.mark.parametrize("size, version", [(3 * CHUNK_SIZE + 99, 1), (3 * CHUNK_SIZE + 99, 0), (5000, 1), (5000, 0)])
async def test_a_model_comes_from_a_peer_verified(tmp_path, size, version):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server_host, server_store, client_host = await _pair(nursery, tmp_path)
            held = server_store.add_file(fake_gguf(tmp_path / "m.gguf", size), cid_version=version)
            client_store = ModelStore(
                tmp_path / "client-models", [PeerSource(client_host, server_host.peer_id, server_host.addrs())]
            )
            fetched = await trio.to_thread.run_sync(client_store.fetch, held.cid)
            nursery.cancel_scope.cancel()
    assert fetched.path.read_bytes() == held.path.read_bytes()
    assert fetched.source.startswith("peer ")


async def test_a_peer_serving_bad_bytes_is_caught(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server_host, server_store, client_host = await _pair(nursery, tmp_path)
            held = server_store.add_file(fake_gguf(tmp_path / "m.gguf", 4 * CHUNK_SIZE))
            source = PeerSource(client_host, server_host.peer_id, server_host.addrs())
            client_store = ModelStore(tmp_path / "client-models", [source])
            # the server builds its plan from the good file, then its copy rots
            await trio.to_thread.run_sync(
                source.get_block, __import__("node.models.cid").models.cid.parse_cid(held.cid)
            )
            with open(held.path, "r+b") as f:
                f.seek(2 * CHUNK_SIZE + 7)
                f.write(b"\xff")
            with pytest.raises(ModelError, match=r"peer .* sent a bad block .* do not hash to its CID"):
                await trio.to_thread.run_sync(client_store.fetch, held.cid)
            assert client_store.list() == []
            missing = ModelStore(tmp_path / "other", [source])
            with pytest.raises(ModelError, match="does not have block"):
                await trio.to_thread.run_sync(
                    missing.fetch, "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
                )
            nursery.cancel_scope.cancel()
