"""Deploy LLMToken and DepositEscrow, and record where they live.

    brownie run scripts/deploy.py --network development    # anvil, started and stopped by brownie
    DEPLOYER_PRIVATE_KEY=0x… brownie run scripts/deploy.py --network sepolia

brownie compiles the project and connects; the deployment itself goes through
``node.payments.deployment.deploy_contracts``, the same code the local testnet
uses. ``$LLMARKET_UNLOCK_PERIOD_S`` sets DepositEscrow's unlock period (default:
a day). The record is written to ``deployments/<chainId>.json`` (or to
``$LLMARKET_DEPLOYMENTS_DIR``), where nodes read it.
"""

import os
from pathlib import Path

from brownie import DepositEscrow, LLMToken, accounts, network, web3
from eth_account import Account
from web3.middleware import SignAndSendRawMiddlewareBuilder

from node.payments.artifacts import Artifact
from node.payments.deployment import (
    DEFAULT_INITIAL_SUPPLY,
    DEFAULT_UNLOCK_PERIOD_S,
    deploy_contracts,
    write_deployment,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _deployer() -> str:
    """The address that deploys: a dev account on a local chain, else DEPLOYER_PRIVATE_KEY's."""
    if network.show_active() in ("development", "anvil") or web3.eth.chain_id in (31337, 1337):
        return accounts[0].address
    key = os.environ.get("DEPLOYER_PRIVATE_KEY")
    if not key:
        raise SystemExit(
            "deploy.py: set DEPLOYER_PRIVATE_KEY to the deploying account's key (it needs ETH for gas) "
            f"to deploy on {network.show_active()}"
        )
    account = Account.from_key(key)
    web3.middleware_onion.inject(SignAndSendRawMiddlewareBuilder.build(account), layer=0)
    return account.address


def main() -> None:
    deployer = _deployer()
    deployment = deploy_contracts(
        web3,
        deployer,
        initial_supply=int(os.environ.get("LLMARKET_INITIAL_SUPPLY", DEFAULT_INITIAL_SUPPLY)),
        token_artifact=Artifact("LLMToken", LLMToken.abi, LLMToken.bytecode),
        deposits_artifact=Artifact("DepositEscrow", DepositEscrow.abi, DepositEscrow.bytecode),
        unlock_period=int(os.environ.get("LLMARKET_UNLOCK_PERIOD_S", DEFAULT_UNLOCK_PERIOD_S)),
    )
    out_dir = Path(os.environ.get("LLMARKET_DEPLOYMENTS_DIR", PROJECT_ROOT / "deployments"))
    path = write_deployment(deployment, out_dir)
    print(f"LLMToken        {deployment.token}")
    print(f"DepositEscrow   {deployment.deposits}")
    print(f"chain {deployment.chain_id}, block {deployment.block}, deployer {deployment.deployer}")
    print(f"wrote {path}")
