"""The model cache: nothing unverified is ever visible under a CID, and nothing is lost."""

from __future__ import annotations

import io
import os
import random

import pytest

from node.errors import ModelError, ModelNotFound
from node.models import resolve_model
from node.models.cid import CID, file_cid, parse_cid
from node.models.dag import DagAssembler
from node.models.default import DEFAULT_MODEL_CID, DEFAULT_MODEL_NAME
from node.models.store import ModelStore


def fake_gguf(path, size=600_000, seed=1):
    path.write_bytes(b"GGUF" + random.Random(seed).randbytes(size - 4))
    return path


def test_add_hashes_copies_and_lists(tmp_path):
    src = fake_gguf(tmp_path / "tiny.gguf")
    store = ModelStore(tmp_path / "models")
    entry = store.add_file(src)
    with open(src, "rb") as f:
        assert entry.cid == str(file_cid(f, 1))
    assert entry.path.read_bytes() == src.read_bytes() and entry.name == "tiny" and entry.size == 600_000
    assert store.list() == [entry] and store.get(entry.cid) == entry
    v0 = store.add_file(src, cid_version=0, name="tiny-v0")
    assert v0.cid.startswith("Qm") and {e.cid for e in store.list()} == {entry.cid, v0.cid}
    assert store.add_file(src) == entry  # adding again changes nothing


def test_non_gguf_files_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelError, match=r"is not a GGUF model \(it starts with b'hell'"):
        store.add_file(text)
    with pytest.raises(ModelError, match="is not a file"):
        store.add_file(tmp_path / "missing.gguf")
    assert store.list() == []


def test_remove_and_missing_models(tmp_path):
    store = ModelStore(tmp_path / "models")
    entry = store.add_file(fake_gguf(tmp_path / "a.gguf"))
    assert store.remove(entry.cid) == entry
    assert store.get(entry.cid) is None and store.list() == []
    with pytest.raises(ModelNotFound, match="not in the cache"):
        store.remove(entry.cid)
    with pytest.raises(ModelNotFound, match="no source is configured"):
        store.fetch(entry.cid)


def test_verify_catches_a_file_changed_on_disk(tmp_path):
    store = ModelStore(tmp_path / "models")
    entry = store.add_file(fake_gguf(tmp_path / "a.gguf"))
    assert store.verify(entry.cid) == entry
    with open(entry.path, "r+b") as f:
        f.seek(300_000)
        f.write(b"\xff")
    with pytest.raises(ModelError, match="corrupt on disk"):
        store.verify(entry.cid)
    with pytest.raises(ModelError, match="corrupt on disk"):
        resolve_model(store, entry.cid)


class BrokenSource:
    """Writes half the file, then fails the way a bad peer or daemon does."""

    name = "broken source"

    def __init__(self, data: bytes):
        self.data = data

    def fetch(self, cid, fd, progress=None):
        os.write(fd, self.data[: len(self.data) // 2])
        raise ModelError("broken source sent a bad block")


class GoodSource:
    name = "good source"

    def __init__(self, data: bytes):
        self.data = data

    def fetch(self, cid, fd, progress=None):
        os.write(fd, self.data)
        return len(self.data)


def test_a_failed_source_leaves_nothing_and_the_next_source_is_tried(tmp_path):
    data = b"GGUF" + random.Random(3).randbytes(400_000)
    cid = file_cid(io.BytesIO(data), 1)
    store = ModelStore(tmp_path / "models", [BrokenSource(data)])
    with pytest.raises(ModelError, match="could not fetch .*broken source sent a bad block"):
        store.fetch(cid)
    assert store.get(cid) is None and list((tmp_path / "models" / ".staging").iterdir()) == []
    store.sources.append(GoodSource(data))
    assert store.fetch(cid).source == "good source"


def test_bytes_that_do_not_hash_to_the_cid_are_never_stored(tmp_path):
    """Even a source that skips block verification cannot get wrong bytes under a CID."""
    data = b"GGUF" + random.Random(4).randbytes(10_000)
    cid = file_cid(io.BytesIO(data), 1)
    store = ModelStore(tmp_path / "models", [GoodSource(data[:-1] + b"x")])
    with pytest.raises(ModelError, match="could not fetch"):
        store.fetch(cid)
    assert store.list() == []


def test_staging_of_dead_processes_is_swept(tmp_path):
    store = ModelStore(tmp_path / "models")
    dead = tmp_path / "models" / ".staging" / "999999999-abc"
    dead.mkdir()
    (dead / "model").write_bytes(b"partial")
    mine = tmp_path / "models" / ".staging" / f"{os.getpid()}-live"
    mine.mkdir()
    ModelStore(store.root)
    assert not dead.exists() and mine.exists()


def test_dag_assembler_refuses_blocks_it_did_not_ask_for(tmp_path):
    root = parse_cid(DEFAULT_MODEL_CID)
    with open(tmp_path / "out", "wb") as f:
        assembler = DagAssembler(root, f.fileno(), "test source")
        stranger = CID.v1(0x55, bytes(32))
        with pytest.raises(ModelError, match="not part of this file"):
            assembler.feed(stranger, b"")
        with pytest.raises(ModelError, match="do not hash to its CID"):
            assembler.feed(root, b"not the root block")


def test_resolve_model_names(tmp_path, default_model_file):
    store = ModelStore(tmp_path / "models")
    entry = resolve_model(store, "default")
    assert (entry.cid, entry.name) == (DEFAULT_MODEL_CID, DEFAULT_MODEL_NAME)
    assert resolve_model(store, DEFAULT_MODEL_CID) == entry  # by CID, from the cache
    local = resolve_model(store, str(fake_gguf(tmp_path / "x.gguf")))
    assert store.get(local.cid) == local
    with pytest.raises(ModelError, match="is not 'default', a CID"):
        resolve_model(store, "gpt-4")
    with pytest.raises(ModelError, match="invalid CID"):
        resolve_model(store, "bafyNOTACID")
