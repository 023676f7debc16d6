"""``llmarket chain …``: the chain and the escrow contracts, read-only."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from node.cli.common import chain_flags
from node.errors import ConfigError


def _rpc_flags(parser: argparse.ArgumentParser) -> None:
    chain_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def register(commands: argparse._SubParsersAction) -> None:
    chain = commands.add_parser(
        "chain",
        help="inspect the chain and the escrow contracts",
        description="Inspect the chain llmarket pays through: the deployed token and escrow, and payment channels.",
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

    channel = chain_commands.add_parser(
        "channel",
        help="show one payment channel",
        description="Show a payment channel as the escrow stores it: parties, deposit, paid, expiry and status.",
    )
    channel.add_argument("channel_id", metavar="CHANNEL_ID", help="the channel id, 32 bytes in hex (0x…)")
    _rpc_flags(channel)
    channel.set_defaults(handler=_chain_channel)


def _connect(args: argparse.Namespace):
    from node.payments.escrow import EscrowClient  # web3 is slow to import; only commands that need it pay

    return EscrowClient.connect(args.rpc_url, deployments_dir=args.deployments)


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
        "escrow": {"address": d.escrow, "channels_opened": client.escrow.functions.channelCount().call(),
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
        f"escrow    {e['address']}  {e['channels_opened']} channels opened, deployed in block {e['deployed_in_block']}"
    )
    print(f"deployer  {info['deployer']}")


def _parse_channel_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"channel id {text!r} is not 32 bytes of hex; copy the 0x… id that open printed")
    return raw


def _chain_channel(args: argparse.Namespace) -> None:
    channel_id = _parse_channel_id(args.channel_id)
    client = _connect(args)
    state = client.get_channel(channel_id)
    info = {
        "channel_id": "0x" + channel_id.hex(),
        "status": state.status.name.lower(),
        "requester": state.requester,
        "worker": state.worker,
        "deposit": state.deposit,
        "paid": state.paid,
        "remaining": state.remaining,
        "expiry": state.expiry,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    if state.status.name == "NONE":
        print(f"channel {info['channel_id']}: no such channel on chain {client.deployment.chain_id}")
        return
    expiry = datetime.fromtimestamp(state.expiry, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    for key in ("channel_id", "status", "requester", "worker", "deposit", "paid", "remaining"):
        print(f"{key:<11} {info[key]}")
    print(f"{'expiry':<11} {state.expiry} ({expiry})")
