"""A local IPFS daemon for tests and the local testnet: js-ipfs from npm.

Kubo cannot be installed on our machines (its npm package downloads a binary
from GitHub), but js-ipfs serves the same ``/api/v0`` RPC API, which is all
llmarket talks to; real users point ``--ipfs-api`` at kubo. The daemon runs
fully offline: its own repo, every address on 127.0.0.1 with port 0, no
bootstrap peers, no MDNS, no WebRTC, no routing. ``IpfsDaemon.start()`` waits
until the log names the API address and the API answers; ``stop()`` always
ends the process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import requests

from node.errors import ConfigError, ModelError
from node.services import terminate, wait_ready

_REPO_ROOT = Path(__file__).resolve().parents[2]
_API_LINE = re.compile(r"HTTP API listening on /ip4/([0-9.]+)/tcp/(\d+)/http")


def _url(match: re.Match[str]) -> str:
    return f"http://{match.group(1)}:{match.group(2)}"


def find_jsipfs() -> str:
    """The js-ipfs CLI: ``$LLMARKET_JSIPFS``, then this checkout's ``node_modules``."""
    for candidate in (os.environ.get("LLMARKET_JSIPFS"), str(_REPO_ROOT / "node_modules/.bin/jsipfs")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(
        "js-ipfs not found; run scripts/setup (it installs js-ipfs from npm), or use your own kubo daemon"
    )


def offline_config(config: dict) -> dict:
    """Make a js-ipfs config talk to nobody: loopback only, no discovery, no routing."""
    config["Addresses"] = {
        "Swarm": ["/ip4/127.0.0.1/tcp/0"],
        "Announce": [],
        "NoAnnounce": [],
        "API": "/ip4/127.0.0.1/tcp/0",
        "Gateway": "/ip4/127.0.0.1/tcp/0",
        "RPC": "/ip4/127.0.0.1/tcp/0",
        "Delegates": [],
    }
    config["Bootstrap"] = []
    config["Discovery"] = {"MDNS": {"Enabled": False, "Interval": 10}, "webRTCStar": {"Enabled": False}}
    config["Routing"] = {"Type": "none"}
    config.setdefault("Pubsub", {})["Enabled"] = False
    config.setdefault("Swarm", {})["DisableNatPortMap"] = True
    return config


@dataclass
class IpfsDaemon:
    """A running js-ipfs daemon: its RPC API as a URL and as a multiaddr."""

    process: subprocess.Popen
    api_url: str  # http://127.0.0.1:PORT
    repo: Path
    _owns_repo: bool = field(default=False, repr=False)

    @property
    def api_multiaddr(self) -> str:
        host, port = self.api_url.removeprefix("http://").split(":")
        return f"/ip4/{host}/tcp/{port}/http"

    @classmethod
    def start(
        cls, *, repo: Path | None = None, jsipfs: str | None = None, timeout_s: float = 60.0, detach: bool = False
    ) -> IpfsDaemon:
        """Initialise the repo if needed, start the daemon and wait until its API answers.

        Raises:
            ConfigError: js-ipfs is not installed.
            ModelError: it failed to start within ``timeout_s``.
        """
        owns = repo is None
        repo = Path(tempfile.mkdtemp(prefix="llmarket-ipfs-")) if owns else Path(repo)
        cmd = jsipfs or find_jsipfs()
        env = {**os.environ, "IPFS_PATH": str(repo)}
        if not (repo / "config").exists():
            repo.mkdir(parents=True, exist_ok=True)
            init = subprocess.run([cmd, "init", "--empty-repo"], env=env, capture_output=True, text=True, timeout=120)
            if init.returncode != 0:
                raise ModelError(f"js-ipfs init failed: {init.stderr.strip()[-300:]}")
        config_path = repo / "config"
        config_path.write_text(json.dumps(offline_config(json.loads(config_path.read_text())), indent=1))
        log_path = repo / "daemon.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [cmd, "daemon", "--offline"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=detach,  # outlives this process (the local testnet stops it by pid)
            )
        try:
            match = wait_ready(
                process, log_path, _API_LINE, lambda m: _api_answers(_url(m)),
                what="js-ipfs", timeout_s=timeout_s, error=ModelError,
            )  # fmt: skip
        except BaseException:
            terminate(process)
            raise
        return cls(process, _url(match), repo, owns)

    def stop(self) -> None:
        terminate(self.process)
        if self._owns_repo:
            shutil.rmtree(self.repo, ignore_errors=True)

    def __enter__(self) -> IpfsDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _api_answers(api_url: str) -> bool:
    try:
        return requests.post(f"{api_url}/api/v0/version", timeout=2).ok
    except requests.RequestException:
        return False
