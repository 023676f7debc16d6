"""A local development chain: a real anvil process on 127.0.0.1.

Used by the test suite and the local testnet. ``DevChain.start()`` launches
anvil on a free port (``--port 0``), waits until its log names the port and
its JSON-RPC answers, and returns the RPC URL and the funded dev accounts.
``stop()`` (or leaving the ``with`` block) always ends the process.
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
from eth_account import Account
from eth_account.signers.local import LocalAccount

from node.errors import ChainUnreachable, ConfigError
from node.services import terminate, wait_ready

_REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"Listening on ([0-9.]+):(\d+)")


def _url(match: re.Match[str]) -> str:
    return f"http://{match.group(1)}:{match.group(2)}"


def find_anvil() -> str:
    """The anvil executable: ``$LLMARKET_ANVIL``, then ``PATH``, then this checkout's ``node_modules``."""
    candidates = [os.environ.get("LLMARKET_ANVIL"), shutil.which("anvil"), str(_REPO_ROOT / "node_modules/.bin/anvil")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("anvil not found; run scripts/setup (it installs anvil from npm) or put anvil on PATH")


@dataclass
class DevChain:
    """A running anvil: its RPC URL, chain id and pre-funded accounts."""

    process: subprocess.Popen
    rpc_url: str
    chain_id: int
    accounts: list[LocalAccount]
    workdir: Path
    _owns_workdir: bool = field(default=False, repr=False)

    @classmethod
    def start(
        cls,
        *,
        chain_id: int = 31337,
        accounts: int = 10,
        workdir: Path | None = None,
        anvil: str | None = None,
        timeout_s: float = 30.0,
        detach: bool = False,
    ) -> DevChain:
        """Start anvil and wait until it answers JSON-RPC.

        With ``detach`` it runs in its own session, so it outlives this process
        (the local testnet stops it later by pid).

        Raises:
            ConfigError: anvil is not installed.
            ChainUnreachable: it did not come up within ``timeout_s``.
        """
        owns = workdir is None
        workdir = Path(tempfile.mkdtemp(prefix="llmarket-anvil-")) if owns else Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / "anvil.log"
        config_path = workdir / "anvil-accounts.json"
        cmd = [
            anvil or find_anvil(),
            "--host", "127.0.0.1",
            "--port", "0",
            "--chain-id", str(chain_id),
            "--accounts", str(accounts),
            "--config-out", str(config_path),
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach
            )
        try:
            match = wait_ready(
                process,
                log_path,
                _LISTENING,
                lambda m: config_path.exists() and _answers_chain_id(_url(m), chain_id),
                what="anvil",
                timeout_s=timeout_s,
                error=ChainUnreachable,
            )
            rpc_url = _url(match)
            keys = json.loads(config_path.read_text())["private_keys"]
        except BaseException:
            terminate(process)
            raise
        return cls(process, rpc_url, chain_id, [Account.from_key(k) for k in keys], workdir, owns)

    def stop(self) -> None:
        terminate(self.process)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def rpc(self, method: str, *params: object) -> object:
        """One raw JSON-RPC call (for anvil's own methods: ``evm_snapshot``, ``evm_increaseTime``, …)."""
        reply = requests.post(
            self.rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}, timeout=10
        )
        body = reply.json()
        if "error" in body:
            raise ChainUnreachable(f"anvil refused {method}: {body['error']}")
        return body["result"]

    def __enter__(self) -> DevChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers_chain_id(rpc_url: str, chain_id: int) -> bool:
    try:
        reply = requests.post(
            rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, timeout=2
        )
        return int(reply.json()["result"], 16) == chain_id
    except (requests.RequestException, ValueError, KeyError):
        return False
