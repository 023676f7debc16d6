"""``llmarket gateway``: an OpenAI-compatible HTTP API in front of the market."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from node.cli.common import bootstrap_flag, wallet_flags
from node.gateway import Gateway
from node.node import open_requester, requester_wallet


def register(commands: argparse._SubParsersAction) -> None:
    gw = commands.add_parser(
        "gateway",
        help="serve the market as an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)",
        description="A requester node with an HTTP front that speaks the OpenAI API, so any OpenAI client can use "
        "the market. Routing, failover and payment are those of `llmarket request`. "
        "Example: llmarket gateway --bootstrap /ip4/…/p2p/12D3… then point a client at http://127.0.0.1:8000/v1",
    )
    gw.add_argument(
        "--listen", default="127.0.0.1:8000", metavar="HOST:PORT", help="where to serve HTTP (default: %(default)s)"
    )
    bootstrap_flag(gw)
    gw.add_argument("--api-key", default=os.environ.get("LLMARKET_API_KEY"), metavar="KEY",
                    help="require `Authorization: Bearer KEY` (default: $LLMARKET_API_KEY; none: open)")  # fmt: skip
    gw.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="deadline of each request (default: %(default)s)"
    )
    gw.add_argument("--max-price", type=int, default=0, metavar="UNITS",
                    help="highest price per 1,000 tokens to pay (default: 0, free workers only)")  # fmt: skip
    wallet_flags(gw.add_argument_group("payment (with --max-price > 0)"))
    gw.set_defaults(handler=_gateway)


def _gateway(args: argparse.Namespace) -> int:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger("hypercorn").setLevel(logging.WARNING)
    wallet = None
    if args.max_price > 0:
        wallet = requester_wallet(
            Path(args.data_dir), args.rpc_url, Path(args.deployments), insecure_dev_key=args.insecure_dev_key
        )
    config = Config()
    config.bind = [args.listen]
    config.accesslog = None

    async def main() -> None:
        async with open_requester(Path(args.data_dir), tuple(args.bootstrap)) as requester:
            app = Gateway(requester, wallet=wallet, max_price_per_1k=args.max_price, api_key=args.api_key,
                          deadline_s=args.timeout)  # fmt: skip
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(lambda task_status: hypercorn_serve(app, config, task_status=task_status))
                for bind in binds:
                    print(f"OpenAI-compatible API at {bind}/v1", flush=True)
                print(f"market: {len(requester.offers())} offer(s) so far", file=sys.stderr)

    trio.run(main)
    return 0
