"""Where a chain's contracts live, and deploying them.

A deployment record is ``deployments/<chainId>.json``::

    {"chainId": 31337, "token": "0x…", "deposits": "0x…", "block": 2, "deployer": "0x…"}

``deposits`` is the escrow every payment goes through (``DepositEscrow``).
``block`` is the block it was deployed in (where to start reading its events).
A record written before it existed (only the removed channel contract, under
``escrow``) is refused with what to do: redeploy. A record that still names
that old contract next to ``deposits`` loads, and the old address is ignored.
``scripts/deploy.py`` (``brownie run``) and the local testnet both deploy
through ``deploy_contracts`` here, so there is one deployment path.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import is_address, to_checksum_address
from web3 import Web3

from node.errors import DeploymentNotFound
from node.payments.artifacts import Artifact, load_artifact

#: 1 billion tokens with 18 decimals, all to the deployer.
DEFAULT_INITIAL_SUPPLY = 10**9 * 10**18

#: ``DepositEscrow``'s unlock period: seconds between a requester's ``unlock`` and
#: its ``withdraw``, during which workers can still claim. A day leaves a worker
#: that claims within minutes a wide margin, even on a congested chain.
DEFAULT_UNLOCK_PERIOD_S = 86_400


@dataclass(frozen=True)
class Deployment:
    """The addresses of one chain's llmarket contracts."""

    chain_id: int
    token: str
    deposits: str  # the DepositEscrow
    block: int
    deployer: str

    def to_json(self) -> dict[str, Any]:
        return {"chainId": self.chain_id, "token": self.token, "deposits": self.deposits, "block": self.block,
                "deployer": self.deployer}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = "deployment record") -> Deployment:
        if isinstance(data, dict) and "deposits" not in data and "escrow" in data:
            raise DeploymentNotFound(
                f"{source} names only the old channel escrow (InferenceEscrow), which llmarket no longer uses; "
                "redeploy with `brownie run scripts/deploy.py` to get a DepositEscrow"
            )
        try:
            fields = {
                "chain_id": int(data["chainId"]),
                "token": data["token"],
                "deposits": data["deposits"],
                "block": int(data["block"]),
                "deployer": data["deployer"],
            }
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DeploymentNotFound(
                f"{source} is malformed ({err!r}); redeploy with `brownie run scripts/deploy.py`"
            ) from None
        for key in ("token", "deposits", "deployer"):
            if not isinstance(fields[key], str) or not is_address(fields[key]):
                raise DeploymentNotFound(
                    f"{source}: {key} is not an address; redeploy with `brownie run scripts/deploy.py`"
                )
            fields[key] = to_checksum_address(fields[key])
        return cls(**fields)


def deployment_path(directory: str | os.PathLike[str], chain_id: int) -> Path:
    return Path(directory) / f"{chain_id}.json"


def write_deployment(deployment: Deployment, directory: str | os.PathLike[str]) -> Path:
    """Write the record atomically (a reader never sees half a file); returns its path."""
    path = deployment_path(directory, deployment.chain_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(deployment.to_json(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_deployment(directory: str | os.PathLike[str], chain_id: int) -> Deployment:
    """Read ``<directory>/<chain_id>.json``.

    Raises:
        DeploymentNotFound: there is no record for this chain, or it is malformed.
    """
    path = deployment_path(directory, chain_id)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeploymentNotFound(
            f"no deployment for chain {chain_id} at {path}; deploy with "
            f"`brownie run scripts/deploy.py --network <network>` or pass the right --deployments directory"
        ) from None
    except json.JSONDecodeError as err:
        raise DeploymentNotFound(f"{path} is not valid JSON ({err}); redeploy or restore it") from None
    deployment = Deployment.from_json(data, source=str(path))
    if deployment.chain_id != chain_id:
        raise DeploymentNotFound(f"{path} says chainId {deployment.chain_id}, expected {chain_id}; fix or delete it")
    return deployment


def _deploy(w3: Web3, artifact: Artifact, sender: str, *args: Any) -> tuple[str, int]:
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    tx_hash = factory.constructor(*args).transact({"from": sender})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
    if receipt["status"] != 1 or not receipt["contractAddress"]:
        raise DeploymentNotFound(f"deploying {artifact.name} failed in transaction {tx_hash.hex()}")
    return to_checksum_address(receipt["contractAddress"]), receipt["blockNumber"]


def deploy_contracts(
    w3: Web3,
    deployer: str,
    *,
    initial_supply: int = DEFAULT_INITIAL_SUPPLY,
    token_artifact: Artifact | None = None,
    deposits_artifact: Artifact | None = None,
    unlock_period: int = DEFAULT_UNLOCK_PERIOD_S,
) -> Deployment:
    """Deploy ``LLMToken`` (premint to ``deployer``), and a ``DepositEscrow`` (with
    ``unlock_period`` seconds) over it.

    ``deployer`` must be able to send through ``w3``: an account the node
    unlocks (anvil's dev accounts) or one whose key a signing middleware holds.
    The artifacts default to the ones shipped in the package; brownie passes
    its fresh build instead.
    """
    token_artifact = token_artifact or load_artifact("LLMToken")
    deposits_artifact = deposits_artifact or load_artifact("DepositEscrow")
    deployer = to_checksum_address(deployer)
    token, _ = _deploy(w3, token_artifact, deployer, initial_supply)
    deposits, block = _deploy(w3, deposits_artifact, deployer, token, unlock_period)
    return Deployment(chain_id=w3.eth.chain_id, token=token, deposits=deposits, block=block, deployer=deployer)
