"""``llmarket wallet``: the node's Ethereum account, its deposit in the escrow, and what it owes or is owed.

A thin layer over ``node.payments.wallet.DepositWallet`` (docs/payments.md, docs/requester.md).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from node.app.paid import requester_wallet
from node.cli.common import json_flag, wallet_flags
from node.errors import ConfigError
from node.payments.ledger import WorkerLedger
from node.payments.units import format_amount, format_units, parse_amount

if TYPE_CHECKING:
    from node.payments.deposits import DepositClient
    from node.payments.wallet import DepositWallet

HOW_IT_WORKS = (
    "A requester pays every worker from one deposit in the DepositEscrow, with signed receipts and no "
    "transaction per worker or per job. Workers claim from the deposit first come, first served; the reserve is "
    "cut into K slots, each bound to one worker at its first claim, and guarantees that worker its share whatever "
    "others claim. Taking money back needs an unlock period, during which workers can still claim what they hold."
)
AMOUNT_HELP = "base units (a whole number), or tokens followed by the token's symbol, e.g. 2.5LLM"


def register(commands: argparse._SubParsersAction) -> None:
    wallet = commands.add_parser(
        "wallet",
        help="show the account, its deposit and reserve, what is pending per worker; fund, unlock, withdraw",
        description="The node's Ethereum account on the chain at --rpc-url: its ETH and token balances, its deposit "
        "and reserve in the DepositEscrow and their unlock, what it signed to each worker and the chain has not paid "
        "yet (a requester), and the receipts it holds unclaimed (a worker). " + HOW_IT_WORKS + " Subcommands fund the "
        "deposit and the reserve, unlock and withdraw. Example: llmarket wallet deposit 10LLM",
        epilog="Amounts are shown as base units, then tokens: 102000000000000 (0.000102 LLM). --json keeps every "
        "amount an integer of base units.",
    )
    wallet_flags(wallet)
    json_flag(wallet)
    wallet.set_defaults(handler=_show)
    sub = wallet.add_subparsers(dest="wallet_command", metavar="SUBCOMMAND")

    deposit = sub.add_parser(
        "deposit",
        help="add tokens to the deposit that pays any worker",
        description="Move AMOUNT of this account's tokens into its deposit in the DepositEscrow. Every worker's "
        "claims draw on the deposit first, first come first served, so size it for the jobs you will run before "
        "the workers claim (they claim within seconds to minutes). Funding cancels a pending unlock. "
        "Example: llmarket wallet deposit 10LLM",
    )
    deposit.add_argument("amount", metavar="AMOUNT", help=AMOUNT_HELP)
    wallet_flags(deposit)
    deposit.set_defaults(handler=_deposit)

    reserve = sub.add_parser(
        "reserve",
        help="add tokens to the reserve that guarantees K workers their share",
        description="Move AMOUNT into the reserve, cut into --slots K equal shares. A worker takes a slot at its "
        "first claim, and from then on its share is guaranteed to it whatever other workers claim, so workers "
        "holding a slot serve you past their small allowance for a stranger. K is set by the first funding and "
        "stays fixed while a worker holds a slot; later fundings grow every share. Funding cancels a pending unlock. "
        "Example: llmarket wallet reserve 8LLM --slots 8",
    )
    reserve.add_argument("amount", metavar="AMOUNT", help=AMOUNT_HELP)
    reserve.add_argument("--slots", type=int, default=None, metavar="K",
                         help="how many workers the reserve backs (default: the current K, else 1)")  # fmt: skip
    wallet_flags(reserve)
    reserve.set_defaults(handler=_reserve)

    unlock = sub.add_parser(
        "unlock",
        help="start the unlock period, after which `withdraw` takes the deposit and reserve back",
        description="Start the unlock period (a day on a deployment's defaults). Workers refuse new jobs from an "
        "unlocking account and claim the receipts they hold before it ends; then `llmarket wallet withdraw` returns "
        "what is left. `llmarket wallet cancel-unlock` (or any funding) stops it.",
    )
    wallet_flags(unlock)
    unlock.set_defaults(handler=_unlock)

    cancel = sub.add_parser(
        "cancel-unlock",
        help="stop a pending unlock, so workers serve this account again",
        description="Cancel the unlock started by `llmarket wallet unlock`: the deposit and reserve stay, and "
        "workers accept jobs from this account again.",
    )
    wallet_flags(cancel)
    cancel.set_defaults(handler=_cancel_unlock)

    withdraw = sub.add_parser(
        "withdraw",
        help="take back the deposit and what is left of the reserve, once unlocked",
        description="After `llmarket wallet unlock` and its unlock period, move the deposit and what is left of "
        "the reserve back to this account. Receipts you signed and workers did not claim in time are then "
        "unpaid: workers claim them before the unlock ends, so this only happens to a worker that was away.",
    )
    wallet_flags(withdraw)
    withdraw.set_defaults(handler=_withdraw)


def _wallet(args) -> DepositWallet:
    return requester_wallet(
        Path(args.data_dir), args.rpc_url, Path(args.deployments), insecure_dev_key=args.insecure_dev_key
    )


def _denomination(client: DepositClient) -> tuple[int, str]:
    """The token's ``decimals()`` and ``symbol()``, to show amounts in tokens."""
    return client.token.functions.decimals().call(), client.token.functions.symbol().call()


