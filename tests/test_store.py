"""The model cache: nothing unverified is ever visible under a CID, and nothing is lost."""

from __future__ import annotations

import hashlib
import logging
import random
import time

import pytest

from node.errors import ModelError, ModelNotFound
from node.models.cid import CHUNK_SIZE, CID, FileHasher, dag_pb_node, file_cid, leaf_link, unixfs_file
from node.models.dag import Pace
from node.models.default import DEFAULT_MODEL_CID, DEFAULT_MODEL_NAME
from node.models.resolve import resolve_model
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


class FileSource:
    """Serves a file's real DAG blocks, and its bytes (optionally tampered, or cut short)."""

    name = "test source"

    def __init__(self, data: bytes, version: int = 1, *, flip: int | None = None, cut: int | None = None):
        hasher = FileHasher(version, keep_inner_blocks=True)
        hasher.update(data)
        self.root = hasher.cid()
        self.blocks = dict(hasher.inner_blocks)
        for i in range(0, max(len(data), 1), CHUNK_SIZE):
            chunk = data[i : i + CHUNK_SIZE]
            self.blocks[leaf_link(chunk, version).cid] = (
                chunk if version == 1 else dag_pb_node([], unixfs_file(chunk, len(chunk)))
            )
        self.data = bytearray(data)
        if flip is not None:
            self.data[flip] ^= 0xFF
        if cut is not None:
            del self.data[cut:]

    def get_block(self, cid):
        if cid not in self.blocks:
            raise ModelError(f"{self.name} does not have {cid}")
        return self.blocks[cid]

    def cat(self, cid):
        for i in range(0, len(self.data), 100_000):
            yield bytes(self.data[i : i + 100_000])


@pytest.mark.parametrize("version", [0, 1])
def test_a_tampered_chunk_aborts_the_fetch_and_nothing_is_kept(tmp_path, version):
    data = b"GGUF" + random.Random(9).randbytes(5 * CHUNK_SIZE + 10)
    liar = FileSource(data, version, flip=3 * CHUNK_SIZE + 5)  # genuine blocks, tampered bytes
    store = ModelStore(tmp_path / "models", [liar])
    with pytest.raises(ModelError, match=r"test source sent a bad block .* do not hash to its CID; nothing was kept"):
        store.fetch(liar.root)
    assert store.list() == [] and list((tmp_path / "models" / ".staging").iterdir()) == []
    store.sources.append(FileSource(data, version))  # the next source is honest
    assert store.fetch(liar.root).path.read_bytes() == data


def test_tampered_blocks_and_short_streams_are_refused(tmp_path):
    data = b"GGUF" + random.Random(8).randbytes(3 * CHUNK_SIZE)
    bad_root = FileSource(data)
    bad_root.blocks[bad_root.root] = bad_root.blocks[bad_root.root] + b"\0"
    with pytest.raises(ModelError, match="do not hash to its CID"):
        ModelStore(tmp_path / "a", [bad_root]).fetch(bad_root.root)
    short = FileSource(data, cut=CHUNK_SIZE + 7)
    with pytest.raises(ModelError, match=f"ended .* early, after {CHUNK_SIZE + 7} of {len(data)} bytes"):
        ModelStore(tmp_path / "b", [short]).fetch(short.root)
    long = FileSource(data)
    long.data += b"extra"
    with pytest.raises(ModelError, match="sent more than"):
        ModelStore(tmp_path / "c", [long]).fetch(long.root)


class SlowSource(FileSource):
    """Serves the file's first MiB at once, then ``piece`` bytes every ``every_s`` seconds; or slow blocks."""

    name = "slow source"

    def __init__(self, data: bytes, *, piece: int = 64, every_s: float = 0.02, block_delay_s: float = 0.0):
        super().__init__(data)
        self.piece, self.every_s, self.block_delay_s = piece, every_s, block_delay_s

    def get_block(self, cid):
        time.sleep(self.block_delay_s)
        return super().get_block(cid)

    def cat(self, cid):
        yield bytes(self.data[: 1 << 20])
        for i in range(1 << 20, len(self.data), self.piece):
            time.sleep(self.every_s)
            yield bytes(self.data[i : i + self.piece])


