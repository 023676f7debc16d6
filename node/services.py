"""Helpers for the external daemons llmarket starts for tests and the local testnet (anvil, js-ipfs).

Each daemon writes its log to a file; it is ready once its log names the
address it listens on *and* that address answers a probe. ``wait_ready`` polls
for both (never a fixed sleep); ``terminate`` always reaps the process.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def wait_ready(
    process: subprocess.Popen,
    log_path: Path,
    address: re.Pattern[str],
    probe: Callable[[re.Match[str]], bool],
    *,
    what: str,
    timeout_s: float,
    error: type[Exception],
) -> re.Match[str]:
    """Poll until ``address`` matches the log and ``probe(match)`` is true; returns the match.

    Raises:
        error: the process exited, or was not ready within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    match = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"{what} exited with code {process.returncode}: {log_path.read_text(errors='replace')[-500:]}")
        if match is None:
            match = address.search(log_path.read_text(errors="replace"))
        if match is not None and probe(match):
            return match
        time.sleep(0.05)  # the polling interval, not a wait for readiness
    raise error(f"{what} did not answer within {timeout_s:.0f}s; see {log_path}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def terminate(process: subprocess.Popen) -> None:
    """Stop a daemon: SIGTERM, then SIGKILL after 10 s; always reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