def _amount_arg(wallet: DepositWallet, text: str) -> tuple[int, str]:
    """AMOUNT in base units, and as a wallet shows it."""
    decimals, symbol = _denomination(wallet.client)
    try:
        amount = parse_amount(text, decimals, symbol)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if amount <= 0:
        raise ConfigError("the amount must be above zero")
    return amount, format_amount(amount, decimals, symbol)


def _when(unix: int) -> str:
    return datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S")


def wallet_info(wallet: DepositWallet, data_dir: Path) -> dict:
    """Everything ``llmarket wallet`` shows, amounts as integers of base units (blocking: chain reads)."""
    client = wallet.client
    decimals, symbol = _denomination(client)
    account = wallet.account()
    now = client.chain_time()
    d = client.deployment
    held = [
        p for p in WorkerLedger.in_data_dir(data_dir).pairs() if (p.chain_id, p.escrow) == (d.chain_id, client.address)
    ]
    tokens, eth = client.token_balance(wallet.address), client.eth_balance(wallet.address)
    return {
        "address": wallet.address,
        "chain_id": d.chain_id,
        "escrow": client.address,
        "eth": eth,  # wei
        "tokens": tokens,  # token base units; every amount below is too
        "token": {"address": d.token, "symbol": symbol, "decimals": decimals},
        "display": {"tokens": format_units(tokens, decimals, symbol), "eth": format_units(eth, 18, "ETH")},
        "deposit": account.deposit,
        "reserve": {
            "total": account.reserve_total,
            "left": account.reserve_left,
            "slots": account.slots,
            "used": account.slots_used,
            "share": account.share,
        },
        "unlock": {
            "unlocking": account.unlocking,
            "unlock_at": account.unlock_at,  # unix seconds; 0: not unlocking
            "withdrawable": account.unlocking and now >= account.unlock_at,
            "period_s": client.unlock_period(),
        },
        "pending": [  # as a requester: signed to each worker, paid on chain, the difference
            {
                "worker": p.worker,
                "peer_id": p.peer_id,
                "signed": p.signed,
                "paid": p.paid,
                "pending": p.pending,
                "has_slot": p.has_slot,
            }
            for p in wallet.pending()
        ],  # fmt: skip
        "unclaimed_receipts": [  # as a worker: receipts held above what the chain paid
            {
                "requester": p.requester,
                "receipted": p.best,
                "claimed": p.claimed,
                "unclaimed": p.claimable,
                "has_slot": p.has_slot,
                "unlock_at": p.unlock_at,
                "last_error": p.last_error,
            }
            for p in held
            if p.claimable > 0
        ],  # fmt: skip
        "earnings": client.earnings_of(wallet.address),  # single claims credit the escrow: withdraw_earnings
    }