@pytest.mark.parametrize(
    "slow",
    [{"piece": 64, "every_s": 0.02}, {"block_delay_s": 0.5, "piece": 1 << 20, "every_s": 0}],
    ids=["trickling bytes", "slow blocks"],
)
def test_a_source_below_the_minimum_rate_is_dropped_for_the_next(tmp_path, caplog, slow):
    caplog.set_level(logging.WARNING, logger="node.models.store")
    data = b"GGUF" + random.Random(4).randbytes(6 * CHUNK_SIZE)
    source = SlowSource(data, **slow)
    store = ModelStore(tmp_path / "m", [source, FileSource(data)], pace=Pace(min_bytes_per_s=1 << 20, window_s=0.2))
    started = time.monotonic()
    entry = store.fetch(source.root)
    assert time.monotonic() - started < 5  # the trickle alone would take 70 s
    assert entry.path.read_bytes() == data and entry.source == "test source"
    [warning] = [r.getMessage() for r in caplog.records if r.name == "node.models.store"]
    assert "slow source is too slow" in warning and "under the minimum of 1,048,576 bytes/s" in warning


def test_time_spent_on_our_side_does_not_count_against_a_source(tmp_path, monkeypatch):
    from node.models import dag

    write = dag._write_all

    def slow_disk(fd, pieces):
        time.sleep(0.1)
        write(fd, pieces)

    monkeypatch.setattr(dag, "_write_all", slow_disk)  # 1.2 s of writing; the source answers at once
    data = b"GGUF" + random.Random(5).randbytes(12 * CHUNK_SIZE - 4)
    source = FileSource(data)
    store = ModelStore(tmp_path / "m", [source], pace=Pace(min_bytes_per_s=64 << 20, window_s=0.2))
    assert store.fetch(source.root).path.read_bytes() == data


def test_small_files_come_in_one_block(tmp_path):
    for version in (0, 1):
        source = FileSource(b"GGUF tiny", version)
        entry = ModelStore(tmp_path / f"v{version}", [source]).fetch(source.root)
        assert entry.path.read_bytes() == b"GGUF tiny"


def test_only_kubos_default_layout_is_accepted(tmp_path):
    data = random.Random(2).randbytes(2 * CHUNK_SIZE + 1)
    source = FileSource(data, 1)
    # The same bytes under a CIDv1 with dag-pb (not raw) leaves: a valid DAG, but not kubo's default.
    other = FileSource(data, 0)
    root_block = other.blocks[other.root]
    odd_root = CID.v1(0x70, hashlib.sha256(root_block).digest())
    other.blocks[odd_root] = root_block
    with pytest.raises(ModelError, match="not laid out with kubo's default import settings"):
        ModelStore(tmp_path / "m", [other]).fetch(odd_root)
    assert ModelStore(tmp_path / "n", [source]).fetch(source.root).size == len(data)


def test_staging_of_dead_processes_is_swept(tmp_path):
    import os

    store = ModelStore(tmp_path / "models")
    dead = tmp_path / "models" / ".staging" / "999999999-abc"
    dead.mkdir()
    (dead / "model").write_bytes(b"partial")
    mine = tmp_path / "models" / ".staging" / f"{os.getpid()}-live"
    mine.mkdir()
    ModelStore(store.root)
    assert not dead.exists() and mine.exists()


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


def test_rename_gives_a_cached_model_another_name_and_keeps_its_bytes(tmp_path):
    store = ModelStore(tmp_path / "models")
    entry = store.add_file(fake_gguf(tmp_path / "a.gguf"))
    renamed = store.rename(entry.cid, "SmolLM2-135M-Instruct.Q4_1")
    assert renamed == store.get(entry.cid) and renamed.name == "SmolLM2-135M-Instruct.Q4_1"
    assert (renamed.path, renamed.size, renamed.source) == (entry.path, entry.size, entry.source)
    assert store.verify(entry.cid) == renamed
    assert list((tmp_path / "models" / ".staging").iterdir()) == []  # nothing left behind
    with pytest.raises(ModelNotFound):
        store.rename("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", "x")
