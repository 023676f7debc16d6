"""``llmarket wallet``: the node's Ethereum account, its channels and receipts."""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from node.app.paid import requester_wallet
from node.app.requester import open_requester
from node.cli.common import bootstrap_flag, json_flag, network_config, wallet_flags
from node.errors import PaymentError
from node.payments.close import ask_to_close
from node.payments.ledger import WorkerLedger
from node.payments.units import format_amount, format_units

if TYPE_CHECKING:
    from node.payments.escrow import EscrowClient


def register(commands: argparse._SubParsersAction) -> None:
    wallet = commands.add_parser(
        "wallet",
        help="show the account, balances, channels and unclaimed receipts; refund or close channels",
        description="The node's Ethereum account on the chain at --rpc-url: its ETH and token balances, the payment "
        "channels it opened as a requester (deposit, paid, signed, expiry) and, for a worker, receipts not yet "
        "claimed. Subcommands refund expired channels or ask workers to close open ones.",
    )
    wallet_flags(wallet)
    json_flag(wallet)
    wallet.set_defaults(handler=_show)
    sub = wallet.add_subparsers(dest="wallet_command", metavar="SUBCOMMAND")

    refund = sub.add_parser("refund", help="take back what is left in expired channels",
                            description="Refund every channel of this wallet that is past its expiry.")  # fmt: skip
    wallet_flags(refund)
    refund.set_defaults(handler=_refund)

    close = sub.add_parser(
        "close",
        help="ask the workers to close open channels (they claim their due, the rest comes back)",
        description="For each open channel (or just --channel), ask its worker over the market to close it: the "
        "worker is paid what was signed and the rest of the deposit returns to this wallet.",
    )
    wallet_flags(close)
    bootstrap_flag(close)
    close.add_argument("--channel", metavar="ID", help="close only this channel (0x…)")
    close.set_defaults(handler=_close)


def _wallet(args):
    return requester_wallet(
        Path(args.data_dir), args.rpc_url, Path(args.deployments), insecure_dev_key=args.insecure_dev_key
    )


def _denomination(client: EscrowClient) -> tuple[int, str]:
    """The token's ``decimals()`` and ``symbol()``, to show amounts in tokens."""
    return client.token.functions.decimals().call(), client.token.functions.symbol().call()


def _show(args: argparse.Namespace) -> None:
    wallet = _wallet(args)
    client = wallet.client
    decimals, symbol = _denomination(client)
    channels = []
    for channel in wallet.ledger.channels():
        if channel.status == "open":
            channel = wallet.refresh(channel.channel_id) or channel
        state = client.get_channel(channel.channel_id)
        channels.append({
            "channel_id": "0x" + channel.channel_id.hex(), "worker": channel.worker, "peer_id": channel.peer_id,
            "status": channel.status, "deposit": channel.deposit, "paid": state.paid, "signed": channel.signed,
            "expiry": channel.expiry,
        })  # fmt: skip
    receipts = [
        {"channel_id": "0x" + c.channel_id.hex(), "receipted": c.receipted, "claimed": c.claimed,
         "unclaimed": c.claimable, "last_error": c.last_error}
        for c in WorkerLedger.in_data_dir(Path(args.data_dir)).all() if c.claimable > 0 and not c.closed
    ]  # fmt: skip
    tokens = client.token_balance(wallet.address)
    eth = client.eth_balance(wallet.address)
    info = {
        "address": wallet.address,
        "chain_id": client.deployment.chain_id,
        "eth": eth,  # wei
        "tokens": tokens,  # token base units; every amount below is too
        "token": {"address": client.deployment.token, "symbol": symbol, "decimals": decimals},
        "display": {"tokens": format_units(tokens, decimals, symbol), "eth": format_units(eth, 18, "ETH")},
        "channels": channels,
        "unclaimed_receipts": receipts,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return

    def amount(base_units: int) -> str:
        return format_amount(base_units, decimals, symbol)

    print(f"address   {info['address']} (chain {info['chain_id']})")
    print(f"balance   {amount(tokens)}, {info['display']['eth']}")
    if channels:
        print("channels (as requester):")
        for c in channels:
            expiry = datetime.fromtimestamp(c["expiry"]).strftime("%Y-%m-%d %H:%M")
            print(f"  {c['channel_id'][:18]}… to {c['worker']}  {c['status']:<8} expires {expiry}")
            print(f"      deposit {amount(c['deposit'])}, signed {amount(c['signed'])}, paid {amount(c['paid'])}")
    if receipts:
        print("unclaimed receipts (as worker):")
        for r in receipts:
            print(
                f"  {r['channel_id'][:18]}…  {amount(r['unclaimed'])}"
                + (f" ({r['last_error']})" if r["last_error"] else "")
            )


def _refund(args: argparse.Namespace) -> None:
    refunded = _wallet(args).refund_expired()
    print(f"refunded {len(refunded)} expired channel(s)" + "".join(f"\n  0x{c.hex()}" for c in refunded))


def _close(args: argparse.Namespace) -> int:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    wallet = _wallet(args)
    wanted = [
        c
        for c in wallet.ledger.channels(status="open")
        if args.channel is None or "0x" + c.channel_id.hex() == args.channel
    ]
    if not wanted:
        print("no open channels to close")
        return 0

    decimals, symbol = _denomination(wallet.client)

    async def main() -> int:
        failures = 0
        async with open_requester(Path(args.data_dir), network=network_config(args)) as requester:
            for channel in wanted:
                with trio.move_on_after(10):
                    await requester.gossip.wait_for(lambda live, c=channel: any(o.peer_id == c.peer_id for o in live))
                addrs = next((o.addrs for o in requester.offers() if o.peer_id == channel.peer_id), [])
                try:
                    paid, returned = await ask_to_close(
                        requester.host, channel.peer_id, addrs, wallet.client.account, channel.channel_id
                    )
                except PaymentError as err:
                    print(f"0x{channel.channel_id.hex()[:16]}…: {err}")
                    failures += 1
                    continue
                await trio.to_thread.run_sync(lambda c=channel: wallet.ledger.update(c.channel_id, status="closed"))
                print(
                    f"0x{channel.channel_id.hex()[:16]}…: closed; worker paid {format_amount(paid, decimals, symbol)}, "
                    f"{format_amount(returned, decimals, symbol)} returned to you"
                )
        return 1 if failures else 0

    return trio.run(main)
