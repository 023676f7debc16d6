"""The content-addressed model cache, in the data directory.

Layout (``<data dir>/models``)::

    <cid>/model       the file, whose UnixFS CID is <cid>
    <cid>/meta.json   {"cid", "name", "size", "source", "added_at"}
    .staging/<pid>-…  work in progress; never visible under a CID's name

Every entry is written in a staging directory, verified (its CID recomputed
from the bytes on disk), then renamed into place in one atomic step, so a
partial or unverified file never appears under a CID's name, even if the
process is killed halfway. Staging left by dead processes is swept on open.
Files are not fsynced: after a power cut a cached file may come back damaged,
and ``resolve_model`` re-hashes every cached model before it is loaded, so
that is caught and reported (remove and fetch again), never loaded.

Where bytes come from is pluggable: a source (``node.models.dag.BlockSource``)
only has to hand out blocks and bytes; the store verifies every block against
its CID as it arrives (``fetch_verified``), so no source is trusted. The store
tries the cache, then each source in order (an IPFS daemon, peers): a source
that fails, sends a bad block or is slower than ``pace`` allows is logged (one
warning line naming it and why) and the next one is tried.

Only CIDs made with kubo's default import settings (``ipfs add``, with or
without ``--cid-version=1``) are accepted: those are the CIDs the store can
recompute, which is how ``verify`` checks a file at rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from node.errors import ModelError, ModelNotFound
from node.models.cid import CID, FileHasher, file_cid, parse_cid
from node.models.dag import DEFAULT_PACE, BlockSource, Pace, fetch_verified
from node.progress import NO_PROGRESS, Progress
from node.services import pid_alive

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class StoredModel:
    """One model in the cache."""

    cid: str
    path: Path
    size: int
    name: str
    source: str
    added_at: float

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def check_gguf(path: Path) -> None:
    """Raise ``ModelError`` unless ``path`` starts like a GGUF file."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelError(
            f"{path} is not a GGUF model (it starts with {head[:4]!r}, not b'GGUF'); "
            "llmarket serves llama.cpp GGUF files: convert or download a .gguf"
        )


