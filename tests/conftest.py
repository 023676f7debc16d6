"""Shared fixtures.

- Every test gets its own data directory (``$LLMARKET_HOME``).
- ``devchain``: one real anvil for the session, always stopped at the end.
- ``deployed``: the contracts deployed once on it, from the packaged artifacts,
  with a funded requester.
- ``chain``: per test, an anvil snapshot that is reverted afterwards, so tests
  share one chain and one deployment yet never see each other's state.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account.signers.local import LocalAccount

from node.dev.devchain import DevChain
from node.payments.deployment import Deployment, deploy_contracts
from node.payments.deposits import DepositClient

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = 10**18  # one whole token in base units
REQUESTER_FUNDS = 1_000_000 * TOKEN


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, tmp_path_factory, monkeypatch):
    home = tmp_path / "llmarket-home"
    monkeypatch.setenv("LLMARKET_HOME", str(home))
    # workers note their threads here (node/app/worker.py): tests never see each other's, or yours; beside
    # tmp_path, not in it, which tests may list
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
    return home


@pytest.fixture(scope="session")
def devchain():
    chain = DevChain.start(accounts=6)
    try:
        yield chain
    finally:
        chain.stop()


@dataclass
class Deployed:
    chain: DevChain
    deployment: Deployment
    deployer: LocalAccount
    requester: LocalAccount
    worker: LocalAccount
    stranger: LocalAccount
    other_requester: LocalAccount
    other_worker: LocalAccount

    def client(self, account: LocalAccount | None = None) -> DepositClient:
        return DepositClient.connect(self.chain.rpc_url, deployment=self.deployment, account=account)

    def now(self) -> int:
        return self.client().chain_time()

    def advance(self, seconds: int) -> None:
        """Move the chain's clock forward and mine a block."""
        self.chain.rpc("evm_increaseTime", seconds)
        self.chain.rpc("evm_mine")


@pytest.fixture(scope="session")
def deployed(devchain) -> Deployed:
    deployer, requester, worker, stranger, other_requester, other_worker = devchain.accounts[:6]
    from web3 import HTTPProvider, Web3

    w3 = Web3(HTTPProvider(devchain.rpc_url))
    deployment = deploy_contracts(w3, deployer.address)  # anvil's dev accounts are unlocked
    token = DepositClient(w3, deployment, deployer).token
    for account in (requester, stranger, other_requester):
        tx = token.functions.transfer(account.address, REQUESTER_FUNDS).transact({"from": deployer.address})
        w3.eth.wait_for_transaction_receipt(tx)
    return Deployed(devchain, deployment, deployer, requester, worker, stranger, other_requester, other_worker)


@pytest.fixture
def chain(deployed) -> Deployed:
    snapshot = deployed.chain.rpc("evm_snapshot")
    try:
        yield deployed
    finally:
        deployed.chain.rpc("evm_revert", snapshot)


@pytest.fixture(scope="session")
def brownie_build() -> Path:
    """A fresh `brownie compile` of contracts/ with the real solc (solc-js behind scripts/solc)."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "brownie"), "compile"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return REPO_ROOT / "build" / "contracts"


# ------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def ipfs_daemon():
    """One real js-ipfs daemon (kubo RPC API), offline on 127.0.0.1, for the session."""
    from node.dev.ipfsd import IpfsDaemon

    daemon = IpfsDaemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def default_model_file() -> Path:
    from node.models.default import default_model_file

    return default_model_file()


# ------------------------------------------------------- network namespaces


@pytest.fixture
def netns_available() -> None:
    """Skip, with the reason, where a netns lab (tests/netlab.py) cannot be built."""
    from . import netlab

    reason = netlab.unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def lab(netns_available, tmp_path):
    """Separate hosts in network namespaces (tests/netlab.py), torn down after the test."""
    from . import netlab

    with netlab.Lab(tmp_path / "netlab") as built:
        yield built