def _show(args: argparse.Namespace) -> None:
    info = wallet_info(_wallet(args), Path(args.data_dir))
    if args.json:
        print(json.dumps(info, indent=2))
        return
    token = info["token"]

    def amount(base_units: int) -> str:
        return format_amount(base_units, token["decimals"], token["symbol"])

    res, unlock = info["reserve"], info["unlock"]
    print(f"address   {info['address']} (chain {info['chain_id']})")
    print(f"balance   {amount(info['tokens'])}, {info['display']['eth']}")
    print(f"deposit   {amount(info['deposit'])} in the DepositEscrow at {info['escrow']}")
    if res["slots"]:
        print(f"reserve   {amount(res['left'])} left of {amount(res['total'])}; {res['used']} of {res['slots']} "
              f"slot(s) used, a share is {amount(res['share'])}")  # fmt: skip
    else:
        print("reserve   none (`llmarket wallet reserve AMOUNT --slots K` backs K workers)")
    if not unlock["unlocking"]:
        print(f"unlock    not unlocking (`llmarket wallet unlock`: withdraw {unlock['period_s']} s later)")
    elif unlock["withdrawable"]:
        print(f"unlock    unlocked since {_when(unlock['unlock_at'])}: `llmarket wallet withdraw` takes it back")
    else:
        print(f"unlock    unlocking: withdraw from {_when(unlock['unlock_at'])} (workers refuse new jobs meanwhile)")
    if info["pending"]:
        total = sum(p["pending"] for p in info["pending"])
        print(f"pending   {amount(total)} signed and not yet claimed, per worker (as requester):")
        for p in info["pending"]:
            slot = ", holds a reserve slot" if p["has_slot"] else ""
            print(f"  {p['worker']}  pending {amount(p['pending'])}")
            print(f"      signed {amount(p['signed'])}, paid on chain {amount(p['paid'])}{slot}")
    if info["unclaimed_receipts"]:
        print("unclaimed receipts (as worker):")
        for r in info["unclaimed_receipts"]:
            print(
                f"  {r['requester']}  {amount(r['unclaimed'])}" + (f" ({r['last_error']})" if r["last_error"] else "")
            )
    if info["earnings"]:
        print(f"earnings  {amount(info['earnings'])} credited in the escrow, not yet withdrawn")


def _deposit(args: argparse.Namespace) -> None:
    wallet = _wallet(args)
    amount, shown = _amount_arg(wallet, args.amount)
    wallet.deposit(amount)
    now = format_amount(wallet.account().deposit, *_denomination(wallet.client))
    print(f"deposited {shown}; the deposit is now {now}")


def _reserve(args: argparse.Namespace) -> None:
    wallet = _wallet(args)
    amount, shown = _amount_arg(wallet, args.amount)
    if args.slots is not None and args.slots < 1:
        raise ConfigError("--slots must be at least 1")
    wallet.fund_reserve(amount, args.slots)
    account = wallet.account()
    decimals, symbol = _denomination(wallet.client)
    print(f"added {shown} to the reserve: {format_amount(account.reserve_left, decimals, symbol)} left, "
          f"{account.slots} slot(s) of {format_amount(account.share, decimals, symbol)}")  # fmt: skip


def _unlock(args: argparse.Namespace) -> None:
    at = _wallet(args).unlock()
    print(f"unlocking: `llmarket wallet withdraw` works from {_when(at)}; workers refuse new jobs meanwhile "
          "(`llmarket wallet cancel-unlock` stops it)")  # fmt: skip


def _cancel_unlock(args: argparse.Namespace) -> None:
    _wallet(args).cancel_unlock()
    print("unlock cancelled: workers serve this account again")


def _withdraw(args: argparse.Namespace) -> None:
    wallet = _wallet(args)
    amount = wallet.withdraw()
    print(f"withdrew {format_amount(amount, *_denomination(wallet.client))}")