class ModelStore:
    """Models by CID under ``root``, with ``sources`` to fetch missing ones from.

    Args:
        pace: the minimum rate every source must keep up while fetching (``node.models.dag.Pace``).
    """

    def __init__(self, root: Path, sources: Sequence[BlockSource] = (), *, pace: Pace = DEFAULT_PACE) -> None:
        self.root = Path(root)
        self.sources = list(sources)
        self.pace = pace
        self._staging = self.root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)
        self._sweep_staging()

    @classmethod
    def in_data_dir(cls, data_dir: Path, sources: Sequence[BlockSource] = ()) -> ModelStore:
        return cls(Path(data_dir) / "models", sources)

    # -------------------------------------------------------------- reading

    def get(self, cid: str | CID) -> StoredModel | None:
        """The cached model, or None. Does not re-hash (see ``verify``)."""
        key = str(cid if isinstance(cid, CID) else parse_cid(cid))
        meta = self.root / key / "meta.json"
        try:
            data = json.loads(meta.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as err:
            raise ModelError(f"{meta} is corrupt ({err}); remove the entry with `llmarket models rm {key}`") from None
        return StoredModel(
            cid=key,
            path=self.root / key / "model",
            size=int(data["size"]),
            name=data.get("name") or key,
            source=data.get("source", "unknown"),
            added_at=float(data.get("added_at", 0)),
        )

    def list(self) -> list[StoredModel]:
        """Every cached model, oldest first."""
        entries = []
        for child in self.root.iterdir():
            if child.name.startswith(".") or not (child / "meta.json").exists():
                continue
            try:
                entry = self.get(child.name)
            except ModelError:
                continue
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: (e.added_at, e.cid))

    def verify(self, cid: str | CID) -> StoredModel:
        """Re-hash a cached model; raises ``ModelError`` if its bytes no longer match its CID."""
        parsed = cid if isinstance(cid, CID) else parse_cid(cid)
        entry = self.require(parsed)
        with open(entry.path, "rb") as f:
            actual = file_cid(f, parsed.version)
        if actual != parsed:
            raise ModelError(
                f"cached model {entry.cid} is corrupt on disk (it hashes to {actual}); "
                f"remove it with `llmarket models rm {entry.cid}` and fetch it again"
            )
        return entry

    def require(self, cid: str | CID) -> StoredModel:
        entry = self.get(cid)
        if entry is None:
            raise ModelNotFound(f"model {cid} is not in the cache; `llmarket models fetch {cid}` gets it")
        return entry

    # -------------------------------------------------------------- writing

    def add_file(
        self, path: Path, *, cid_version: int = 1, name: str | None = None, progress: Progress = NO_PROGRESS
    ) -> StoredModel:
        """Copy a local GGUF file into the cache, hashing it on the way; returns its entry.

        Raises:
            ModelError: the file is missing or not GGUF.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path} is not a file")
        check_gguf(path)
        with self._staged() as staging:
            hasher = FileHasher(cid_version)
            progress.start(path.stat().st_size, f"adding {path.name}")
            with open(path, "rb") as src, open(staging / "model", "wb") as dst:
                while block := src.read(_COPY_BLOCK):
                    dst.write(block)
                    hasher.update(block)
                    progress.advance(len(block))
            progress.finish()
            cid = hasher.cid()
            return self._commit(staging, cid, name=name or path.stem, source=f"file {path.resolve()}")

    def fetch(self, cid: str | CID, *, name: str | None = None, progress: Progress = NO_PROGRESS) -> StoredModel:
        """The cached model for ``cid``, fetching it from the sources if needed.

        Raises:
            ModelError: a malformed CID, or no source could deliver verified bytes
                (the message names each source and why).
        """
        parsed = cid if isinstance(cid, CID) else parse_cid(cid)
        cached = self.get(parsed)
        if cached is not None:
            return cached
        if not self.sources:
            raise ModelNotFound(f"model {parsed} is not in the cache and no source is configured; pass --ipfs-api")
        failures = []
        for source in self.sources:
            try:
                with self._staged() as staging:
                    fd = os.open(staging / "model", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    try:
                        fetch_verified(source, parsed, fd, progress, pace=self.pace)
                    finally:
                        os.close(fd)
                    progress.finish()
                    return self._commit(staging, parsed, name=name or str(parsed), source=source.name)
            except ModelError as err:
                log.warning("fetching %s… from %s failed: %s", str(parsed)[:16], source.name, err)
                failures.append(str(err))
        raise ModelError(f"could not fetch {parsed}: " + "; ".join(failures))

    def rename(self, cid: str | CID, name: str) -> StoredModel:
        """Give a cached model another name (a fetched model learns the one its holders advertise).

        The entry's ``meta.json`` is replaced in one atomic step; the bytes are untouched.
        """
        entry = self.require(cid)
        meta = entry.path.parent / "meta.json"
        data = json.loads(meta.read_text())
        data["name"] = name
        with self._staged() as staging:
            (staging / "meta.json").write_text(json.dumps(data, indent=1) + "\n")
            os.replace(staging / "meta.json", meta)
        renamed = self.get(entry.cid)
        assert renamed is not None
        return renamed

    def remove(self, cid: str | CID) -> StoredModel:
        """Delete a cached model; returns what was removed."""
        entry = self.require(cid)
        # Rename first, so a reader never sees half a deleted entry.
        trash = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-rm-", dir=self._staging))
        os.rename(entry.path.parent, trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)
        return entry

    # ------------------------------------------------------------ internals

    def _staged(self):
        return _Staging(self._staging)

    def _commit(self, staging: Path, cid: CID, *, name: str, source: str) -> StoredModel:
        size = (staging / "model").stat().st_size
        meta = {"cid": str(cid), "name": name, "size": size, "source": source, "added_at": time.time()}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        target = self.root / str(cid)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.exists():
                raise
            # Someone else committed the same CID first: theirs is as good as ours.
        entry = self.get(cid)
        assert entry is not None
        return entry

    def _sweep_staging(self) -> None:
        for child in self._staging.iterdir():
            pid = child.name.split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(child, ignore_errors=True)


class _Staging:
    """A fresh staging directory, removed on exit unless it was renamed into place."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.parent))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
