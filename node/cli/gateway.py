"""``llmarket gateway``: an OpenAI-compatible HTTP API in front of the market."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import trio

from node.api.gateway import Gateway
from node.api.http import bind, serve_asgi
from node.app.paid import paying_wallet
from node.app.requester import open_requester
from node.cli.common import bootstrap_flag, network_config, probability, wallet_flags
from node.cli.interrupt import run_until_interrupted
from node.concurrency import open_service_nursery
from node.models.default import DEFAULT_MODEL_CID
from node.verify.local import open_local_verifier


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
    bootstrap_flag(gw, listen_flag="--p2p-listen")
    gw.add_argument("--api-key", default=os.environ.get("LLMARKET_API_KEY"), metavar="KEY",
                    help="require `Authorization: Bearer KEY` (default: $LLMARKET_API_KEY; none: open)")  # fmt: skip
    gw.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="deadline of each request (default: %(default)s)"
    )
    gw.add_argument("--max-price", type=int, default=0, metavar="UNITS",
                    help="highest price per 1,000 tokens to pay (default: 0, free workers only)")  # fmt: skip
    gw.add_argument("--verify", action="store_true",
                    help="check every answer of the embedded default model on this machine, after it was sent; a "
                         "failed check bans the worker and is reported to the market")  # fmt: skip
    gw.add_argument("--spot-check", type=probability, default=0.05, metavar="P",
                    help="with probability P, pay another worker serving the model to check an answer "
                         "(default: %(default)s)")  # fmt: skip
    wallet_flags(gw.add_argument_group("payment (with --max-price > 0)"))
    gw.set_defaults(handler=_gateway)


def _gateway(args: argparse.Namespace) -> int:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    wallet = None
    if args.max_price > 0:
        wallet = paying_wallet(
            Path(args.data_dir), args.rpc_url, Path(args.deployments), insecure_dev_key=args.insecure_dev_key
        )
    config, sockets = bind(args.listen)

    async def main() -> None:
        """Serve until Ctrl-C (every job is cancelled, the workers told) or a failure."""
        async with open_service_nursery() as nursery:
            async with AsyncExitStack() as stack:
                verifier = None
                if args.verify:
                    verifier = await stack.enter_async_context(
                        open_local_verifier(Path(args.data_dir), DEFAULT_MODEL_CID)
                    )
                requester = await stack.enter_async_context(
                    open_requester(Path(args.data_dir), network=network_config(args))
                )
                if verifier is not None:
                    requester.fraud.engines = verifier.engines  # re-check others' fraud reports too
                app = Gateway(requester, wallet=wallet, max_price_per_1k=args.max_price, api_key=args.api_key,
                              deadline_s=args.timeout, verifier=verifier, spot_check=args.spot_check)  # fmt: skip
                await nursery.start(app.run_audits)
                await nursery.start(app.dashboard.run)
                binds = await nursery.start(partial(serve_asgi, app, config, sockets))
                for url in binds:
                    print(f"OpenAI-compatible API at {url}/v1", flush=True)
                    print(f"web page at {url}/", flush=True)
                print(f"market: {len(requester.offers())} offer(s) so far", file=sys.stderr)
                await trio.sleep_forever()

    run_until_interrupted(main)
    return 0
