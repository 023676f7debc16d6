"""``llmarket chain …``: the chain and the deposit escrow, read-only."""

from __future__ import annotations

import argparse
import json

from node.cli.common import chain_flags


def _rpc_flags(parser: argparse.ArgumentParser) -> None:
    chain_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def register(commands: argparse._SubParsersAction) -> None:
    chain = commands.add_parser(
        "chain",
        help="inspect the chain and the deposit escrow",
        description="Inspect the chain llmarket pays through: the deployed token and DepositEscrow. A requester's "
        "deposit and what it owes each worker: `llmarket wallet`.",
    )
    chain_commands = chain.add_subparsers(dest="chain_command", metavar="SUBCOMMAND", required=True)

    status = chain_commands.add_parser(
        "status",
        help="check the RPC endpoint and the deployment, and show the contracts",
        description="Connect to the chain, check that the deployment record matches it and that the "
        "contracts are there, and show their addresses. Example: llmarket chain status --rpc-url http://127.0.0.1:8545",
    )
    _rpc_flags(status)
    status.set_defaults(handler=_chain_status)


def _connect(args: argparse.Namespace):
    from node.payments.deposits import DepositClient  # web3 is slow to import; only commands that need it pay

    return DepositClient.connect(args.rpc_url, deployments_dir=args.deployments)


def _chain_status(args: argparse.Namespace) -> None:
    client = _connect(args)
    d = client.deployment
    token = client.token.functions
    info = {
        "rpc_url": args.rpc_url,
        "chain_id": d.chain_id,
        "latest_block": client.w3.eth.block_number,
        "token": {"address": d.token, "symbol": token.symbol().call(), "decimals": token.decimals().call(),
                  "total_supply": token.totalSupply().call()},
        "escrow": {"address": d.deposits, "contract": "DepositEscrow", "unlock_period_s": client.unlock_period(),
                   "deployed_in_block": d.block},
        "deployer": d.deployer,
    }  # fmt: skip
    if args.json:
        print(json.dumps(info, indent=2))
        return
    t, e = info["token"], info["escrow"]
    print(f"chain     {info['chain_id']} at {info['rpc_url']} (block {info['latest_block']})")
    print(f"token     {t['address']}  {t['symbol']}, {t['decimals']} decimals, supply {t['total_supply']}")
    print(
        f"escrow    {e['address']}  DepositEscrow, unlock period {e['unlock_period_s']} s, "
        f"deployed in block {e['deployed_in_block']}"
    )
    print(f"deployer  {info['deployer']}")
