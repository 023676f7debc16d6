"""Connecting a node to the chain: a paid worker's metering, a requester's wallet.

Both use the deposit scheme (docs/payments.md): the worker meters jobs with a
``DepositMetering`` and claims from requesters' deposits in the ``DepositEscrow``;
the requester pays any worker from its one deposit with a ``DepositPayer``.

These are the only places a ``DepositClient`` is made, and so the only place web3 is
imported: inside the functions, when a node is paid. A free worker, a requester without
a wallet and the whole command line load without web3 (tests/test_layers.py checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from node.app.config import WorkerConfig
from node.errors import ConfigError
from node.net.identity import load_or_create_account, load_or_create_p2p_key, peer_id_of
from node.payments.deposit_metering import DepositMetering
from node.payments.deposit_settlement import DepositSettler, SettlementPolicy
from node.payments.ledger import WalletLedger, WorkerLedger
from node.payments.payer import DepositPayer, UsageOracle
from node.payments.policy import job_cost
from node.payments.wallet import DepositWallet

if TYPE_CHECKING:
    from collections.abc import Callable

    from node.payments.deposits import DepositClient


def _client(rpc_url: str, deployments_dir: Path, data_dir: Path, insecure_dev_key: bool) -> DepositClient:
    """A deposit escrow client as this node's account, on the chain at ``rpc_url`` (blocking)."""
    from node.payments.deposits import DepositClient  # web3: here, not at the top (see the module's docstring)

    probe = DepositClient.connect(rpc_url, deployments_dir=deployments_dir)
    account = load_or_create_account(data_dir, insecure_dev_key=insecure_dev_key, chain_id=probe.deployment.chain_id)
    return DepositClient(probe.w3, probe.deployment, account)


def deposit_metering(config: WorkerConfig) -> DepositMetering:
    """Connect to the chain as the worker's account (blocking): client, ledger, settler.

    The caller runs ``metering.run`` (events and batch claims) in its nursery.
    """
    if not config.rpc_url or config.deployments_dir is None:
        raise ConfigError("a paid worker (--price > 0) needs --rpc-url and --deployments")
    client = _client(config.rpc_url, config.deployments_dir, config.data_dir, config.insecure_dev_key)
    ledger = WorkerLedger.in_data_dir(config.data_dir)
    policy = SettlementPolicy(settle_every=config.settle_every, settle_interval_s=config.settle_interval_s)
    window = config.max_credit_window or job_cost(0, 256, config.price_per_1k)
    return DepositMetering(
        client, ledger, config.price_per_1k, max_credit_window=max(window, 1),
        settler=DepositSettler(ledger, client, policy),
    )  # fmt: skip


def requester_wallet(
    data_dir: Path, rpc_url: str, deployments_dir: Path, *, insecure_dev_key: bool = False
) -> DepositWallet:
    """The requester's deposit wallet on the chain at ``rpc_url`` (blocking); it may be unfunded.

    Its ``peer_id`` is the libp2p identity in ``data_dir``, the one a requester node on that data dir sends
    jobs from (``open_requester``): the payer binds each job's terms to it."""
    return DepositWallet(
        _client(rpc_url, deployments_dir, data_dir, insecure_dev_key), WalletLedger.in_data_dir(data_dir),
        peer_id=peer_id_of(load_or_create_p2p_key(data_dir)),
    )  # fmt: skip


def paying_wallet(
    data_dir: Path, rpc_url: str, deployments_dir: Path, *, insecure_dev_key: bool = False
) -> DepositWallet:
    """``requester_wallet``, refused unless its deposit can pay workers (blocking).

    Raises:
        PaymentError: no deposit (the one line names the command that funds it), or it is unlocking.
    """
    wallet = requester_wallet(data_dir, rpc_url, deployments_dir, insecure_dev_key=insecure_dev_key)
    wallet.require_funded()
    return wallet


def payer_for(
    wallet: DepositWallet,
    *,
    usage: UsageOracle | None = None,
    credit: Callable[[str], int] | None = None,
    peer_id: str = "",
) -> DepositPayer:
    """The payer that pays any worker from ``wallet``'s deposit, with no chain step, for jobs sent from the
    libp2p peer ``peer_id`` (default: the wallet's data dir's own)."""
    return DepositPayer(wallet.client, wallet.ledger, peer_id or wallet.peer_id, usage=usage, credit=credit)
