"""The requester's token counter: a model's own tokenizer, verified against its CID, without its weights.

A worker bills ``prompt_tokens``; the requester pays for no more than its own count
of the same request with the model's own vocabulary. It rarely has the model, but
GGUF keeps the vocabulary (with the chat template and the hyperparameters) in the
metadata at the head of the file, a few MiB of a file of gigabytes
(node/models/gguf.py). So:

1. ``TokenizerCache.get(cid, sources)`` fetches the head of the file through the
   CID's DAG (``node.models.dag.fetch_prefix``): down the DAG's left edge only,
   every leaf hashed against the CID its verified parent names, the source's
   stream closed as soon as the metadata is complete. A source is anything the
   model store fetches from: the worker being hired (``PeerSource``), an IPFS
   daemon. Before any source, it looks for the whole model on this machine: the
   model store (entries there were verified when added) or, for the default
   model's CID, the embedded SmolLM2 (hashed once against its CID, no network).
2. ``node.models.gguf.vocab_only_gguf`` writes that metadata with no tensors to
   ``<data dir>/tokenizers/<cid>.gguf`` (atomically, its SHA-256 beside it in
   ``<cid>.sha256``), and llama.cpp loads it with ``vocab_only`` (``Tokenizer``);
   later requests load that file if it still matches its SHA-256 (else it is made
   again: a file damaged on disk is never loaded), and a loaded tokenizer stays in
   the cache object, which its owner (the requester) keeps.
3. ``Tokenizer.count(request)`` tokenizes a ``JobRequest`` with
   node/inference/prompt.py, the very functions the worker's engine runs
   (chat template, plain prompt, text resumed after a failover), on the same
   llama.cpp vocabulary code; ``answer_text`` turns token ids back into text as
   the worker's stream builds it.

llama_cpp is imported inside functions only, so importing this module (the
requester does) does not load llama.cpp; loading and counting run in worker
threads, one at a time per tokenizer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from node.errors import InvalidRequest, ModelError
from node.inference.fingerprints import RECORD_BYTES
from node.inference.prompt import answer_bytes, chat_prompt, completion_prompt
from node.inference.sampling import validate_messages, validate_prompt
from node.models.cid import CHUNK_SIZE, CID, file_cid, parse_cid
from node.models.dag import DEFAULT_PACE, BlockSource, Pace, fetch_prefix
from node.models.default import DEFAULT_MODEL_CID, DEFAULT_MODEL_CID_V0, default_model_file
from node.models.gguf import MAX_HEADER_BYTES, HeaderScanner, read_header, vocab_only_gguf
from node.models.store import ModelStore
from node.protocol.messages import JobRequest

log = logging.getLogger(__name__)


@dataclass
class Tokenizer:
    """One model's vocabulary, loaded alone (no weights, no context). Build it with ``Tokenizer.load``.

    ``source`` says where it came from ("cache", "loaded", a local file, or the
    source it was fetched from) and ``received`` how many bytes that source
    delivered (0 unless fetched).
    """

    cid: str
    path: Path  # the vocabulary-only GGUF
    chat_template: str | None
    source: str = "cache"
    received: int = 0
    _model: Any = field(default=None, repr=False)  # llama_cpp._internals.LlamaModel
    _limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1), repr=False)

    @classmethod
    def load(cls, cid: str, path: Path) -> Tokenizer:
        """Load the vocabulary of the GGUF at ``path`` (blocking; a vocabulary-only file loads in milliseconds).

        Raises:
            ModelError: llama.cpp cannot load it.
        """
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            model = LlamaModel(path_model=str(path), params=params, verbose=False)
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"llama.cpp could not load the vocabulary of {cid}: {err}") from None
        # The engine reads the template the same way: llama.cpp's metadata, as llama-cpp-python's Llama has it.
        return cls(cid, Path(path), model.metadata().get("tokenizer.chat_template"), _model=model)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None

    # ------------------------------------------------------------ counting (blocking)

    def prompt(self, request: JobRequest) -> tuple[list[int], list[int]]:
        """``(tokens, said)`` of ``request`` exactly as the worker's engine makes them (node/inference/prompt.py).

        Raises:
            InvalidRequest: the request is malformed, or is a chat and the model has no chat template.
        """
        if (request.messages is None) == (request.prompt is None):
            raise InvalidRequest("send messages or a prompt, not both or neither")
        if request.messages is not None:
            if not self.chat_template:
                raise InvalidRequest(f"model {self.cid} has no chat template; send a plain prompt instead")
            return chat_prompt(
                self._model, self.chat_template, validate_messages(request.messages), request.resume_text
            )
        return completion_prompt(self._model, validate_prompt(request.prompt), request.resume_text)

    def count_sync(self, request: JobRequest) -> int:
        """The prompt tokens an honest worker bills for ``request`` (blocking)."""
        return len(self.prompt(request)[0])

    def count_check(self, request: JobRequest) -> int:
        """The prompt tokens an honest verifier bills for verification job ``request`` (blocking): the checked
        job's prompt, and one per fingerprint record of its answer (node/verify/local.py ``CheckingEngine``).
        The answer is not re-tokenized from its text, which need not give back the answer's own tokens."""
        task = request.check
        if task is None:
            raise InvalidRequest("not a verification job")
        return self.count_sync(task.original) + len(task.done.fingerprints) // RECORD_BYTES

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (llama.cpp's own test, as the worker's stream makes it)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, int(token)))

    def answer_bytes(self, tokens: Sequence[int]) -> bytes:
        """The bytes of an answer's tokens, as the worker's stream appends them (blocking)."""
        return answer_bytes(self._model, tokens)

    def answer_text(self, tokens: Sequence[int]) -> str:
        """The text of an answer's tokens, as the worker's stream builds it (blocking)."""
        return self.answer_bytes(tokens).decode(errors="replace")

    # ------------------------------------------------------------ counting (from trio)

    async def count(self, request: JobRequest) -> int:
        """``count_sync`` in a worker thread."""
        return await trio.to_thread.run_sync(self.count_sync, request, limiter=self._limiter)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        """``answer_text`` in a worker thread."""
        return await trio.to_thread.run_sync(self.answer_text, list(tokens), limiter=self._limiter)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class TokenizerCache:
    """Tokenizers by model CID: loaded ones in memory, vocabulary-only GGUFs in ``<data dir>/tokenizers``.

    Args:
        store: a model store to read whole models from when it holds the CID (no network).
        pace: the minimum rate every source must keep up (``node.models.dag.Pace``).
    """

    data_dir: Path
    store: ModelStore | None = None
    pace: Pace = DEFAULT_PACE
    _loaded: dict[str, Tokenizer] = field(default_factory=dict)
    _locks: dict[str, trio.Lock] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.data_dir) / "tokenizers"

    def path_of(self, cid: str | CID) -> Path:
        return self.root / f"{parse_cid(str(cid))}.gguf"

    async def get(self, cid: str | CID, sources: Sequence[BlockSource] = ()) -> Tokenizer:
        """The tokenizer of the model ``cid``: loaded, cached on disk, read from a local copy, or fetched.

        Raises:
            ModelError: a malformed CID, or no local copy and no source could
                deliver its verified metadata (the message names each source
                and why), or llama.cpp cannot load it.
        """
        key = str(parse_cid(str(cid)))
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:  # one fetch per model, however many jobs ask at once
            if key in self._loaded:
                return self._loaded[key]
            tokenizer = await trio.to_thread.run_sync(self._make, key, list(sources))
            self._loaded[key] = tokenizer
            return tokenizer

    async def from_file(self, cid: str | CID, path: Path) -> Tokenizer:
        """The tokenizer of ``cid`` from the whole model at ``path`` on this machine (never the network).

        The file is hashed against ``cid`` first (about 0.2 s per 100 MB, once: the
        vocabulary is then cached under its CID).

        Raises:
            ModelError: the file does not hash to ``cid``, or is not a GGUF llama.cpp can read.
        """
        key = str(parse_cid(str(cid)))
        async with self._locks.setdefault(key, trio.Lock()):
            if key not in self._loaded:
                self._loaded[key] = await trio.to_thread.run_sync(self._from_local, key, Path(path), True)
            return self._loaded[key]

    def close(self) -> None:
        """Unload every tokenizer (the files stay cached)."""
        for tokenizer in self._loaded.values():
            tokenizer.close()
        self._loaded.clear()

    # ------------------------------------------------------------ internals (worker threads)

    def _make(self, key: str, sources: list[BlockSource]) -> Tokenizer:
        cached = self._load_cached(key)
        if cached is not None:
            return cached
        local = self._local_copy(key)
        if local is not None:
            path, check = local
            return self._from_local(key, path, check)
        return self._fetch(key, sources)

    def _load_cached(self, key: str) -> Tokenizer | None:
        """The cached vocabulary, if it is there and still has the SHA-256 written beside it when it was made
        from verified bytes; a damaged one is removed (and made again), never loaded."""
        path = self.path_of(key)
        digest = path.with_suffix(".sha256")
        if not path.exists():
            return None
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() == digest.read_text().strip():
                return Tokenizer.load(key, path)
            problem = "it no longer matches its SHA-256"
        except (OSError, ModelError) as err:
            problem = str(err)
        log.warning("the cached tokenizer of %s… is damaged (%s); making it again", key[:16], problem)
        path.unlink(missing_ok=True)
        digest.unlink(missing_ok=True)
        return None

    def _local_copy(self, key: str) -> tuple[Path, bool] | None:
        """A whole copy of the model here, and whether it must be hashed before it is trusted."""
        if self.store is not None and (entry := self.store.get(key)) is not None:
            return entry.path, False  # the store verified it when it was added
        if key in (DEFAULT_MODEL_CID, DEFAULT_MODEL_CID_V0):
            try:
                return default_model_file(), True
            except ModelError:
                return None
        return None

    def _from_local(self, key: str, path: Path, check: bool) -> Tokenizer:
        started = time.monotonic()
        if check:
            cid = parse_cid(key)
            with open(path, "rb") as f:
                actual = file_cid(f, cid.version)
            if actual != cid:
                raise ModelError(f"{path} hashes to {actual}, not {key}: it is not that model")
        header, head = read_header(path)
        tokenizer = self._save_and_load(key, vocab_only_gguf(header, head))
        tokenizer.source = f"file {path}"
        log.info("tokenizer of %s… read from %s in %.2fs", key[:16], path, time.monotonic() - started)
        return tokenizer

    def _fetch(self, key: str, sources: list[BlockSource]) -> Tokenizer:
        if not sources:
            raise ModelError(f"the tokenizer of {key} is not cached here and no source to fetch it from was given")
        failures = []
        for source in sources:
            try:
                return self._fetch_from(key, source)
            except ModelError as err:
                log.warning("fetching the tokenizer of %s… from %s failed: %s", key[:16], source.name, err)
                failures.append(f"{source.name}: {err}")
        raise ModelError(f"could not fetch the tokenizer of {key}: " + "; ".join(failures))

    def _fetch_from(self, key: str, source: BlockSource) -> Tokenizer:
        started = time.monotonic()
        scanner = HeaderScanner()
        prefix = fetch_prefix(
            source,
            parse_cid(key),
            lambda data: scanner.feed(data) is not None,
            max_bytes=MAX_HEADER_BYTES + CHUNK_SIZE,
            pace=self.pace,
        )
        header = scanner.feed(prefix.data)
        if header is None:
            raise ModelError(f"{key} ends inside its GGUF metadata, after {prefix.size:,} bytes")
        tokenizer = self._save_and_load(key, vocab_only_gguf(header, prefix.data))
        tokenizer.source, tokenizer.received = source.name, prefix.received
        log.info(
            "tokenizer of %s… fetched from %s: %s bytes of a %s-byte model in %.2fs",
            key[:16],
            source.name,
            f"{prefix.received:,}",
            f"{prefix.size:,}",
            time.monotonic() - started,
        )
        return tokenizer

    def _save_and_load(self, key: str, vocab: bytes) -> Tokenizer:
        path = self.path_of(key)
        _write_atomically(path, vocab)
        try:
            tokenizer = Tokenizer.load(key, path)
        except ModelError:
            path.unlink(missing_ok=True)  # never leave a file that cannot load under the CID's name
            raise
        _write_atomically(path.with_suffix(".sha256"), hashlib.sha256(vocab).hexdigest().encode() + b"\n")
        return tokenizer
