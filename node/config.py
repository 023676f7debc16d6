"""Where llmarket keeps its files, and other settings shared by every command.

The data directory is, in order: the ``--data-dir`` flag, ``$LLMARKET_HOME``,
then ``~/.local/share/llmarket``. Functions here take the environment as an
argument (defaulting to ``os.environ``) so tests never touch the real one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_HOME = "LLMARKET_HOME"


def data_dir(flag: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Resolve the data directory (not created here).

    Args:
        flag: the value of ``--data-dir``, if given.
        env: the environment to read ``$LLMARKET_HOME`` from (default ``os.environ``).
    """
    env = os.environ if env is None else env
    if flag:
        return Path(flag).expanduser()
    if env.get(ENV_HOME):
        return Path(env[ENV_HOME]).expanduser()
    return Path.home() / ".local" / "share" / "llmarket"
