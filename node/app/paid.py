"""Connecting a node to the chain: a paid worker's metering, a requester's wallet.

These are the only places an ``EscrowClient`` is made, and so the only place web3 is
imported: inside the functions, when a node is paid. A free worker, a requester without
a wallet and the whole command line load without web3 (tests/test_layers.py checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from node.app.config import WorkerConfig
from node.errors import ConfigError
from node.net.identity import load_or_create_account
from node.payments.ledger import WalletLedger, WorkerLedger
from node.payments.metering import EscrowMetering
from node.payments.policy import job_cost
from node.payments.settlement import SettlementPolicy, Settler
from node.payments.wallet import Wallet

if TYPE_CHECKING:
    from node.payments.escrow import EscrowClient


def _client(rpc_url: str, deployments_dir: Path, data_dir: Path, insecure_dev_key: bool) -> EscrowClient:
    """An escrow client as this node's account, on the chain at ``rpc_url`` (blocking)."""
    from node.payments.escrow import EscrowClient  # web3: here, not at the top (see the module's docstring)

    probe = EscrowClient.connect(rpc_url, deployments_dir=deployments_dir)
    account = load_or_create_account(data_dir, insecure_dev_key=insecure_dev_key, chain_id=probe.deployment.chain_id)
    return EscrowClient(probe.w3, probe.deployment, account)


def escrow_metering(config: WorkerConfig) -> EscrowMetering:
    """Connect to the chain as the worker's account (blocking): client, ledger, settler."""
    if not config.rpc_url or config.deployments_dir is None:
        raise ConfigError("a paid worker (--price > 0) needs --rpc-url and --deployments")
    client = _client(config.rpc_url, config.deployments_dir, config.data_dir, config.insecure_dev_key)
    ledger = WorkerLedger.in_data_dir(config.data_dir)
    policy = SettlementPolicy(settle_every=config.settle_every, settle_interval_s=config.settle_interval_s)
    window = config.max_credit_window or job_cost(0, 256, config.price_per_1k)
    settler = Settler(ledger, client, policy)
    return EscrowMetering(client, ledger, settler, config.price_per_1k, max_credit_window=max(window, 1))


def requester_wallet(data_dir: Path, rpc_url: str, deployments_dir: Path, *, insecure_dev_key: bool = False) -> Wallet:
    """The requester's wallet on the chain at ``rpc_url`` (blocking)."""
    return Wallet(_client(rpc_url, deployments_dir, data_dir, insecure_dev_key), WalletLedger.in_data_dir(data_dir))
